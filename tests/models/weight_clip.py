"""A WGAN-style critic that clamps its weights in place under no_grad at the start of forward:
the clamped weight is then saved for the backward, so in a pipeline the next micro-batch's
forward changes it before this micro-batch's backward."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Critic(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(8, 16)
        self.l2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        with torch.no_grad():
            self.l2.weight.clamp_(-0.05, 0.05)
        return self.head(F.leaky_relu(self.l2(F.leaky_relu(self.l1(x), 0.2)), 0.2))


def build_model():
    return Critic()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
