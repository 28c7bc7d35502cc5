"""A top-1 router that casts its classifier at every call, as transformers' Switch Transformers
and NLLB-MoE routers do (`self.classifier = self.classifier.to(self.dtype)`, a no-op once the
model has that dtype). Under torch.export the module's conversion swapped its fake parameters
and failed ("_apply(): Couldn't swap Linear.weight").

Inputs are float [B, 16]; output [B, 16]. Loss: MSE against a float target [B, 16].
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

WIDTH = 16
EXPERTS = 4


class Router(nn.Module):
    def __init__(self):
        super().__init__()
        self.dtype = torch.float32
        self.classifier = nn.Linear(WIDTH, EXPERTS, bias=False)

    def forward(self, x):
        self.classifier = self.classifier.to(self.dtype)
        return F.softmax(self.classifier(x.to(self.dtype)), dim=-1).to(x.dtype)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(WIDTH, WIDTH)
        self.router = Router()
        self.experts = nn.Linear(WIDTH, WIDTH * EXPERTS)
        self.out = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        gates = self.router(h)
        mixed = (self.experts(h).unflatten(-1, (EXPERTS, WIDTH)) * gates.unsqueeze(-1)).sum(-2)
        return self.out(mixed)


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, WIDTH),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
