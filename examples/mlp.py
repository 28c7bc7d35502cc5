"""A plain multi-layer perceptron: 64 input features, a stack of Linear + ReLU hidden layers
and a 10-way linear classifier. The simplest possible pipeline: one straight chain of ops with
no skips, shared weights or state, so every stage boundary carries exactly one activation.

Inputs are float feature vectors [B, 64]. The loss is cross-entropy; `target` is what a
classification data set yields: integer class labels, a LongTensor [B] with values in [0, 10).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

IN_FEATURES = 64
HIDDEN = (256, 256, 128, 128, 64)
CLASSES = 10


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        widths = (IN_FEATURES,) + HIDDEN
        self.hidden = nn.ModuleList([nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.classifier = nn.Linear(widths[-1], CLASSES)

    def forward(self, x):
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.classifier(x)


def build_model():
    return MLP()


def example_inputs(batch_size):
    return (torch.randn(batch_size, IN_FEATURES),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
