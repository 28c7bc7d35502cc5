"""A model built from a library's blocks (tests/library/drop_path_blocks.py, imported from
outside the model file's folder as an installed package is): stochastic depth branches on
`self.training` in the library's code, in its DropPath module (which the stages call whole, so
they follow eval mode there) and in its function that the model's own block passes the flag to;
a library layer with weights adds noise when training (called whole and followed too), and so
does a library module before a layer it holds. That function and that module are kept as traced
in training mode, so the stages compute them in eval mode too; `ftc compile` names the library's
lines.

Inputs are float [B, 6, 16]; output [B, 4]. Loss: cross-entropy against a class id [B] in [0, 4).
"""

import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

LIBRARY = str(Path(__file__).resolve().parents[1] / "library")
if LIBRARY not in sys.path:
    sys.path.append(LIBRARY)

from drop_path_blocks import Block, NoisyLinear, NoisyProjection, drop_path

WIDTH = 16


class Head(nn.Module):
    """The model's own block, which passes its flag to the library's function."""

    def __init__(self):
        super().__init__()
        self.fc = NoisyProjection(WIDTH)
        self.out = nn.Linear(WIDTH, 4)

    def forward(self, x):
        return self.out(x + drop_path(torch.tanh(self.fc(x)), 0.2, self.training))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Block(WIDTH, 0.2), Block(WIDTH, 0.2))
        self.mix = NoisyLinear(WIDTH, WIDTH)
        self.head = Head()

    def forward(self, x):
        return self.head(self.mix(self.blocks(x).mean(1)))


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 6, WIDTH),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
