"""Hugging Face transformers models (GPT-2, BERT, T5, and Mixtral at P = 2, from small configs, no downloads): torch.fx
cannot trace transformers 5, so `ftc compile` falls back to torch.export; the stages must pass
the equivalence check (outputs, returned and parameter gradients, buffers) at the compile batch
size and another, and the GPT-2 stages must read as torch code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ftc.check import check_pipeline
from ftc.ir import FtcError

from .conftest import MODELS, assert_local_trains_like_single
from .test_equivalence import assert_check_passes, assert_stage_files_standalone_and_working

pytest.importorskip("transformers")

CASES = [(MODELS / f"hf_{name}.py", stages) for name in ("gpt2", "bert", "t5") for stages in (1, 2, 4)]


@pytest.mark.parametrize("model_path,stages", CASES, ids=[f"{p.stem}-P{s}" for p, s in CASES])
def test_hf_model_stages_compute_what_the_model_computes(model_path, stages, compile_to):
    folder = compile_to(model_path, stages, batch_size=4)
    ir = json.loads((folder / "ir.json").read_text())
    # the library reads self.training only where the stages follow the mode (dropout, attention
    # dropout) or the read decides nothing (`self.gradient_checkpointing and self.training`)
    assert ir["frontend"] == "export" and "training_branches" not in ir
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


def test_wavlm_attention_follows_eval_mode_and_evaluates_as_the_model_does(compile_to):
    """WavLM's attention passes self.training to F.multi_head_attention_forward, where it only
    zeroes the attention dropout, whose op the stages write with their own flag: read as a branch
    the stages keep in training mode, it got a note to judge evaluation with the original model,
    and `ftc check` left eval mode uncompared."""
    folder = compile_to(MODELS / "hf_wavlm.py", 2, batch_size=4)
    ir = json.loads((folder / "ir.json").read_text())
    assert "training_branches" not in ir
    report = check_pipeline(folder, batch_size=4)
    assert report.ok and report.eval_expected and report.eval_outputs <= report.tolerance, report


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


def _assigned_names(cls: type, calls: str) -> list[str]:
    """The names a statement of `cls.forward` that calls `self.<calls>` assigns, in order, read
    from the installed transformers' source."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    for statement in ast.walk(tree):
        if isinstance(statement, ast.Assign) and any(
            isinstance(n, ast.Attribute) and n.attr == calls and isinstance(n.value, ast.Name) and n.value.id == "self"
            for n in ast.walk(statement.value)
        ):
            (target,) = statement.targets
            return [e.id for e in target.elts] if isinstance(target, ast.Tuple) else [target.id]
    raise AssertionError(f"{cls.__name__}.forward calls no self.{calls}")


def test_gpt2_values_are_named_as_transformers_source_names_them(tmp_path, compile_to):
    """The values GPT-2's library code computes take the names transformers' modeling_gpt2.py
    assigns them; the IR names the library's files by their place in the package, so the
    generated folder holds no path of this machine, and a second compile writes the same bytes."""
    from transformers.models.gpt2 import modeling_gpt2

    folder = compile_to(MODELS / "hf_gpt2.py", 2, batch_size=4)
    text = "".join((folder / f"stage{k}.py").read_text() for k in range(2))
    unpacked = _assigned_names(modeling_gpt2.GPT2Attention, "c_attn")  # query_states, key_states, ...
    assert len(unpacked) == 3, unpacked
    for index, name in enumerate(unpacked):
        assert re.search(rf"\n\s+{name} = \w+\[{index}\]\n", text), (name, text)
    residual = _assigned_names(modeling_gpt2.GPT2Block, "ln_2")[0]  # hidden_states = self.ln_2(...)
    assert re.search(rf"\n\s+{residual}_\d+ = \w+ \+ {residual}_\d+\n", text), text
    # the lowered Conv1D's value is named after its attribute, as a layer call's is
    assert re.search(r"\n\s+c_attn = \w+\.view\(batch, 16, 192\)\n", text), text
    assert "# transformer.h.0.attn (GPT2Attention), transformers/models/gpt2/modeling_gpt2.py:" in text
    ir_text = (folder / "ir.json").read_text()
    sources = {node["source"].rpartition(":")[0] for node in json.loads(ir_text)["nodes"]} - {""}
    assert "transformers/models/gpt2/modeling_gpt2.py" in sources and "transformers/pytorch_utils.py" in sources
    assert all(not source.startswith("/") and "site-packages" not in source for source in sources), sources
    package = str(Path(modeling_gpt2.__file__).resolve().parents[3])
    assert package not in ir_text and package not in text
    from ftc.compiler import CompileOptions, compile_model

    again = compile_model(MODELS / "hf_gpt2.py", tmp_path / "again", CompileOptions(stages=2, batch_size=4)).folder
    for name in ("ir.json", "stage0.py", "stage1.py"):
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name


def test_a_position_table_kept_as_a_plain_tensor_compiles_and_trains_as_the_model(compile_to):
    """TrOCR's sinusoidal table is a plain tensor attribute: built on the meta device it had no
    values, and torch.export failed deep inside with FakeTensorDeviceMismatchError (meta and cpu)
    and a fix about data-dependent Python. Registered as a non-persistent buffer when the model is
    built, it is traced, adopted by its stage and built with its values, in every mode."""
    folder = compile_to(MODELS / "hf_trocr.py", 2, batch_size=4)
    text = "".join((folder / f"stage{k}.py").read_text() for k in range(2))
    assert "self.model.decoder.embed_positions.weights.index_select(" in text
    assert_check_passes(folder, batch_size=4)
    assert_check_passes(folder, batch_size=3)
    assert_local_trains_like_single(folder)


def test_encodec_convolutions_padded_by_their_buffers_compute_what_the_model_computes(compile_to):
    """EncodecConv1d pads by 0-d int64 buffers, which torch.export traced without values (it failed
    on `if length <= max_pad:`); read as constants of their values, the padding is numbers in the
    stage code, which hold at every batch size."""
    folder = compile_to(MODELS / "hf_encodec.py", 2, batch_size=4)
    text = "".join((folder / f"stage{k}.py").read_text() for k in range(2))
    assert re.search(r'F\.pad\(\w+, \[6, 0\], mode="reflect"', text), text  # the first convolution's causal padding
    assert_check_passes(folder, batch_size=4)
    assert_check_passes(folder, batch_size=3)


def test_mimi_whose_codebooks_cache_their_embedding_computes_what_the_model_computes(compile_to):
    """MimiEuclideanCodebook caches `self._embed` on its first call; the run of forward that looks
    for branches on self.training left a fake tensor there, which export lifted as a constant
    without values (the error blamed MimiModel.forward's line and told to compile with fx, which
    cannot trace transformers). The stages compute the embedding from the codebook's buffers."""
    folder = compile_to(MODELS / "hf_mimi.py", 2, batch_size=4)
    assert_check_passes(folder, batch_size=4)
    assert_check_passes(folder, batch_size=3)


def test_a_library_assert_on_token_counts_is_left_out_and_the_model_trains_as_written(compile_to):
    """XLM asserts `lengths.max().item() <= slen`: export dropped the assertion but kept the
    `item` that fed it, which failed on the meta device (the compile was refused, with a fix to
    keep the whole XLMModel as one leaf). The check of the input goes with its Python numbers."""
    folder = compile_to(MODELS / "hf_xlm.py", 2, batch_size=4)
    text = "".join((folder / f"stage{k}.py").read_text() for k in range(2))
    assert ".item()" not in text
    assert_check_passes(folder, batch_size=4)
    assert_check_passes(folder, batch_size=3)
    assert_local_trains_like_single(folder)
