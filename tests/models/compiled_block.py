"""A submodule wrapped in torch.compile (an OptimizedModule, whose state keys run through
`_orig_mod`) between plain layers."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.compiled = torch.compile(Block(16))
        self.plain = Block(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.plain(self.compiled(self.inp(x))))


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
