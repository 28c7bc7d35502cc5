"""A model built only from a library's blocks (tests/library/drop_path_blocks.py, imported from
outside the model file's folder as an installed package is), whose stochastic depth branches on
`self.training` inside the library's DropPath module, as transformers' SwinDropPath and timm's
DropPath do. A call of that module is the whole branch, so the stages call it whole and follow
train() and eval() as the model does.

Inputs are float [B, 6, 16]; output [B, 4]. Loss: cross-entropy against a class id [B] in [0, 4).
"""

import sys
from pathlib import Path

import torch.nn as nn
import torch.nn.functional as F

LIBRARY = str(Path(__file__).resolve().parents[1] / "library")
if LIBRARY not in sys.path:
    sys.path.append(LIBRARY)

from drop_path_blocks import Block

WIDTH = 16


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(WIDTH, 0.2) for _ in range(3)])
        self.head = nn.Linear(WIDTH, 4)

    def forward(self, x):
        return self.head(self.blocks(x).mean(1))


def build_model():
    return Net()


def example_inputs(batch_size):
    import torch

    return (torch.randn(batch_size, 6, WIDTH),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
