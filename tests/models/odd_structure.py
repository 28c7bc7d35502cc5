"""Structures the other models lack, each of which once broke the compiler:

- a sliced nn.Sequential (`backbone()[2:]`) keeps its keys "2".."5", so its layers must be
  reached by key, not by position;
- forward takes an option with a non-None default (`scale=2.0`), which torch.fx guards with
  its own assertions that ftc drops;
- forward changes its input in place (`x.mul_`) and reads it again at the end, so every reader
  of the input stays with the mutating op;
- nn.Hardswish, a layer export lowers to an ATen op.

Inputs are float [B, 3, 8, 8]; the output is [B, 4]. Loss: cross-entropy against integer class
labels, a LongTensor [B] in [0, 4).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def backbone():
    return nn.Sequential(
        nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(3, 8, 3, padding=1), nn.Hardswish(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
    )  # fmt: skip


class OddStructure(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = backbone()[2:]
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
        self.skip = nn.Linear(3, 4)

    def forward(self, x, scale=2.0):
        x.mul_(0.5)
        h = self.pool(self.features(x)).flatten(1)
        return self.head(h) * scale + self.skip(x.mean((2, 3)))


def build_model():
    return OddStructure()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 3, 8, 8),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
