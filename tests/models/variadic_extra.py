"""A model with a named input, then a variable number of extra ones, then keyword-only options
with defaults (`forward(self, x, *extra, scale=2.0, normalize=False)`), as wrappers that pass
extra tensors along do. The extras are unpacked, counted and indexed; the options keep their
defaults.

Inputs are float tensors [B, 8], [B, 8], [B, 8]; output [B, 4]. Loss: MSE against a float
target [B, 4].
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.gate = nn.Linear(8, 8)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x, *extra, scale=2.0, normalize=False):
        bias, gate = extra
        h = F.relu(self.inp(x) + bias) * torch.sigmoid(self.gate(gate))
        if normalize:
            h = F.normalize(h, dim=-1)
        h = self.mid(h) * scale / len(extra)
        return self.out(h + extra[0])


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8), torch.randn(batch_size, 8), torch.randn(batch_size, 8))


def loss_fn(output, target):
    return F.mse_loss(output, target)
