"""Buffers updated by forward: a BatchNorm1d (running_mean, running_var, num_batches_tracked)
and two custom buffers.

- `steps`, an int64 step counter bumped with `self.steps.add_(1)`; nothing reads the result,
  so the op is kept only for its side effect (dead-code elimination must not drop it);
- `ema`, a running mean of an activation, updated with
  `self.ema.copy_(self.ema * MOMENTUM + (1 - MOMENTUM) * h.mean(0).detach())` (written with
  copy_ because torch.fx cannot trace a `with torch.no_grad():` block) and then READ by the
  rest of forward, which centres the activation on it; so the update must happen before the
  read, in the stage that holds the buffer.

`ftc check` compares every buffer after one step, so a lost or doubled update shows up.

Inputs are float [B, 12, 4] (channels first, 4 positions, so that BatchNorm1d has more than one
value per channel even at batch size 1); output is [B, 4]. Loss: cross-entropy against integer class labels,
a LongTensor [B] in [0, 4).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

IN = 12
LENGTH = 4
WIDTH = 16
CLASSES = 4
MOMENTUM = 0.9


class WithBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(IN, WIDTH, 1)
        self.bn = nn.BatchNorm1d(WIDTH)
        self.fc2 = nn.Linear(WIDTH, WIDTH)
        self.fc3 = nn.Linear(WIDTH, CLASSES)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(WIDTH))

    def forward(self, x):
        self.steps.add_(1)
        h = F.relu(self.bn(self.conv(x))).mean(-1)
        h = self.fc2(h)
        self.ema.copy_(self.ema * MOMENTUM + (1 - MOMENTUM) * h.mean(0).detach())
        h = F.relu(h - self.ema)
        return self.fc3(h)


def build_model():
    return WithBuffers()


def example_inputs(batch_size):
    return (torch.randn(batch_size, IN, LENGTH),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
