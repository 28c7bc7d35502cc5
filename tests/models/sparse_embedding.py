"""An nn.Embedding(sparse=True): its weight gets sparse gradients."""

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, WIDTH = 80, 16


class BagOfTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, WIDTH, sparse=True)
        self.hidden = nn.Linear(WIDTH, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, ids):
        h = self.embedding(ids).mean(1)
        return self.head(torch.relu(self.hidden(h)))


def build_model():
    return BagOfTokens()


def example_inputs(batch_size):
    return (torch.randint(0, VOCAB, (batch_size, 4)),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
