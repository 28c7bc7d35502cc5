"""Values computed by code outside the model file's folder (an installed library, a package in
another directory) are named after the variables that code assigns them to, as the model file's
own are; the IR names such files by their path below their sys.path entry, so the generated
folder is the same bytes wherever the library and the model file are."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ftc.check import check_pipeline
from ftc.compiler import CompileOptions, compile_model

from .conftest import ROOT

# The library: a package that is not beside the model file. Its layer ScaleNorm has no
# submodules; its forward assigns names the stage module also uses (F, the input's x).
BLOCKS = '''
import torch
import torch.nn as nn


class ScaleNorm(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(width))

    def forward(self, x):
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return normed * self.gain


class Attention(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, hidden_states):
        query, key, value = self.qkv(hidden_states).chunk(3, dim=-1)
        scores = torch.softmax(query @ key.transpose(-2, -1), dim=-1)
        mixed = scores @ value
        return self.proj(mixed)


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = ScaleNorm(width)
        self.attn = Attention(width)

    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.attn(self.norm(hidden_states))
        hidden_states = residual + hidden_states
        return hidden_states


class Net(nn.Module):
    def __init__(self, width=16, depth=2):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        F = x.mean(1)
        return self.head(F)
'''

# The model file, in a folder of its own: its class inherits the library's forward.
MODEL = '''
import torch
import torch.nn.functional as F

from {package}.blocks import Net


class Model(Net):
    """The library's network; forward is the library's."""


def build_model():
    return Model()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 6, 8),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
'''


def _layout(root: Path, package: str) -> Path:
    """root/lib/<package>/blocks.py and root/models/model.py; the model file's path."""
    (root / "lib" / package).mkdir(parents=True)
    (root / "lib" / package / "__init__.py").write_text("")
    (root / "lib" / package / "blocks.py").write_text(BLOCKS)
    (root / "models").mkdir()
    (root / "models" / "model.py").write_text(MODEL.format(package=package))
    return root / "models" / "model.py"


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_forward_in_a_package_elsewhere_names_the_values_it_assigns(tmp_path, monkeypatch, frontend):
    package = f"ftc_test_netlib_{frontend}"
    model_path = _layout(tmp_path, package)
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    monkeypatch.delitem(sys.modules, package, raising=False)
    compiled = compile_model(model_path, tmp_path / "out", CompileOptions(stages=2, batch_size=4, frontend=frontend))
    code = "".join((compiled.folder / f"stage{k}.py").read_text() for k in range(2))
    for name in ("query", "key", "value"):
        assert re.search(rf"\b{name} = \w+\[\d\]", code) or re.search(rf"\b{name} = \w+\.chunk", code), code
    assert re.search(r"\bscores = (torch|F)\.softmax\(", code) and re.search(r"\bmixed = scores @ value\b", code), code
    assert re.search(r"\bresidual(_\d+)? = ", code) is None  # `residual = hidden_states` is no op
    # `hidden_states = self.attn(...)` names what Attention.forward returns (`return self.proj(mixed)`)
    assert re.search(r'\bhidden_states(_\d+)? = self\.blocks\["0"\]\.attn\.proj\(mixed\)', code), code
    assert re.search(r"\bhidden_states(_\d+)? = x\w* \+ hidden_states\b", code), code  # residual + hidden_states
    # the library's layer without submodules: its value is named after its attribute, as a call
    assert re.search(r'\bnorm(_\d+)? = normed\w* \* self\.blocks\["0"\]\.norm\.gain', code), code
    assert re.search(r'self\.blocks\["0"\]\.attn\.qkv\(norm\)', code), code
    # names the stage module uses itself stay distinct: `F = x.mean(1)` is not torch's F
    assert re.search(r"\bF_\w* = \w+\.mean\(1\)", code) and "F.mse_loss" not in code, code
    assert f"{package}/blocks.py:" in code  # the block comments point into the library
    sources = {node["source"] for node in json.loads((compiled.folder / "ir.json").read_text())["nodes"]}
    assert {s.rpartition(":")[0] for s in sources} <= {"", f"{package}/blocks.py"}, sources
    assert check_pipeline(compiled.folder, batch_size=4).ok
    assert check_pipeline(compiled.folder, batch_size=3).ok


def test_the_generated_folder_is_the_same_bytes_wherever_library_and_model_are(tmp_path):
    """Two checkouts of the same library and model file, in different folders, each compiled
    in a process of its own with its library on PYTHONPATH: the same stage files and ir.json."""
    folders = []
    for place in ("a", "b/deeper"):
        root = tmp_path / place
        model_path = _layout(root, "ftc_test_netlib")
        environment = {**os.environ, "PYTHONPATH": str(root / "lib")}
        done = subprocess.run(
            [sys.executable, "-m", "ftc.cli", "compile", str(model_path), "--stages", "2", "-o", str(root / "out")],
            capture_output=True, text=True, cwd=ROOT, env=environment, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        folders.append(root / "out" / "model")
    names = ["ir.json", "stage0.py", "stage1.py"]
    first, second = ([(folder / name).read_bytes() for name in names] for folder in folders)
    assert first == second
    text = b"".join(first).decode()
    assert "ftc_test_netlib/blocks.py:" in text and str(tmp_path) not in text
