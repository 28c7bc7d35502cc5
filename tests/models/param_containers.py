"""Parameters in containers, under keys that are not Python names: a ParameterList, a
ParameterDict with the key "beta-x", a ModuleDict with the keys "layer-1", "0" and "class", and
a Sequential inside a ModuleDict inside a ModuleList. Split finely, a stage holds single items
of these containers, so its code must reach each one the way its container stores it.

Inputs are float [B, 16]; output is [B, 4]. Loss: cross-entropy against integer class labels,
a LongTensor [B] in [0, 4).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

WIDTH = 16
CLASSES = 4


class ParamContainers(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(WIDTH, WIDTH) * 0.1)
        self.plist = nn.ParameterList([nn.Parameter(torch.randn(WIDTH, WIDTH) * 0.1) for _ in range(3)])
        self.pdict = nn.ParameterDict({"alpha": nn.Parameter(torch.ones(WIDTH)), "beta-x": nn.Parameter(torch.zeros(WIDTH))})
        self.mdict = nn.ModuleDict({"layer-1": nn.Linear(WIDTH, WIDTH), "0": nn.Linear(WIDTH, WIDTH), "class": nn.Linear(WIDTH, WIDTH)})
        seq = lambda: nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH))  # noqa: E731
        self.nest = nn.ModuleList([nn.ModuleDict({"seq": seq()}) for _ in range(2)])
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        h = x @ self.w
        for p in self.plist:
            h = torch.tanh(h @ p)
        h = h * self.pdict["alpha"] + self.pdict["beta-x"]
        h = self.mdict["layer-1"](h)
        h = F.relu(self.mdict["0"](h))
        h = self.mdict["class"](h)
        for block in self.nest:
            h = h + block["seq"](h)
        return self.head(h)


def build_model():
    return ParamContainers()


def example_inputs(batch_size):
    return (torch.randn(batch_size, WIDTH),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
