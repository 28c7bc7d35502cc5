"""Stochastic depth written in the model file, as ConvNeXt and Swin re-implementations do: a
DropPath module without weights that branches on `self.training` (`if not self.training: return
x`). Traced op by op, the stages would drop paths in eval mode too; called whole, as ftc does
for such a module, they follow train() and eval() as the model does.

Inputs are float [B, 12]; output [B, 3]. Loss: cross-entropy against a class id [B] in [0, 3).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class DropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = (torch.rand_like(x[:, :1]) >= self.p).to(x.dtype)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    def __init__(self, width: int, p: float):
        super().__init__()
        self.f = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.drop_path = DropPath(p)

    def forward(self, x):
        return x + self.drop_path(self.f(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 24)
        self.blocks = nn.Sequential(*[Block(24, 0.1 * (i + 1)) for i in range(4)])
        self.out = nn.Linear(24, 3)

    def forward(self, x):
        return self.out(self.blocks(self.inp(x)))


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 12),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
