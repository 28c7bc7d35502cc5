"""LEAF_MODULES: a custom module whose forward branches on a tensor value
(`if x.sum() > 0:`), which torch.fx cannot trace (a Proxy cannot be used as a condition), so
listing its class in LEAF_MODULES is the only way to compile the model; it must be kept whole
as one call. It is used twice (two instances) between ordinary traceable layers, and holds
parameters of its own, whose gradients must come back.

Inputs are float [B, 10]; output is [B, 3]. Loss: cross-entropy against integer class labels,
a LongTensor [B] in [0, 3).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

IN = 10
WIDTH = 16
CLASSES = 3


class Gate(nn.Module):
    """Picks one of two branches from the sign of the batch's sum: data-dependent Python."""

    def __init__(self, width):
        super().__init__()
        self.positive = nn.Linear(width, width)
        self.negative = nn.Linear(width, width)

    def forward(self, x):
        if x.sum() > 0:
            return torch.tanh(self.positive(x))
        return torch.sigmoid(self.negative(x)) - 0.5


LEAF_MODULES = (Gate,)


class WithLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(IN, WIDTH)
        self.gate1 = Gate(WIDTH)
        self.fc2 = nn.Linear(WIDTH, WIDTH)
        self.gate2 = Gate(WIDTH)
        self.fc3 = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        h = self.gate1(h) + h
        h = self.fc2(h) - 0.1
        h = self.gate2(h)
        return self.fc3(h)


def build_model():
    return WithLeaf()


def example_inputs(batch_size):
    return (torch.randn(batch_size, IN),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
