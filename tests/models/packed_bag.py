"""A packed input: EmbeddingBag's flat indices [3·B] with one offset per sample, which training
can neither stack from samples nor cut into micro-batches by slicing."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Bags(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(50, 16, mode="mean")
        self.head = nn.Linear(16, 2)

    def forward(self, ids, offsets):
        return self.head(torch.relu(self.bag(ids, offsets)))


def build_model():
    return Bags()


def example_inputs(batch_size):
    return (torch.randint(0, 50, (batch_size * 3,)), torch.arange(0, batch_size * 3, 3))


def loss_fn(output, target):
    return F.cross_entropy(output, target)
