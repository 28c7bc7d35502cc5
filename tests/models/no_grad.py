"""`with torch.no_grad():` inside forward: torch.fx records no context managers, so unless ftc
notes the grad mode of every op, the stage code would update the buffer with autograd on (the
buffer would join the graph) and treat `g` as differentiable: wrong gradients, silently.

Inputs are float [B, 8]; output [B, 8]. Loss: MSE against a float target [B, 8].
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

WIDTH = 8
MOMENTUM = 0.9


class NoGradInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(WIDTH, WIDTH)
        self.b = nn.Linear(WIDTH, WIDTH)
        self.c = nn.Linear(WIDTH, WIDTH)
        self.register_buffer("ema", torch.zeros(WIDTH))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        with torch.no_grad():
            self.ema.copy_(self.ema * MOMENTUM + (1 - MOMENTUM) * h.mean(0))
            g = h * 2
        h = self.b(h + g - self.ema)
        return self.c(F.relu(h))


def build_model():
    return NoGradInside()


def example_inputs(batch_size):
    return (torch.randn(batch_size, WIDTH),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
