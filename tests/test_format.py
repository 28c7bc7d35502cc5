"""black over several stage files (ftc/backend/codegen.py, format_files): formatting in worker
processes gives, in order, exactly what black gives one file at a time."""

from __future__ import annotations

import json

import black
import pytest

from ftc.backend import codegen

SOURCES = [
    "x = {  'a':37,'b':42,\n'c':927}\n",
    "def f(a,):\n  return a+1\n",
    "class Stage3(torch.nn.Module):\n    def forward(self, x): y = self.blocks['6'].attn.mask[:, :, :4, :4]; return x ** 0.5 + y\n",
    "print ( 'only one line' )\n",
]


def test_parallel_matches_one_at_a_time(monkeypatch):
    monkeypatch.setattr(codegen, "PARALLEL_FORMAT_CHARS", 0)
    expected = [black.format_str(source, mode=black.Mode()) for source in SOURCES]
    assert codegen.format_files(SOURCES) == expected


def test_bad_source_raises_from_a_worker(monkeypatch):
    monkeypatch.setattr(codegen, "PARALLEL_FORMAT_CHARS", 0)
    with pytest.raises(black.InvalidInput):
        codegen.format_files([SOURCES[0], "def broken(:\n"])


WRAPPED_BLOCKS = """
import torch
import torch.nn as nn


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 8)
        self.h = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        x = self.embed(x)
        for block in self.h:
            x = torch.tanh(block(x))
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = Body()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.transformer(x))


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""


def test_a_stage_summary_names_the_blocks_a_wrapper_holds(tmp_path, compile_to):
    """GPT-2's blocks sit in transformer.h: a summary two levels deep read "transformer ..
    transformer.h" and "transformer.h .. lm_head", which tells no stage's blocks apart."""
    path = tmp_path / "wrapped.py"
    path.write_text(WRAPPED_BLOCKS)
    folder = compile_to(path, 2, method="uniform")
    for stage in json.loads((folder / "pipeline.json").read_text())["stages"]:
        # the layers whose parameters the stage holds, in order: transformer.embed, transformer.h.0, ...
        owners = [key.rpartition(".")[0] for key in stage["state"]]
        summary = owners[0] if owners[0] == owners[-1] else f"{owners[0]} .. {owners[-1]}"
        heading = f'"""Stage {stage["index"]} of 2 of the wrapped pipeline: {summary}.\n'
        assert (folder / stage["file"]).read_text().startswith(heading)
