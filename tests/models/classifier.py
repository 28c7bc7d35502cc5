"""A small classifier for the training tests: two-layer body, linear head. The head is
registered before the body it runs after, so mode single (which orders the optimizer's
parameters as the model registers them) and the pipeline (stage by stage) order them apart.

Inputs are float [B, 8]; the output is [B, 4]. Loss: cross-entropy against integer class
labels, a LongTensor [B] in [0, 4).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 4)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())

    def forward(self, x):
        return self.head(self.body(x))


def build_model():
    return Classifier()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)


def example_targets(batch_size):
    return torch.randint(0, 4, (batch_size,))


def loss_fn(output, target):
    return F.cross_entropy(output, target)
