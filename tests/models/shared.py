"""Shared weights and bare parameters.

- one submodule (`self.block`) called at three places in a row, so its parameters get gradient
  from three uses that may land in different stages;
- a tied output layer, F.linear(h, self.embed.weight), reading the embedding table at both ends
  of the network;
- a bare nn.Parameter (`self.scale`) used directly in forward, at two places;
- a tuple output (logits, hidden).

Inputs are token ids, a LongTensor [B, 6] in [0, 50); outputs are logits [B, 6, 50] and the
last hidden state [B, 6, 16]. Loss: token cross-entropy of the logits; `target` is a LongTensor
[B, 6] of next-token ids in [0, 50).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 50
LENGTH = 6
WIDTH = 16


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.block = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh())
        self.mix = nn.Linear(WIDTH, WIDTH)
        self.scale = nn.Parameter(torch.ones(WIDTH))

    def forward(self, idx):
        h = self.embed(idx) * self.scale
        h = self.block(h)
        h = self.block(self.mix(h)) + h
        h = self.block(h)
        logits = F.linear(h * self.scale, self.embed.weight)
        return logits, h


def build_model():
    return Shared()


def example_inputs(batch_size):
    return (torch.randint(0, VOCAB, (batch_size, LENGTH)),)


def loss_fn(output, target):
    logits, _ = output
    return F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))
