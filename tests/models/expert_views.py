"""Llama 4's mixture-of-experts layer in miniature: every token goes to every expert, scaled by
its router score, as one [EXPERTS * tokens, WIDTH] block that a batched matmul takes as
`view(EXPERTS, -1, WIDTH)`. The -1's of these views make torch's shape solver add a guard it
cannot prove for every batch size, `Eq(6*B*Min(8, 48*B), 48*B)`, though it holds for all, and
refuse a named batch dimension for it.

Input and output: float features [B, TOKENS, WIDTH]. Loss: mean squared error.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPERTS = 4
TOKENS = 6
WIDTH = 8


class ExpertViews(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(WIDTH, EXPERTS)
        self.experts = nn.Parameter(torch.randn(EXPERTS, WIDTH, WIDTH) / WIDTH**0.5)

    def forward(self, x):
        tokens = x.reshape(-1, WIDTH)
        scores = torch.sigmoid(self.router(tokens))
        routed = tokens.repeat(EXPERTS, 1) * scores.transpose(0, 1).reshape(-1, 1)
        out = torch.bmm(routed.view(EXPERTS, -1, WIDTH), self.experts).view(-1, WIDTH)
        return out.reshape(EXPERTS, -1, WIDTH).sum(0).view_as(x)


def build_model():
    return ExpertViews()


def example_inputs(batch_size):
    return (torch.randn(batch_size, TOKENS, WIDTH),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
