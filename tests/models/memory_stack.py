"""A residual MLP stack whose activations dominate its memory, for the recompute check of the
memory audit (tests/test_memory_truth.py); its fourth block is frozen."""

import torch
import torch.nn as nn
import torch.nn.functional as F

WIDTH, HIDDEN, BLOCKS, TOKENS = 32, 256, 6, 32


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(WIDTH, HIDDEN)
        self.down = nn.Linear(HIDDEN, WIDTH)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(BLOCKS)])
        self.blocks[3].requires_grad_(False)
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build_model():
    return Stack()


def example_inputs(batch_size):
    return (torch.randn(batch_size, TOKENS, WIDTH),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
