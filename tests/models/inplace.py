"""In-place ops on activations, with values read both before and after each mutation.

Exercised: Tensor.add_, Tensor.mul_ on a view (`h.narrow(1, 0, 4).mul_(2.0)`, which mutates
`h` through the view), Tensor.relu_, nn.ReLU(inplace=True), Tensor.masked_fill_ with a mask
computed from the activation itself, and F.relu(..., inplace=True). `before` values are read
from a tensor before it is mutated and `after` values once it has been, and both reach the
output, so a compiler that moves a read past a write (or a write past a read), or that sends
a tensor to another stage before or after the wrong mutation, gives different numbers.

Every op that reads a tensor before it is mutated saves nothing for backward (adds, products
with Python scalars, sums), so the model is valid for autograd eagerly.

Inputs are float [B, 16]; output is [B, 8]. Loss: MSE against a float regression target [B, 8].
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

IN = 16
WIDTH = 16
OUT = 8


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(IN, WIDTH)
        self.fc2 = nn.Linear(WIDTH, WIDTH)
        self.fc3 = nn.Linear(WIDTH, WIDTH)
        self.act = nn.ReLU(inplace=True)
        self.out = nn.Linear(3 * WIDTH, OUT)

    def forward(self, x):
        h = self.fc1(x)
        before = h * 0.5 + 1.0           # read before the mutations
        h.add_(1.0)
        h.narrow(1, 0, 4).mul_(2.0)      # in place through a view: mutates h's first 4 columns
        total = h.sum(1, keepdim=True)   # read after
        h.relu_()
        h = self.fc2(h) + before
        snapshot = h + 0.0               # a copy taken between two mutations
        h.masked_fill_(h > 1.0, 1.0)     # mask computed from the activation itself
        h = self.act(h)
        g = self.fc3(h)
        g.mul_(total.tanh())
        g = F.relu(g, inplace=True)
        return self.out(torch.cat([g, snapshot, h], dim=1))


def build_model():
    return InPlace()


def example_inputs(batch_size):
    return (torch.randn(batch_size, IN),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
