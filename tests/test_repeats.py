"""Repeated ops (ftc/repeats.py): value metadata and analytic costs must be exactly what running
every node gives, for models with repeated blocks, in-place updates through views, buffers,
shared weights, leaf modules and shape-dependent code."""

from __future__ import annotations

import textwrap

import pytest

import ftc.frontends.meta as meta_module
import ftc.profiling.analytic as analytic_module
from ftc.frontends import trace
from ftc.ir import dumps
from ftc.profiling import DeviceModel, profile_analytic
from ftc.repeats import Repeats
from ftc.runtime.model_file import load_model_file

from .conftest import EXAMPLES, MODELS

# Blocks whose repeats alias: a fresh tensor is written in place through a view by a value that
# requires grad (so the fresh tensor comes to require grad), a module hands back its own buffer,
# and ops that return their input unchanged (contiguous, to the same dtype).
ALIASING = """
import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("scale", torch.ones(8))

    def forward(self, x, seed):
        buf = seed * 1.0
        buf[:, :4].copy_(self.fc(x)[:, :4])
        y = (buf + x).contiguous().to(torch.float32)
        return y * self.scale


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))

    def forward(self, x, seed):
        for block in self.blocks:
            x = block(x, seed)
        return x


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8), torch.zeros(batch_size, 8))
"""

PATHS = [
    *(EXAMPLES / f"{name}.py" for name in ("gpt", "resnet", "unet", "two_tower")),
    *(MODELS / f"{name}.py" for name in ("inplace", "buffers", "shared", "leaf", "shape_dependent", "no_grad")),
]  # fmt: skip


def annotated(path, monkeypatch, repeats: bool) -> tuple[str, int]:
    """The traced and profiled graph as IR JSON, and how many nodes were stood in for."""
    replayed = []
    replay = Repeats.replay

    def counting_replay(self, key):
        result = replay(self, key)
        replayed.append(result[0])
        return result

    with monkeypatch.context() as patch:
        patch.setattr(Repeats, "replay", counting_replay)
        if not repeats:
            for module in (meta_module, analytic_module):
                patch.setattr(module, "repeat_key", lambda *args: None)
        model_file = load_model_file(path)
        graph, model, batch = trace(model_file, 4, "auto", path.stem)
        graph = profile_analytic(graph, model, batch, DeviceModel())
    return dumps(graph), sum(replayed)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_same_graph_as_running_every_node(path, monkeypatch):
    with_repeats, _ = annotated(path, monkeypatch, repeats=True)
    every_node, replayed = annotated(path, monkeypatch, repeats=False)
    assert replayed == 0
    assert with_repeats == every_node


def test_aliasing_blocks(tmp_path, monkeypatch):
    path = tmp_path / "aliasing.py"
    path.write_text(textwrap.dedent(ALIASING))
    with_repeats, replayed = annotated(path, monkeypatch, repeats=True)
    every_node, _ = annotated(path, monkeypatch, repeats=False)
    assert replayed > 0  # the later blocks' products and sums were stood in for
    assert with_repeats == every_node


def test_gpt_blocks_are_stood_in_for(monkeypatch):
    _, replayed = annotated(EXAMPLES / "gpt.py", monkeypatch, repeats=True)
    assert replayed > 0
