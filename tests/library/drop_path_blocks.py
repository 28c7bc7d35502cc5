"""A stand-in for a library's layers (timm's, transformers'), which model files import from
outside their own folder: a residual block with stochastic depth that branches on
`self.training` as transformers' SwinDropPath does, the same as a function that takes the flag
(timm's drop_path), a layer with weights that branches on it and a module that holds one, and beside them the reads of the
flag that such libraries make harmlessly (gradient checkpointing, attention dropout, functional dropout, a
BatchNorm layer counting batches)."""

import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F


def drop_path(x, p: float, training: bool):
    """Stochastic depth as a function, which a model's own block may call (timm's)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], 1).bernoulli_(1 - p)
    return x * keep / (1 - p)


class DropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class NoisyLinear(nn.Linear):
    """A layer that adds noise to its input when training (NoisyNet-like): all its weights are
    its own, so a stage calls it whole as it calls a torch.nn layer, and follows its mode."""

    def forward(self, x):
        if self.training:
            x = x + 0.1 * torch.rand_like(x)
        return super().forward(x)


class NoisyProjection(nn.Module):
    """The same noise before a layer it holds: a call of the whole module would take that layer
    from the partitioner, so its branch stays op by op and is named instead."""

    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        if self.training:
            x = x + 0.1 * torch.randn_like(x)
        return self.fc(x)


class Block(nn.Module):
    def __init__(self, width: int, drop_path: float, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.BatchNorm1d(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.drop_path = DropPath(drop_path)
        self.dropout = dropout
        self.gradient_checkpointing = False

    def forward(self, x):
        if self.gradient_checkpointing and self.training:
            return torch.utils.checkpoint.checkpoint(self._mixed, x, use_reentrant=False)
        return self._mixed(x)

    def _mixed(self, x):
        q, k, v = self.qkv(self.norm(x.transpose(1, 2)).transpose(1, 2)).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        h = F.dropout(self.proj(a), self.dropout, training=self.training)
        return x + self.drop_path(h)
