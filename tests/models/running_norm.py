"""A batch norm written in the model file, as research code writes one: its own weight and bias,
running statistics in buffers, and a branch on `self.training` (batch statistics, which it also
folds into the running ones, when training; the running ones in eval mode). Traced op by op, the
stages would normalize by batch statistics in eval mode too; the module holds no other layer, so
ftc calls it whole and the stages follow train() and eval() as the model does.

Inputs are float [B, 12]; output [B, 3]. Loss: cross-entropy against a class id [B] in [0, 3).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class RunningNorm(nn.Module):
    def __init__(self, width: int, momentum: float = 0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("var", torch.ones(width))
        self.momentum = momentum

    def forward(self, x):
        if self.training:
            mean, var = x.mean(0), x.var(0, unbiased=False)
            with torch.no_grad():
                self.mean.lerp_(mean, self.momentum)
                self.var.lerp_(var, self.momentum)
        else:
            mean, var = self.mean, self.var
        return (x - mean) * torch.rsqrt(var + 1e-5) * self.weight + self.bias


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 24)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(24, 24), RunningNorm(24), nn.ReLU()) for _ in range(3))
        self.out = nn.Linear(24, 3)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.out(h)


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 12),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
