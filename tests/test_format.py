"""black over several stage files (ftc/backend/codegen.py, format_files): formatting in worker
processes gives, in order, exactly what black gives one file at a time."""

from __future__ import annotations

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
