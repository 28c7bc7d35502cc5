"""The committed pipelines under generated/ are exactly what the compiler writes today, and the
same input always gives the same bytes."""

from __future__ import annotations

import shutil

from . import regenerate as regen
from .conftest import ROOT


def test_committed_examples_match_a_fresh_compile(tmp_path):
    # Mirror the checkout's layout so that relative paths in the manifests come out the same.
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    folders = regen.regenerate(tmp_path)
    stale = []
    for folder in folders:
        committed = ROOT / "generated" / folder.name
        fresh_files = sorted(p.name for p in folder.iterdir())
        committed_files = sorted(p.name for p in committed.iterdir()) if committed.is_dir() else []
        if fresh_files != committed_files:
            stale.append(f"{folder.name}: files {committed_files} != {fresh_files}")
            continue
        for name in fresh_files:
            if (folder / name).read_bytes() != (committed / name).read_bytes():
                stale.append(f"{folder.name}/{name}")
    assert not stale, f"generated/ is stale (run `make regenerate`): {stale}"


def test_compiling_twice_gives_the_same_bytes(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    (folder,) = regen.regenerate(tmp_path, ("gpt",))
    first = {p.name: p.read_bytes() for p in folder.iterdir()}
    regen.regenerate(tmp_path, ("gpt",))
    second = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert first == second
