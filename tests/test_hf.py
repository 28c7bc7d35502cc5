"""Hugging Face transformers models (GPT-2, BERT, T5, and Mixtral at P = 2, from small configs, no downloads): torch.fx
cannot trace transformers 5, so `ftc compile` falls back to torch.export; the stages must pass
the equivalence check (outputs, returned and parameter gradients, buffers) at the compile batch
size and another, and the GPT-2 stages must read as torch code."""

from __future__ import annotations

import json

import pytest

from ftc.ir import FtcError

from .conftest import MODELS
from .test_equivalence import assert_check_passes, assert_stage_files_standalone_and_working

pytest.importorskip("transformers")

CASES = [(MODELS / f"hf_{name}.py", stages) for name in ("gpt2", "bert", "t5") for stages in (1, 2, 4)]


@pytest.mark.parametrize("model_path,stages", CASES, ids=[f"{p.stem}-P{s}" for p, s in CASES])
def test_hf_model_stages_compute_what_the_model_computes(model_path, stages, compile_to):
    folder = compile_to(model_path, stages, batch_size=4)
    assert json.loads((folder / "ir.json").read_text())["frontend"] == "export"
    assert len(json.loads((folder / "pipeline.json").read_text())["stages"]) == stages
    assert_stage_files_standalone_and_working(folder)
    assert_check_passes(folder, batch_size=4)
    assert_check_passes(folder, batch_size=3)


def test_mixtral_experts_take_the_cpu_path_and_compute_what_the_model_computes(compile_to):
    """transformers' MoE layer branches on the device type (histc on float input on the CPU, on
    int input elsewhere); traced on the meta device it wrote the int call, which the CPU refuses."""
    folder = compile_to(MODELS / "hf_mixtral.py", 2, batch_size=4)
    assert len(json.loads((folder / "pipeline.json").read_text())["stages"]) == 2
    assert_check_passes(folder, batch_size=4)


def test_a_model_that_returns_its_cache_is_told_to_set_use_cache_off(tmp_path, compile_to):
    """use_cache left on: forward returns a DynamicCache, which torch.export refuses deep inside."""
    path = tmp_path / "cached.py"
    path.write_text((MODELS / "hf_gpt2.py").read_text().replace("use_cache=False", "use_cache=True"))
    with pytest.raises(FtcError, match=r"forward returns a DynamicCache \(transformers\.cache_utils\.DynamicCache\)") as error:
        compile_to(path, 2, batch_size=4)
    assert "use_cache=False" in error.value.hint


def test_gpt2_stages_read_as_torch_code(compile_to):
    folder = compile_to(MODELS / "hf_gpt2.py", 2, batch_size=4)
    text = "".join((folder / f"stage{k}.py").read_text() for k in range(2))
    assert "torch.ops.aten" not in text
    assert "# transformer.h.0.attn (GPT2Attention)" in text
    assert 'self.transformer.h["0"].ln_1(' in text  # torch.nn layers stay module calls
    assert 'self.transformer.h["0"].attn.resid_dropout(' in text  # dropout follows train()/eval()
    assert "F.scaled_dot_product_attention(" in text and "torch.addmm(" in text
    assert "batch = input_ids.size(0)" in text  # the batch size is read, not baked in
    # why fx failed, in words (fx itself says "code: co_varnames is too small")
    notes = json.loads((folder / "ir.json").read_text())["trace_notes"]
    assert any("GPT2LMHeadModel.forward is wrapped by a decorator taking *args (transformers" in n for n in notes)
    manifest = json.loads((folder / "pipeline.json").read_text())
    keys = {key for stage in manifest["stages"] for key in stage["state"]}
    assert "transformer.h.0.attn.c_attn.weight" in keys and "lm_head.weight" in keys
