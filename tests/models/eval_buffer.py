"""A running mean that forward updates only in training (`if self.training:`) and a step counter
it reassigns (`+=`, which needs export), in a module that also holds a layer (so a stage cannot
call it whole): the stage code keeps the branch as traced in training mode, so a held-out
evaluation of the stages updates the buffers where the model does not.

Inputs are float [B, 8]; output logits [B, 3]; loss: cross-entropy against class indices.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Centre(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.9).add_(x.mean(0), alpha=0.1)
                self.steps += 1
        return self.proj(x - self.mean)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.centre = Centre(16)
        self.hidden = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.centre(F.relu(self.inp(x)))
        return self.head(F.relu(self.hidden(h)))


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
