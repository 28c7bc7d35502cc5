"""A view of a parameter computed early and read late: `back = self.proj.t()` is taken at the
start of forward and used by the last layer, so a split sends the view from the first stage to
the last as a value, and its gradient comes back to the stage that holds `proj`, which also
uses `proj` itself. Autograd may adopt that gradient tensor as `proj.grad` and add the other
use's gradient into it in place: whoever still holds the tensor sees it change.

Inputs are float [B, 12]; output [B, 12]. Loss: MSE against a float target [B, 12].
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

IN = 12
WIDTH = 24


class ParamView(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(IN, WIDTH) * 0.2)
        self.body = nn.ModuleList([nn.Linear(WIDTH, WIDTH) for _ in range(4)])

    def forward(self, x):
        back = self.proj.t()
        h = x @ self.proj
        for layer in self.body:
            h = torch.tanh(layer(h)) + h
        return h @ back


def build_model():
    return ParamView()


def example_inputs(batch_size):
    return (torch.randn(batch_size, IN),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
