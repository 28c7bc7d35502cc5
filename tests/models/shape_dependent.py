"""Python ints taken from shapes and used where torch.fx cannot follow them, so `ftc compile`
(frontend auto) must fall back to torch.export.

With t = x.shape[1] a Proxy under torch.fx.symbolic_trace, `torch.ones(t, t)` raises
("ones() takes 1 positional argument but 2 were given") and so would `range(t)` ("'Proxy'
object cannot be interpreted as an integer"); torch.export handles both. The shape-derived
ints are also used for `torch.arange(t)`, for a scale `1 / math.sqrt(d)`, for a Python loop
unrolled t times, and for views (`reshape(b * t, d)` with b the batch size), so a pipeline
that bakes in the traced batch size fails `ftc check --batch-size 3`. There is no `if` on a
tensor value.

Inputs are float sequences [B, 8, 16]; output is [B, 8, 16]. Loss: MSE against a float target
sequence of the same shape [B, 8, 16].
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LENGTH = 8
WIDTH = 16


class ShapeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.pos = nn.Embedding(LENGTH, WIDTH)
        self.mix = nn.Linear(WIDTH, WIDTH)
        self.out = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        b, t, d = x.shape
        x = x + self.pos(torch.arange(t))
        q, k, v = self.qkv(x).split(d, dim=-1)
        scores = q @ k.transpose(1, 2) / math.sqrt(d)
        causal = torch.ones(t, t).tril()
        scores = scores.masked_fill(causal == 0, float("-inf"))
        h = F.softmax(scores, dim=-1) @ v
        # A per-position loop over a Python int range: unrolled t times.
        steps = [h[:, i] * (i + 1) / t for i in range(t)]
        h = h + torch.stack(steps, dim=1)
        h = self.mix(h.reshape(b * t, d)).reshape(b, t, d)
        return self.out(F.gelu(h))


def build_model():
    return ShapeDependent()


def example_inputs(batch_size):
    return (torch.randn(batch_size, LENGTH, WIDTH),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
