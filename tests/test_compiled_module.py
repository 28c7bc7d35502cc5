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


def test_a_compiled_submodule_is_named_as_the_original_and_keeps_its_state_keys(compile_to, tmp_path):
    """Stage comments named the wrapper (`compiled (OptimizedModule)`) and values were named after
    its `_orig_mod` (`compiled__orig_mod_up`, which pipeline.json sends between stages); under
    --frontend export the ops lost their module path (`Net`). The comments name the original class
    at the model's path, values drop `_orig_mod`, and the state keys, which the model's state_dict
    has with `_orig_mod.`, stay the model's own in the stages, the checkpoint and its merge."""
    from ftc.runtime.checkpoint import merge
    from ftc.runtime.config import load_config
    from ftc.runtime.model_file import load_model_file
    from ftc.runtime.train import train

    keys = set(load_model_file(MODEL).build("meta").state_dict())
    assert "compiled._orig_mod.up.weight" in keys
    for frontend in ("fx", "export"):
        folder = compile_to(MODEL, 2, batch_size=4, frontend=frontend)
        text = "".join((folder / f"stage{k}.py").read_text() for k in range(2))
        assert "# compiled (Block), compiled_block.py:17" in text and "OptimizedModule" not in text, text
        assert "self.compiled._orig_mod.up(" in text  # the call, by the model's own attribute path
        ir = json.loads((folder / "ir.json").read_text())
        names = [node["name"] for node in ir["nodes"]]
        assert not any("orig_mod" in name for name in names) and "compiled_up" in names, names
        stages = json.loads((folder / "pipeline.json").read_text())["stages"]
        assert {key for stage in stages for key in stage["state"]} == keys
    config = load_config(data={
        "pipeline": str(folder), "data": {"name": "synthetic", "size": 16}, "batch_size": 8, "micro_batches": 2,
        "mode": "local", "steps": 1, "log_every": 10, "checkpoint": {"dir": str(tmp_path / "checkpoints")},
    })  # fmt: skip
    with torch._dynamo.config.patch(disable=True):
        train(config)
    assert set(merge(tmp_path / "checkpoints")[1]) == keys
