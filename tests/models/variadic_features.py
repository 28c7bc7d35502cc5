"""A model that takes a variable number of feature tensors (`forward(self, *features)`), as
multi-view and multi-modal models do: one encoder per feature, run in a loop over the tuple and
summed, then a head. How many features there are is fixed by example_inputs().

Inputs are three float tensors [B, 6], [B, 5], [B, 4]; output [B, 3]. Loss: MSE against a
float target [B, 3].
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

WIDTHS = (6, 5, 4)
HIDDEN = 16


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleList([nn.Linear(width, HIDDEN) for width in WIDTHS])
        self.mix = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, 3)

    def forward(self, *features):
        if len(features) != len(self.encoders):
            raise ValueError(f"expected {len(self.encoders)} features, got {len(features)}")
        first, *others = features
        total = self.encoders[0](first)
        for encoder, feature in zip(self.encoders[1:], others):
            total = total + torch.tanh(encoder(feature))
        for feature in features:
            total = total + feature.mean(-1, keepdim=True)
        total = total * features[-1][:, :1]
        return self.head(F.relu(self.mix(total)))


def build_model():
    return Net()


def example_inputs(batch_size):
    return tuple(torch.randn(batch_size, width) for width in WIDTHS)


def loss_fn(output, target):
    return F.mse_loss(output, target)
