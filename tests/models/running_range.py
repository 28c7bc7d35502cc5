"""A running range kept in buffers, as transformers' I-BERT QuantAct keeps it: the first training
step sets it (`if self.low.min() > -1e-5 and self.high.max() < 1e-5:`, still all zeros), later
steps average it. torch.export cannot trace that `if` on buffer values; WHERE = True writes the
choice with torch.where, which it can.

Inputs are float [B, 16]; output [B, 16]. Loss: MSE against a float target [B, 16].
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

WIDTH = 16
WHERE = False


class RangeTracker(nn.Module):
    def __init__(self, momentum=0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("low", torch.zeros(1))
        self.register_buffer("high", torch.zeros(1))

    def forward(self, x):
        if self.training:
            low, high = x.detach().min(), x.detach().max()
            if WHERE:
                first = (self.low.min() > -1e-5) & (self.high.max() < 1e-5)
                self.low = torch.where(first, self.low + low, self.low * self.momentum + low * (1 - self.momentum))
                self.high = torch.where(first, self.high + high, self.high * self.momentum + high * (1 - self.momentum))
            elif self.low.min() > -1e-5 and self.high.max() < 1e-5:
                self.low = self.low + low
                self.high = self.high + high
            else:
                self.low = self.low * self.momentum + low * (1 - self.momentum)
                self.high = self.high * self.momentum + high * (1 - self.momentum)
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(WIDTH, WIDTH)
        self.range1 = RangeTracker()
        self.fc2 = nn.Linear(WIDTH, WIDTH)
        self.range2 = RangeTracker()

    def forward(self, x):
        return self.range2(self.fc2(torch.tanh(self.range1(self.fc1(x)))))


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, WIDTH),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
