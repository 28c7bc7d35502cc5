"""An EMA teacher (BYOL, DINO, mean teacher) updated inside forward, under no_grad, from the
student's weights taken with `zip(self.teacher.parameters(), self.student.parameters())`. fx
hands those out as the real tensors, not as traced values, so the in-place update would run once
while tracing and be missing from the stage code; `--frontend auto` must take export, which
records it, and training must follow the plain model.

Inputs are float [B, 16]; outputs (student prediction [B, 8], teacher target [B, 8]).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.student = mlp()
        self.teacher = mlp()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.pred = nn.Linear(8, 8)

    def forward(self, x):
        s = self.pred(self.student(x))
        with torch.no_grad():
            for pt, ps in zip(self.teacher.parameters(), self.student.parameters()):
                pt.mul_(0.9).add_(ps.detach(), alpha=0.1)
            t = self.teacher(x)
        return s, t


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 16),)


def loss_fn(output, target):
    s, t = output
    return F.mse_loss(F.normalize(s, dim=-1), F.normalize(t, dim=-1))
