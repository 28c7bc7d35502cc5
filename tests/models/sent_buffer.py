"""A buffer that forward updates in place (a call counter) and whose value a later stage reads:
the first stage sends the buffer itself, which the next micro-batch's forward changes again."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class CountingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(16, 16)
        self.l2 = nn.Linear(16, 16)
        self.l3 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        h = torch.tanh(self.l1(x))
        h = torch.tanh(self.l2(h))
        h = torch.tanh(self.l3(h))
        return self.head(h) * self.calls


def build_model():
    return CountingNet()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 16),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
