"""An embedding with max_norm: its forward renormalizes rows of its weight in place, which
schedule async must refuse (its forwards run on stashed copies of the weights)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, WIDTH = 64, 16


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH, max_norm=1.0)
        self.layers = nn.ModuleList([nn.Linear(WIDTH, WIDTH) for _ in range(5)])
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, idx):
        h = self.emb(idx) * 3
        for layer in self.layers:
            h = torch.tanh(layer(h)) + h
        return self.head(h)


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randint(0, VOCAB, (batch_size, 5)),)


def example_targets(batch_size):
    return torch.randint(0, VOCAB, (batch_size, 5))


def loss_fn(output, target):
    return F.cross_entropy(output.flatten(0, 1), target.flatten())
