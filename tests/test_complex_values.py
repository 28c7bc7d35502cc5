"""A complex value crossing stages (a spectrum filtered in the frequency domain): the engine made
a received value a gradient leaf only if it was a floating tensor, so no gradient went back
through a complex one and every stage before it trained without it, silently (`ftc check`,
which runs its own executor, passed). Training in local mode must give mode single's losses."""

from __future__ import annotations

import json

from ftc.check import check_pipeline
from ftc.compiler import CompileOptions, compile_model

from .conftest import assert_local_trains_like_single

MODEL = """
import torch
import torch.nn as nn
import torch.nn.functional as F


class Spectral(nn.Module):
    def __init__(self, width=16, depth=6):
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.filters = nn.ParameterList(
            [nn.Parameter(torch.randn(width // 2 + 1, 2) * 0.3 + torch.tensor([1.0, 0.0])) for _ in range(depth)]
        )
        self.out = nn.Linear(width, width)

    def forward(self, x):
        h = self.inp(x)
        spectrum = torch.fft.rfft(h, dim=-1)
        for weight in self.filters:
            spectrum = spectrum * torch.view_as_complex(weight)
            spectrum = spectrum / (1 + spectrum.abs())
        return self.out(torch.fft.irfft(spectrum, n=16, dim=-1))


def build_model():
    return Spectral()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 16),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
"""


def test_a_complex_value_between_stages_carries_its_gradient(tmp_path):
    path = tmp_path / "spectral.py"
    path.write_text(MODEL)
    folder = compile_model(path, tmp_path / "generated", CompileOptions(stages=2)).folder
    crossing = json.loads((folder / "pipeline.json").read_text())["values"].values()
    assert any(spec.get("dtype") == "complex64" and spec.get("requires_grad") for spec in crossing)
    assert check_pipeline(folder, batch_size=4).ok
    assert_local_trains_like_single(folder)
