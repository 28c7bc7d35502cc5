"""A Mamba-like model whose selective scan is a Python loop over time steps, as research code
writes it before a fused kernel exists: every step is a handful of small ops, so the traced
graph grows with the sequence (5,066 ops at 128 steps over 3 blocks). The step count comes from
the environment variable FTC_BENCH_STEPS (128 when unset); bench/compile_scale.py compiles it
to show how partitioning scales with graph size rather than with parameters.
"""

import os

import torch
import torch.nn.functional as F
from torch import nn

STEPS = int(os.environ.get("FTC_BENCH_STEPS", "128"))
WIDTH, STATE, VOCAB, BLOCKS = 16, 4, 50, 3


class SelectiveScan(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.inp = nn.Linear(WIDTH, 2 * WIDTH)
        self.conv = nn.Conv1d(WIDTH, WIDTH, 3, padding=2, groups=WIDTH)
        self.dt = nn.Linear(WIDTH, WIDTH)
        self.B = nn.Linear(WIDTH, STATE)
        self.C = nn.Linear(WIDTH, STATE)
        self.A_log = nn.Parameter(torch.zeros(WIDTH, STATE))
        self.out = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        u, gate = self.inp(self.norm(x)).chunk(2, -1)
        u = F.silu(self.conv(u.transpose(1, 2))[..., :STEPS].transpose(1, 2))
        dt = F.softplus(self.dt(u))
        A = -torch.exp(self.A_log)
        B, C = self.B(u), self.C(u)
        h = x.new_zeros(x.shape[0], WIDTH, STATE)
        ys = []
        for t in range(STEPS):
            h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]
            ys.append((h * C[:, t, None, :]).sum(-1))
        return x + self.out(torch.stack(ys, 1) * F.silu(gate))


class RecurrentScan(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(SelectiveScan() for _ in range(BLOCKS))
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build_model():
    return RecurrentScan()


def example_inputs(batch_size):
    return (torch.randint(0, VOCAB, (batch_size, STEPS)),)


def loss_fn(out, target):
    return F.cross_entropy(out.flatten(0, 1), target.flatten())
