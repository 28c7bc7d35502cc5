"""Blocks run through torch.utils.checkpoint, reentrant and not: a tracer that followed the
reentrant form would record its no_grad and freeze the blocks' weights in the stage code."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.blocks = nn.ModuleList([Block() for _ in range(4)])
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = self.embed(x)
        for k, block in enumerate(self.blocks):
            x = checkpoint(block, x, use_reentrant=k % 2 == 0)
        return self.head(x)


def build_model():
    return Checkpointed()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 16),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
