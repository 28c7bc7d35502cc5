"""Training configs: bases, overrides, relative paths, and errors that name the key and file."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from ftc.ir import FtcError
from ftc.runtime.config import LrScheduleConfig, load_config
from ftc.runtime.pipeline import load_pipeline
from ftc.runtime.optim import lr_factor

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_base_chain_merges_nested_objects_and_resolves_paths_per_file(tmp_path):
    write(tmp_path / "shared" / "root.json", {"optimizer": {"name": "sgd", "lr": 0.5, "momentum": 0.9}, "steps": 7,
                                              "results": "out/r.json"})  # fmt: skip
    write(tmp_path / "shared" / "mid.json", {"base": "root.json", "optimizer": {"lr": 0.1}, "seed": 3})
    top = write(tmp_path / "run" / "top.json", {"base": "../shared/mid.json", "pipeline": "../gen/p", "steps": 9})
    config = load_config(top)
    assert config.optimizer.name == "sgd" and config.optimizer.lr == 0.1 and config.optimizer.momentum == 0.9
    assert config.steps == 9 and config.seed == 3
    assert config.pipeline == str((tmp_path / "gen" / "p").resolve())
    assert config.results == str((tmp_path / "shared" / "out" / "r.json").resolve())


def test_set_overrides_parse_json_then_strings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    top = write(tmp_path / "c.json", {"pipeline": "p"})
    config = load_config(top, ["optimizer.lr=0.25", "mode=dist", "optimizer.betas=[0.8, 0.9]",
                               "checkpoint.resume=true", "checkpoint.dir=ck", "data.name=bytes", "data.max_bytes=1000"])  # fmt: skip
    assert config.optimizer.lr == 0.25 and config.mode == "dist" and config.optimizer.betas == [0.8, 0.9]
    assert config.checkpoint.resume is True and config.checkpoint.dir == str(tmp_path / "ck")
    assert config.data == {"name": "bytes", "max_bytes": 1000}


def test_turning_off_a_base_configs_checkpoints_is_said_how(tmp_path):
    """`--set checkpoint=null` (as results=null turns results off) was refused with no way out named."""
    top = write(tmp_path / "c.json", {"pipeline": "p", "checkpoint": {"dir": "ck", "every": 5}})
    with pytest.raises(FtcError) as error:
        load_config(top, ["checkpoint=null"])
    assert error.value.hint == "an empty object takes its defaults: --set 'checkpoint={}' (no checkpoints)"
    assert load_config(top, ["checkpoint={}"]).checkpoint.dir is None


def test_set_with_a_whole_object_replaces_the_files_object(tmp_path):
    """Dotted keys change one setting; an object given whole is the whole object (the base's
    weight decay and warmup are not carried into it), while bases still merge key by key."""
    write(tmp_path / "base.json", {"optimizer": {"name": "adamw", "weight_decay": 0.3, "lr": 0.5},
                                          "lr_schedule": {"name": "cosine", "warmup_steps": 10}})  # fmt: skip
    top = write(tmp_path / "c.json", {"base": "base.json", "pipeline": "p", "optimizer": {"lr": 0.25}})
    merged = load_config(top, ["optimizer.name=adam"])
    assert (merged.optimizer.name, merged.optimizer.lr, merged.optimizer.weight_decay) == ("adam", 0.25, 0.3)
    whole = load_config(top, ['optimizer={"name": "adam", "lr": 0.01}', 'lr_schedule={"name": "constant"}'])
    default = load_config(data={"pipeline": "p"})
    assert (whole.optimizer.name, whole.optimizer.lr) == ("adam", 0.01)
    assert whole.optimizer.weight_decay == default.optimizer.weight_decay
    assert whole.lr_schedule.warmup_steps == default.lr_schedule.warmup_steps


@pytest.mark.parametrize(
    "content, overrides, message",
    [
        ({"pipeline": "p", "stepz": 3}, [], "unknown key 'stepz'"),
        ({"pipeline": "p", "optimizer": {"learning_rate": 1}}, [], "unknown key 'optimizer.learning_rate'"),
        ({"pipeline": "p", "steps": "10"}, [], "key 'steps' must be an integer"),
        ({"pipeline": "p", "steps": 1.5}, [], "key 'steps' must be an integer"),
        ({"pipeline": "p", "checkpoint": {"resume": 1}}, [], "key 'checkpoint.resume' must be true or false"),
        ({"pipeline": "p"}, ["optimizer.lr=fast"], "--set optimizer.lr=fast: key 'optimizer.lr' must be a finite number"),
        ({"pipeline": "p"}, ["optimizer.lr=NaN"], "key 'optimizer.lr' must be a finite number, not NaN"),
        ({"pipeline": "p"}, ["timeout_s=Infinity"], "key 'timeout_s' must be a finite number"),
        ({"pipeline": "p", "optimizer": {"betas": [1.5, 0.9]}}, [], "key 'optimizer.betas' is [1.5, 0.9]"),
        ({"pipeline": "p", "optimizer": {"momentum": 2}}, [], "key 'optimizer.momentum' is 2; momentum of 1 or more"),
        ({"pipeline": "p", "checkpoint": {"keep": 0}}, [], "key 'checkpoint.keep' is 0"),
        ({"pipeline": "p", "optimizer": {"weight_decay": -1}}, [], "key 'optimizer.weight_decay' is -1"),
        ({"pipeline": "p", "optimizer": {"name": "sgd", "nesterov": True}}, [], "key 'optimizer.nesterov' is true"),
        ({"pipeline": "p"}, ["optimizer.momentum=0.9"], "key 'optimizer.momentum' is set, but optimizer.name is 'adamw'"),
        ({"pipeline": "p", "optimizer": {"name": "adam", "nesterov": True}}, [], "'adam', which takes no nesterov"),
        ({"pipeline": "p", "optimizer": {"name": "sgd", "betas": [0.8, 0.9]}}, [], "'sgd', which takes no betas"),
        ({"pipeline": "p", "optimizer": {"clip_grad_norm": 0}}, [], "key 'optimizer.clip_grad_norm' is 0; it must be"),
        ({"pipeline": "p", "eval": {"every": 5, "fraction": 1}}, [], "key 'eval.fraction' is 1; it must lie between"),
        ({"pipeline": "p"}, ["eval.batches=0"], "key 'eval.batches' is 0; it must be at least 1"),
        ({"pipeline": "p", "init": "missing.safetensors"}, [], "missing.safetensors, which does not exist"),
        ({"pipeline": "p"}, ["eval.every=-1"], "key 'eval.every' is -1"),
        ({"pipeline": "p"}, ["eval.batches=2"], "key 'eval.batches' is set, but eval.every is 0: nothing is evaluated"),
        ({"pipeline": "p", "eval": {"fraction": 0.2}}, [], "key 'eval.fraction' is set, but eval.every is 0"),
        ({"pipeline": "p"}, ["data.name.x=1"], "key 'data.name' must be a string, not {\"x\": 1}"),
        ({"pipeline": "p", "schedule": "async"}, ["optimizer.clip_grad_norm=1"],
         "key 'optimizer.clip_grad_norm' is set, but schedule async"),
        ({"pipeline": "p", "optimizer": {"lr": 0.1}, "lr_schedule": {"min_lr": 5}}, [], "key 'lr_schedule.min_lr' is 5"),
        ({"pipeline": "p"}, ["checkpoint.dir="], "key 'checkpoint.dir' is empty"),
        ({"pipeline": "p", "setup_timeout_s": 0}, [], "key 'setup_timeout_s' must be positive"),
        ({"pipeline": "p"}, ["nope=1"], "--set nope=1: unknown key 'nope'"),
        ({"pipeline": "p", "staleness": {"predict": True}}, [], "key 'staleness.predict' is set, but schedule '1f1b'"),
        ({"pipeline": "p", "schedule": "async"}, ["staleness.flush_every=0"], "key 'staleness.flush_every' is 0"),
        ({"pipeline": "p", "schedule": "async", "optimizer": {"name": "sgd"}, "staleness": {"predict": True}}, [],
         "plain SGD keeps no update direction"),
        ({"pipeline": "p", "schedule": "zb"}, [], "key 'schedule' is 'zb'"),
        ({"pipeline": "p", "precision": "fp16"}, [], "key 'precision' is 'fp16'; choose one of fp32, bf16"),
        ({"pipeline": "p"}, ["precision=bfloat16"], "key 'precision' is 'bfloat16'; choose one of fp32, bf16"),
        ({"pipeline": "p", "precision": 16}, [], "key 'precision' must be a string, not 16"),
        ({"pipeline": "p", "batch_size": 10, "micro_batches": 4}, [], "not a multiple of micro_batches"),
        ({"steps": 3}, [], "key 'pipeline' is missing"),
        ({"pipeline": "p", "data": {"name": "imagenet"}}, [], "key 'data.name' is 'imagenet'"),
        ({"pipeline": "p"}, ["data.size=64"], 'key \'data\' needs a "name"'),
        ({"pipeline": "p", "checkpoint": {"every": 5}}, [], "key 'checkpoint.dir' is not set"),
        ({"pipeline": "p", "inject_fault": {"rank": 0, "step": 1, "kind": "hang"}}, [], 'only mode "dist"'),
    ],
)
def test_errors_name_the_key_and_the_source(tmp_path, content, overrides, message):
    path = write(tmp_path / "c.json", content)
    with pytest.raises(FtcError) as error:
        load_config(path, overrides)
    assert message in str(error.value)
    if "needs a" in message:  # the default data set is replaced whole, which a dotted --set does not show
        assert "--set data.size=64 needs --set data.name=synthetic" in str(error.value)
    if not overrides:
        assert str(path) in str(error.value)


def test_precision_defaults_to_fp32_and_says_why_fp16_is_not_offered(tmp_path):
    path = write(tmp_path / "c.json", {"pipeline": "p"})
    assert load_config(path).precision == "fp32" and load_config(path, ["precision=bf16"]).precision == "bf16"
    with pytest.raises(FtcError) as error:
        load_config(path, ["precision=fp16"])
    assert "fp16 is not offered: it needs loss scaling" in error.value.hint


def test_clipping_under_schedule_async_is_refused_but_in_mode_single(tmp_path):
    """Mode single trains an async config synchronously (its baseline), so it can clip."""
    path = write(tmp_path / "c.json", {"pipeline": "p", "schedule": "async", "optimizer": {"clip_grad_norm": 1.0}})
    with pytest.raises(FtcError, match="schedule async updates each stage"):
        load_config(path, ["mode=dist"])
    assert load_config(path, ["mode=single"]).optimizer.clip_grad_norm == 1.0


def test_unknown_key_in_a_base_names_the_base(tmp_path):
    base = write(tmp_path / "base.json", {"optimiser": {}})
    top = write(tmp_path / "top.json", {"base": "base.json", "pipeline": "p"})
    with pytest.raises(FtcError, match=f"{base}: unknown key 'optimiser'"):
        load_config(top)


def test_a_key_given_twice_is_an_error_not_the_last_one_silently(tmp_path):
    config = tmp_path / "c.json"
    config.write_text('{"pipeline": "p", "optimizer": {"lr": 0.1, "lr": 0.01}}')
    with pytest.raises(FtcError, match=f"config {config} is not valid JSON: key 'lr' appears twice"):
        load_config(config)


def test_a_manifest_key_given_twice_is_an_error(tmp_path):
    folder = tmp_path / "mlp"
    shutil.copytree(ROOT / "generated" / "mlp", folder)
    text = (folder / "pipeline.json").read_text()
    (folder / "pipeline.json").write_text(text.replace('"batch_size":', '"batch_size": 3, "batch_size":', 1))
    with pytest.raises(FtcError, match="pipeline.json is not valid JSON: key 'batch_size' appears twice"):
        load_pipeline(folder)


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.json", {"base": "b.json", "pipeline": "p"})
    write(tmp_path / "b.json", {"base": "a.json"})
    with pytest.raises(FtcError, match="cycle"):
        load_config(tmp_path / "a.json")


def test_a_missing_base_or_a_folder_is_named_with_the_config_naming_it(tmp_path):
    """A base of "." or a missing file said "config DIR does not exist", naming neither the
    config whose "base" it is nor that DIR is a folder."""
    for base, what in [(".", "is a folder"), ("gone.json", "does not exist")]:
        write(tmp_path / "c.json", {"base": base, "pipeline": "p"})
        with pytest.raises(FtcError, match=f'config {re.escape(str(tmp_path / "c.json"))}: its "base" .* {what}'):
            load_config(tmp_path / "c.json")
    with pytest.raises(FtcError, match="config .*nowhere.json does not exist"):
        load_config(tmp_path / "nowhere.json")


@pytest.mark.parametrize("name", ["gpt", "gpt_async", "mlp", "resnet", "unet", "two_tower"])
def test_shipped_configs_load_and_name_existing_pipelines(name):
    config = load_config(ROOT / "configs" / f"{name}.json")
    assert (Path(config.pipeline) / "pipeline.json").is_file()
    assert config.mode == "dist"


def test_lr_schedules_warm_up_then_decay_toward_min_lr_which_the_step_after_the_last_would_reach():
    """Steps 0..steps-1 train; the decay reaches min_lr at `steps`, so the last step still learns
    (with min_lr 0 it took a step of size 0)."""
    cosine = LrScheduleConfig("cosine", warmup_steps=4, min_lr=0.1)
    assert [lr_factor(s, cosine, 1.0, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(19, cosine, 1.0, 20) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert lr_factor(20, cosine, 1.0, 20) == pytest.approx(0.1)
    assert lr_factor(11, cosine, 1.0, 20) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 16)))
    linear = LrScheduleConfig("linear", warmup_steps=0, min_lr=0.0)
    assert [lr_factor(s, linear, 2.0, 5) for s in range(5)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert lr_factor(100, LrScheduleConfig("constant"), 1.0, 5) == 1.0


def test_the_loss_key_names_a_function_of_the_model_file_of_torch_or_of_a_file(tmp_path):
    import torch.nn.functional as F

    from ftc.runtime.model_file import load_model_file
    from ftc.runtime.train import resolve_loss

    model_file = load_model_file(ROOT / "examples" / "mlp.py")
    losses = tmp_path / "losses.py"
    losses.write_text("def half_mse(output, target):\n    return 0.5 * ((output - target) ** 2).mean()\n")

    def loss(value):
        return resolve_loss(load_config(data={"pipeline": "p", "loss": value}), model_file)

    assert resolve_loss(load_config(data={"pipeline": "p"}), model_file) is model_file.loss_fn
    assert loss("loss_fn") is model_file.loss_fn
    assert loss("mse_loss") is F.mse_loss
    assert loss(f"{losses}:half_mse").__name__ == "half_mse"
    for value, error in [
        ("no_such_loss", "config key 'loss' is 'no_such_loss', which names no function"),
        (f"{tmp_path / 'nowhere.py'}:half_mse", "config key 'loss': " + str(tmp_path / "nowhere.py") + " does not exist"),
        (f"{losses}:mae", "losses.py defines no function mae()"),
    ]:
        with pytest.raises(FtcError) as failure:
            loss(value)
        assert error in failure.value.message


def test_training_outside_the_memory_plan_is_named(tmp_path):
    """A pipeline partitioned under --memory-limit for 1f1b, 2 micro-batches of 4 samples and
    sgd: a config that needs more memory per stage gets one warning naming each difference."""
    from dataclasses import replace

    from ftc.compiler import CompileOptions, compile_model
    from ftc.runtime import load_pipeline
    from ftc.runtime.preflight import memory_plan_differences

    options = CompileOptions(stages=2, batch_size=8, memory_limit=10**9, schedule="1f1b", micro_batches=2, optimizer="sgd")
    pipeline = load_pipeline(compile_model(ROOT / "examples" / "mlp.py", tmp_path, options).folder)
    planned = {"pipeline": str(pipeline.folder), "batch_size": 8, "micro_batches": 2, "schedule": "1f1b",
               "optimizer": {"name": "sgd"}}  # fmt: skip
    assert memory_plan_differences(load_config(data=planned), pipeline) == []
    smaller = {**planned, "micro_batches": 4, "optimizer": {"name": "sgd", "momentum": 0.0}}
    assert memory_plan_differences(load_config(data=smaller), pipeline) == []
    (warning,) = memory_plan_differences(
        load_config(data={**planned, "schedule": "gpipe", "batch_size": 16, "optimizer": {"name": "adamw"},
                          "device": "cuda"}), pipeline  # fmt: skip
    )
    assert "partitioned to fit 1000.0 MB per device (--memory-limit)" in warning
    assert "schedule gpipe (planned: 1f1b" in warning
    assert "micro-batches of 8 samples (batch_size / micro_batches; planned: 4)" in warning
    assert "optimizer adamw (planned: sgd" in warning
    assert "device cuda (planned: cpu; adamw's step on CUDA makes one copy of all the parameters" in warning
    assert "fix: recompile with these settings" in warning
    (warning,) = memory_plan_differences(load_config(data={**planned, "schedule": "async"}), pipeline)
    assert "schedule async (planned: 1f1b; async keeps more copies" in warning and "--schedule async" in warning
    # a pipeline compiled for async (stashed weights, each stage's depth in flight) fits async and 1f1b
    options = replace(options, schedule="async")
    for_async = load_pipeline(compile_model(ROOT / "examples" / "mlp.py", tmp_path / "async", options).folder)
    for schedule in ("async", "1f1b"):
        assert memory_plan_differences(load_config(data={**planned, "schedule": schedule}), for_async) == []
    unlimited = load_pipeline(compile_model(ROOT / "examples" / "mlp.py", tmp_path / "free", CompileOptions(stages=2)).folder)
    assert memory_plan_differences(load_config(data={**planned, "schedule": "gpipe"}), unlimited) == []
