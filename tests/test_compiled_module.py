"""A torch.compile'd submodule: fx refuses dynamo's frame, and under export ftc's search for
library branches on self.training ran the compiled module on tensors without data, so inductor's
kernels read no memory and the compile died of a segmentation fault. ftc traces the original
module instead (the stage code runs it eagerly, and says so). The truth is the original model
run eagerly (dynamo disabled: the same ops, without inductor's compile time in the test)."""

from __future__ import annotations

import json

import torch

from ftc.check import check_pipeline

from .conftest import MODELS

MODEL = MODELS / "compiled_block.py"


def test_a_compiled_submodule_is_traced_through_its_original_module(compile_to):
    folder = compile_to(MODEL, 2, batch_size=4)
    ir = json.loads((folder / "ir.json").read_text())
    assert ir["frontend"] == "fx"
    assert any("compiled is torch.compile'd" in note for note in ir["trace_notes"]), ir["trace_notes"]
    state = [key for stage in json.loads((folder / "pipeline.json").read_text())["stages"] for key in stage["state"]]
    assert "compiled._orig_mod.up.weight" in state  # the original model's own keys
    with torch._dynamo.config.patch(disable=True):
        assert check_pipeline(folder, batch_size=4).ok
