"""One BatchNorm called at both ends of the network: each call updates its running statistics,
in order, so both calls (and every other reader of those buffers) must share a stage, or the
devices would hold copies of the statistics that miss each other's updates.

Inputs are features [B, 16]; outputs are logits [B, 4]. Loss: cross-entropy against a
LongTensor [B] of classes in [0, 4).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class SharedNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.norm = nn.BatchNorm1d(32)
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(6))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        h = self.norm(self.inp(x))
        for layer in self.layers:
            h = torch.relu(layer(h))
        return self.head(self.norm(h))


def build_model():
    return SharedNorm()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 16),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
