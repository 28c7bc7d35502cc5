"""Sizes read the ways fx records them, at the top of forward, and read again stages later:
`x.shape[d]` and `x.size()[d]` (an item of the tensor's shape), `x.size(-2)` (a dimension counted
from the end) and `batch, width = x.shape` (items of one shape); tests/test_local_sizes.py."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(6))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        batch = x.shape[0]
        rows = x.size()[0]
        counted_back = x.size(-2)
        unpacked, width = x.shape
        h = x
        for layer in self.layers:
            h = torch.relu(layer(h))
        pairs = h.view(batch, 2, width // 2).flip(1).reshape(rows, width)
        ones = h.new_ones(counted_back, 1)
        return self.head(pairs * ones + h.reshape(unpacked, -1))


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
