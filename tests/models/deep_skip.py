"""A chain of 12 Linear layers with two long-range uses: the activation after the first layer
is added back before the last hidden layer (a skip spanning most of the network), and the
model input itself is concatenated into the input of the final layer. In a pipeline, both the
early activation and the model's input must be carried (or sent) past every middle stage.

Inputs are float [B, 16]; output is [B, 4]. Loss: MSE against a float regression target [B, 4].
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

IN = 16
WIDTH = 32
DEPTH = 12  # Linear layers in all: one in, DEPTH - 2 hidden, one head
OUT = 4


class DeepSkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(IN, WIDTH)
        self.hidden = nn.ModuleList([nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH - 2)])
        self.head = nn.Linear(WIDTH + IN, OUT)

    def forward(self, x):
        early = F.relu(self.first(x))
        h = early
        for i, layer in enumerate(self.hidden):
            if i == len(self.hidden) - 1:
                h = h + early  # the long skip, just before the last hidden layer
            h = F.relu(layer(h))
        return self.head(torch.cat([h, x], dim=1))


def build_model():
    return DeepSkip()


def example_inputs(batch_size):
    return (torch.randn(batch_size, IN),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
