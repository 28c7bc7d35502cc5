"""A view of a parameter made in the middle and read at the end: `proj` projects the input in
the first layers, `back = self.proj.t()` is taken halfway and used by the last layer. Split in
three, the middle stage sends the view to the last as a value, and its gradient comes back to
the middle stage, while the first stage's use of `proj` adds its own gradient. Autograd may
adopt the view's gradient tensor itself as `proj.grad` and add the other gradient into it in
place: whoever still holds that tensor sees it change.

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
        self.body = nn.ModuleList([nn.Linear(WIDTH, WIDTH) for _ in range(6)])

    def forward(self, x):
        h = x @ self.proj
        for layer in self.body[:2]:
            h = torch.tanh(layer(h)) + h
        back = self.proj.t()
        for layer in self.body[2:]:
            h = torch.tanh(layer(h)) + h
        return h @ back


def build_model():
    return ParamView()


def example_inputs(batch_size):
    return (torch.randn(batch_size, IN),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
