"""Training configs: a typed schema, JSON files that extend each other, `--set` overrides.

A config is a JSON object. `"base": "other.json"` extends another config (relative to the file;
bases may extend further bases); nested objects (optimizer, lr_schedule, checkpoint, ...) merge
key by key, everything else is replaced. `--set key=value` overrides one key after all files are
merged: dotted keys reach into nested objects (`optimizer.lr=0.01`), the value is parsed as JSON
and taken as a string when it is not JSON (`mode=dist`); an object given whole replaces the one
there (`--set 'optimizer={"name": "adam"}'` keeps no weight_decay of the files'). Paths are relative to the file that
names them (to the working directory for `--set`). Unknown keys and wrong types are errors that
name the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ftc.ir import FtcError, strict_json

DATA_SETS = ("synthetic", "bytes", "digits", "module")
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "linear", "cosine")
SCHEDULES = ("gpipe", "1f1b")  # the synchronous schedules (runtime/schedule.py)
TRAINING_SCHEDULES = (*SCHEDULES, "async")  # async: PipeDream-style, no flush (runtime/staleness.py)
RECOMPUTE = ("pipeline", "always", "never")
MODES = ("single", "local", "dist")
BACKENDS = ("auto", "gloo", "nccl")
DEVICES = ("cpu", "cuda")
FAULTS = ("exit", "hang", "nan")
# fp32: everything in float32. bf16: every forward and the loss under torch.autocast with
# bfloat16, parameters, gradients and optimizer state in float32 (runtime/precision.py). No fp16:
# its narrow exponent range needs loss scaling (torch.amp.GradScaler), whose skipped steps and
# changing scale would need an all-reduce of its inf checks across ranks; bf16 needs none.
PRECISIONS = ("fp32", "bf16")


# OptimizerConfig's fields that each optimizer has no use for.
OTHER_OPTIMIZERS_SETTINGS = {"sgd": ("betas", "eps"), "adam": ("momentum", "nesterov"), "adamw": ("momentum", "nesterov")}


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 1e-3
    momentum: float = 0.0  # sgd
    nesterov: bool = False  # sgd
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw
    eps: float = 1e-8  # adam, adamw
    # The largest L2 norm of all gradients together, before each step (torch.nn.utils.
    # clip_grad_norm_ over the whole model); None: gradients are not clipped.
    clip_grad_norm: Optional[float] = None


@dataclass
class LrScheduleConfig:
    name: str = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0  # the lr that linear and cosine decay reach one step after the last


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    every: int = 0  # 0: only at the end
    resume: bool = False
    keep: Optional[int] = None  # the latest `keep` step folders stay; None: all


@dataclass
class EvalConfig:
    """Evaluation on samples held out of training (runtime/train.py, evaluate)."""

    every: int = 0  # steps between evaluations, and one after the last step; 0: none
    batches: int = 4  # held-out batches of batch_size per evaluation, the same ones each time
    fraction: float = 0.1  # of the data set, its last samples, held out of training when every > 0


@dataclass
class StalenessConfig:
    """Schedule "async" only (runtime/staleness.py)."""

    flush_every: int = 16  # steps between pipeline flushes (checkpoints and the end flush too)
    predict: bool = False  # forwards use weights extrapolated over the updates they will miss
    gap_aware: bool = False  # stale gradients are divided by 1 + |gap| / (one update's size)


@dataclass
class FaultConfig:
    """A testing aid: make one rank fail at one step, to check that the others stop cleanly.
    kind "exit": the process dies; "hang": it stops answering; "nan": its weights turn to NaN."""

    rank: int = 0
    step: int = 0
    kind: str = "exit"


@dataclass
class Config:
    pipeline: str  # the generated pipeline folder (generated/<name>)
    model: Optional[str] = None  # default: the model file pipeline.json names
    data: dict = field(default_factory=lambda: {"name": "synthetic"})
    loss: Optional[str] = None  # a model-file function, torch.nn.functional.<name> or "file.py:function"
    init: Optional[str] = None  # initial weights: a state_dict file (.safetensors or torch) in the model's keys
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LrScheduleConfig = field(default_factory=LrScheduleConfig)
    batch_size: int = 8
    micro_batches: int = 4
    step_every: int = 1
    schedule: str = "1f1b"
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    recompute: str = "pipeline"
    precision: str = "fp32"  # "bf16": forwards and the loss under bfloat16 autocast (runtime/precision.py)
    steps: int = 100
    epochs: Optional[float] = None  # when set, decides the steps: passes over the data set (runtime/data.py)
    seed: int = 0
    mode: str = "local"
    backend: str = "auto"
    device: str = "cpu"
    nprocs: Optional[int] = None  # default: the number of pipeline devices
    torchrun: list[str] = field(default_factory=list)  # launcher flags; default --standalone
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    results: Optional[str] = None
    plot: Optional[str] = None
    timeout_s: float = 60.0
    setup_timeout_s: float = 1800.0  # mode dist: how long ranks wait for each other to build data and stages
    log_every: int = 10
    inject_fault: Optional[FaultConfig] = None
    source: str = "<config>"  # where the config came from, for messages; not a config key

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        del data["source"]
        return data


# Keys whose values are paths, resolved against the file that names them.
PATH_KEYS = {
    ("pipeline",),
    ("model",),
    ("init",),
    ("results",),
    ("plot",),
    ("checkpoint", "dir"),
    ("data", "module"),
    ("loss",),
}
# Of those, the keys that name "file.py:function"; a value without a file part is a plain name.
FUNCTION_KEYS = {("data", "module"), ("loss",)}
NOT_KEYS = {"source"}


def load_config(path: str | Path | None = None, overrides: list[str] = (), data: dict | None = None) -> Config:
    """The config in `path` (or the dict `data`, relative to the working directory), its bases
    merged under it, `overrides` ("key=value") applied on top, validated."""
    if path is not None:
        merged = _load_file(Path(path), ())
        source = str(path)
    else:
        merged = _resolve_paths(_check_keys(dict(data or {}), "<dict>"), Path.cwd())
        source = "<dict>"
    if overrides:
        source += f" (with --set {' '.join(overrides)})"
    for override in overrides:
        depth = override.partition("=")[0].count(".") + 1
        merged = _set(merged, _resolve_paths(_parse_override(override), Path.cwd()), depth)
    return _build(merged, source)


def _load_file(path: Path, chain: tuple[Path, ...]) -> dict:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise FtcError(
            f"config {path}: its bases form a cycle: {cycle}", 'make the "base" chain end in a file without "base"'
        )
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        if chain:  # a base: say which config names it
            raise FtcError(f"config {chain[-1]}: its \"base\" {path} {what}",
                           "name a JSON config file, relative to the config that names it")  # fmt: skip
        raise FtcError(f"config {path} {what}", "pass the path of a JSON training config (e.g. configs/gpt.json)")
    try:
        raw = strict_json(path.read_text())
    except ValueError as exc:
        raise FtcError(f"config {path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise FtcError(f"config {path} holds a JSON {type(raw).__name__}, not an object")
    base = raw.pop("base", None)
    raw = _resolve_paths(_check_keys(raw, str(path)), resolved.parent)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise FtcError(f"config {path}: key 'base' must be a path (a string), not {json.dumps(base)}")
    return _merge(_load_file(resolved.parent / base, (*chain, resolved)), raw)


def _parse_override(text: str) -> dict:
    key, sep, value_text = text.partition("=")
    if not sep or not key:
        raise FtcError(f"--set {text!r} is not key=value", "e.g. --set optimizer.lr=0.01 or --set mode=dist")
    try:
        value = json.loads(value_text)
    except ValueError:
        value = value_text
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return _check_keys(nested, f"--set {text}")


def _merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _set(base: dict, top: dict, depth: int) -> dict:
    """`base` with the one key path of `top` (`depth` keys deep) set to top's value: an object
    given whole (`--set optimizer={...}`) replaces the one there, where a base merges."""
    (key, value), = top.items()
    merged = dict(base)
    merged[key] = value if depth == 1 else _set(base.get(key) if isinstance(base.get(key), dict) else {}, value, depth - 1)
    return merged


def _resolve_paths(raw: dict, folder: Path) -> dict:
    raw = json.loads(json.dumps(raw))
    for keys in PATH_KEYS:
        holder = raw
        for key in keys[:-1]:
            holder = holder.get(key) if isinstance(holder, dict) else None
        if not isinstance(holder, dict) or not isinstance(holder.get(keys[-1]), str) or not holder[keys[-1]]:
            continue  # an empty path stays empty, for validation to name
        value = holder[keys[-1]]
        if keys in FUNCTION_KEYS:
            file, sep, function = value.rpartition(":")
            if sep and file:
                holder[keys[-1]] = f"{(folder / file).resolve()}:{function}"
        else:
            holder[keys[-1]] = str((folder / value).resolve())
    return raw


def _check_keys(raw: dict, source: str, schema: type = Config, prefix: str = "") -> dict:
    """Unknown keys and wrong types, named with their dotted key and their source."""
    hints = typing.get_type_hints(schema)
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if key not in hints or key in NOT_KEYS:
            known = ", ".join(k for k in hints if k not in NOT_KEYS)
            raise FtcError(f"config {source}: unknown key {name!r}", f"the keys here are: {known}")
        _check_type(value, hints[key], name, source)
    return raw


def _check_type(value: Any, hint: Any, name: str, source: str) -> None:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise FtcError(f"config {source}: key {name!r} must be an object, not {json.dumps(value)}",
                           f"an empty object takes its defaults: --set '{name}={{}}'"
                           + (" (no checkpoints)" if name == "checkpoint" else "") if value is None else None)  # fmt: skip
        _check_keys(value, source, hint, f"{name}.")
        return
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise FtcError(f"config {source}: key {name!r} must be a list, not {json.dumps(value)}")
        for element in value:
            _check_type(element, item, f"{name}[]", source)
        return
    expected = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", dict: "an object"}
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        # JSON (Python's reader) takes NaN and Infinity; no setting wants them.
        float: isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
    }[hint]
    if not ok:
        raise FtcError(f"config {source}: key {name!r} must be {expected[hint]}, not {json.dumps(value)}")


def _build(raw: dict, source: str) -> Config:
    if "pipeline" not in raw:
        raise FtcError(
            f"config {source}: key 'pipeline' is missing", 'name the generated pipeline folder, e.g. "../generated/gpt"'
        )
    values = dict(raw)
    for key, schema in (
        ("optimizer", OptimizerConfig),
        ("lr_schedule", LrScheduleConfig),
        ("checkpoint", CheckpointConfig),
        ("staleness", StalenessConfig),
        ("eval", EvalConfig),
        ("inject_fault", FaultConfig),
    ):
        if isinstance(values.get(key), dict):
            values[key] = schema(**values[key])
    config = Config(**values, source=source)
    _validate(config)
    return config


def _validate(c: Config) -> None:
    def fail(key: str, message: str, hint: str | None = None) -> None:
        raise FtcError(f"config {c.source}: key {key!r} {message}", hint)

    def choice(key: str, value: str, choices: tuple[str, ...]) -> None:
        if value not in choices:
            fail(key, f"is {value!r}; choose one of {', '.join(choices)}")

    choice("schedule", c.schedule, TRAINING_SCHEDULES)
    _validate_staleness(c, fail)
    choice("recompute", c.recompute, RECOMPUTE)
    if c.precision not in PRECISIONS:
        fail("precision", f"is {c.precision!r}; choose one of {', '.join(PRECISIONS)}",
             "bf16 runs the forwards and the loss under bfloat16 autocast, weights and optimizer state in float32"
             + ("; fp16 is not offered: it needs loss scaling, which bf16's float32 range makes unnecessary"
                if c.precision.lower() in ("fp16", "float16", "half") else ""))  # fmt: skip
    choice("mode", c.mode, MODES)
    choice("backend", c.backend, BACKENDS)
    choice("device", c.device, DEVICES)
    choice("optimizer.name", c.optimizer.name, OPTIMIZERS)
    choice("lr_schedule.name", c.lr_schedule.name, LR_SCHEDULES)
    if "name" not in c.data:
        fail("data", 'needs a "name"', f"one of {', '.join(DATA_SETS)}: a \"data\" object replaces the default, "
             '{"name": "synthetic"}, whole (on the command line too: --set data.size=64 needs --set data.name=synthetic '
             'where the config has no "data")')  # fmt: skip
    if not isinstance(c.data["name"], str):
        fail("data.name", f"must be a string, not {json.dumps(c.data['name'])}", f"one of {', '.join(DATA_SETS)}")
    choice("data.name", c.data["name"], DATA_SETS)
    for key in ("batch_size", "micro_batches", "step_every", "steps", "log_every"):
        if getattr(c, key) < 1:
            fail(key, f"is {getattr(c, key)}; it must be at least 1")
    if c.init is not None and not Path(c.init).exists():
        fail("init", f"is {c.init}, which does not exist",
             "pass the path of a .safetensors or torch .pt state_dict in the original model's keys")  # fmt: skip
    if c.eval.every < 0:
        fail("eval.every", f"is {c.eval.every}; it must not be negative (0: no evaluation)")
    if c.eval.batches < 1:
        fail("eval.batches", f"is {c.eval.batches}; it must be at least 1")
    if not 0 < c.eval.fraction < 1:
        fail("eval.fraction", f"is {c.eval.fraction}; it must lie between 0 and 1 (0.1: the last tenth of the data set)")
    if c.eval.every == 0:
        # Settings of an evaluation that never runs: the user meant to evaluate.
        for key in ("batches", "fraction"):
            if getattr(c.eval, key) != getattr(EvalConfig(), key):
                fail(f"eval.{key}", "is set, but eval.every is 0: nothing is evaluated",
                     "set eval.every (evaluate after every N steps and after the last), or leave eval out (on the "
                     "command line: --set 'eval={}')")  # fmt: skip
    if c.epochs is not None and c.epochs <= 0:
        fail("epochs", f"is {c.epochs}; it must be above 0 (0.5: half a pass over the data set)",
             "or leave it out and set steps")  # fmt: skip
    if c.batch_size % c.micro_batches:
        fail("batch_size", f"({c.batch_size}) is not a multiple of micro_batches ({c.micro_batches})",
             "every micro-batch has the same size: batch_size / micro_batches")  # fmt: skip
    if c.checkpoint.keep is not None and c.checkpoint.keep < 1:
        fail("checkpoint.keep", f"is {c.checkpoint.keep}; keep at least 1 checkpoint, or leave it out to keep all")
    if not 0 <= c.seed < 2**32:
        fail("seed", f"is {c.seed}; torch takes seeds from 0 to 2**32 - 1")
    if c.nprocs is not None and c.nprocs < 1:
        fail("nprocs", f"is {c.nprocs}; it must be at least 1")
    for key in ("timeout_s", "setup_timeout_s"):
        if getattr(c, key) <= 0:
            fail(key, "must be positive")
    optimizer = c.optimizer
    if optimizer.lr <= 0:
        fail("optimizer.lr", "must be positive")
    for key in ("momentum", "weight_decay", "eps"):
        if getattr(optimizer, key) < 0:
            fail(f"optimizer.{key}", f"is {getattr(optimizer, key)}; it must not be negative")
    if optimizer.momentum >= 1:
        fail("optimizer.momentum", f"is {optimizer.momentum}; momentum of 1 or more makes the update grow without "
             "bound", "e.g. 0.9")  # fmt: skip
    if len(optimizer.betas) != 2 or not all(0 <= beta < 1 for beta in optimizer.betas):
        fail("optimizer.betas", f"is {optimizer.betas}; it must be two numbers in [0, 1)", "e.g. [0.9, 0.999]")
    # Settings of another optimizer, which torch's would never see: the user meant them to act.
    defaults = OptimizerConfig()
    for key in OTHER_OPTIMIZERS_SETTINGS[optimizer.name]:
        if getattr(optimizer, key) != getattr(defaults, key):
            default = json.dumps(getattr(defaults, key))
            hint = (f"optimizer.{key} is adam's and adamw's: leave it out (or at its default, {default}, where a base "
                    "config sets it), or set optimizer.name to adam or adamw"
                    if optimizer.name == "sgd" else
                    f"adam and adamw take their momentum from optimizer.betas[0]: leave optimizer.{key} out (or at its "
                    f"default, {default}, where a base config sets it), or set optimizer.name to sgd")  # fmt: skip
            fail(f"optimizer.{key}", f"is set, but optimizer.name is {optimizer.name!r}, which takes no {key}", hint)
    if optimizer.name == "sgd" and optimizer.nesterov and optimizer.momentum <= 0:
        fail("optimizer.nesterov", "is true, but Nesterov momentum needs optimizer.momentum above 0",
             "set optimizer.momentum (e.g. 0.9) or optimizer.nesterov=false")  # fmt: skip
    if optimizer.clip_grad_norm is not None:
        if optimizer.clip_grad_norm <= 0:
            fail("optimizer.clip_grad_norm", f"is {optimizer.clip_grad_norm}; it must be positive",
                 "e.g. 1.0, or leave it out (null) not to clip")  # fmt: skip
        if c.schedule == "async" and c.mode != "single":  # mode single trains synchronously
            fail("optimizer.clip_grad_norm", "is set, but schedule async updates each stage as its backwards finish, "
                 "so no step sees all gradients at once to take their norm",
                 "use schedule gpipe or 1f1b, or leave optimizer.clip_grad_norm out")  # fmt: skip
    if c.lr_schedule.warmup_steps < 0:
        fail("lr_schedule.warmup_steps", "must not be negative")
    if not 0 <= c.lr_schedule.min_lr <= optimizer.lr:
        fail("lr_schedule.min_lr", f"is {c.lr_schedule.min_lr}; it must lie between 0 and optimizer.lr ({optimizer.lr})")
    for key, value in (("checkpoint.dir", c.checkpoint.dir), ("results", c.results), ("plot", c.plot)):
        if value == "":
            fail(key, "is empty", "give a path, or leave the key out")
        if key != "checkpoint.dir" and value is not None and Path(value).is_dir():
            fail(key, f"names a folder, {value}", "give a file path")
    if c.checkpoint.every < 0:
        fail("checkpoint.every", "must not be negative (0: only at the end)")
    if (c.checkpoint.every or c.checkpoint.resume) and c.checkpoint.dir is None:
        fail("checkpoint.dir", "is not set, but checkpoint.every or checkpoint.resume asks for checkpoints")
    if c.backend == "nccl" and c.device != "cuda":
        fail("backend", "is 'nccl', which needs device \"cuda\"")
    if c.inject_fault is not None:
        choice("inject_fault.kind", c.inject_fault.kind, FAULTS)
        # A fault that can never strike would let a test of the fault pass without one.
        if c.inject_fault.step < 1:
            fail("inject_fault.step", f"is {c.inject_fault.step}; steps count from 1, as the log does")
        if c.inject_fault.rank < 0:
            fail("inject_fault.rank", f"is {c.inject_fault.rank}; ranks count from 0")
        if c.inject_fault.kind != "nan" and c.mode != "dist":
            fail("inject_fault.kind", f'is {c.inject_fault.kind!r}, which only mode "dist" can survive')


def _validate_staleness(c: Config, fail: Callable[..., None]) -> None:
    staleness, default = c.staleness, StalenessConfig()
    if c.schedule != "async":
        for key in ("flush_every", "predict", "gap_aware"):
            if getattr(staleness, key) != getattr(default, key):
                fail(f"staleness.{key}", f"is set, but schedule {c.schedule!r} is synchronous: nothing is stale",
                     "set \"schedule\": \"async\", or leave staleness out (on the command line: --set 'staleness={}')")  # fmt: skip
        return
    if staleness.flush_every < 1:
        fail("staleness.flush_every", f"is {staleness.flush_every}; it must be at least 1 (1: a flush every step, "
             "which is 1f1b)")  # fmt: skip
    if staleness.predict and c.optimizer.name == "sgd" and c.optimizer.momentum == 0:
        fail("staleness.predict", "is true, but plain SGD keeps no update direction to predict with",
             "set optimizer.momentum (e.g. 0.9), use adam or adamw, or staleness.predict=false")  # fmt: skip
