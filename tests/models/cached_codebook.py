"""A codebook that caches, on its first call, a tensor computed from its buffers as a plain
attribute (as transformers' MimiEuclideanCodebook caches `self._embed`), beside a module of the
model's own that branches on self.training (so ftc runs forward in both modes before tracing).

Inputs: x [B, 8]. Output: [B, 8]. Loss: mean squared error against `target`.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Codebook(nn.Module):
    def __init__(self, codes, width):
        super().__init__()
        self.embed_sum = nn.Buffer(torch.randn(codes, width))
        self.cluster_usage = nn.Buffer(torch.rand(codes) + 0.5)
        self._embed = None

    @property
    def embed(self):
        if self._embed is None:
            self._embed = self.embed_sum / self.cluster_usage[:, None]
        return self._embed

    def forward(self, x):
        return x @ self.embed.T


class Damp(nn.Module):
    def forward(self, x):
        return 0.9 * x if self.training else x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.damp = Damp()
        self.codebook = Codebook(16, 8)
        self.out = nn.Linear(16, 8)

    def forward(self, x):
        h = self.damp(self.inp(x))
        return self.out(self.codebook(h))


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
