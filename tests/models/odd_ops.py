"""Ops and values that once kept the compiler from splitting a model, or spelled it badly:

- `~mask` (operator.invert) was taken for an in-place op like `x += y`, so every reader of the
  mask had to share one stage (the model could not be split at all);
- torch.linalg / torch.special / torch.fft functions came out as their private bindings
  (`torch._C._linalg.linalg_vector_norm`);
- a LEAF_MODULES module returns a dict whose second item the model reads only at the end: the
  dict cannot cross devices, and the late read used to glue everything between into one stage.

Inputs: float [B, 16] and a bool mask [B, 16]; outputs: [B, 16] and a scalar. Loss: MSE on the
first output plus 0.01 times the second.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Gate(nn.Module):
    """Kept whole by fx (LEAF_MODULES); returns a dict, as many routers and HF blocks do."""

    def __init__(self, width):
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        logits = self.proj(x)
        return {"out": x * torch.sigmoid(logits), "aux": logits.softmax(-1).pow(2).mean()}


LEAF_MODULES = (Gate,)


class OddOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate(16)
        self.layers = nn.ModuleList([nn.Linear(16, 16) for _ in range(4)])
        self.head = nn.Linear(9 + 16, 16)

    def forward(self, x, mask):
        h = x.masked_fill(~mask, 0.0)
        routed = self.gate(h)
        h = routed["out"]
        for layer in self.layers:
            h = torch.relu(layer(h))
        h = h / torch.linalg.vector_norm(h, dim=-1, keepdim=True).clamp_min(1e-6) + torch.special.expit(h)
        spectrum = torch.fft.rfft(h, dim=-1).abs()
        out = self.head(torch.cat([spectrum, h], -1)).masked_fill(mask, 0.0)
        return out, routed["aux"]


def build_model():
    return OddOps()


def example_inputs(batch_size):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(batch_size, 16, generator=generator), torch.rand(batch_size, 16, generator=generator) > 0.5)


def loss_fn(output, target):
    out, aux = output
    return F.mse_loss(out, target) + 0.01 * aux
