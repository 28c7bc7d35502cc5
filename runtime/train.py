"""The training loop, the same in every mode.

- "single": the original model in one process, plain PyTorch: each micro-batch's loss divided
  by micro_batches * step_every, backward, an optimizer step every step_every batches. It is
  the baseline the pipeline modes must match.
- "local": every stage in one process, run by the pipeline engine.
- "dist": this process is one pipeline device (rank) of a torchrun job (see worker.py).

One optimizer step ("step") takes step_every batches of batch_size samples, each split into
micro_batches micro-batches. Batch b of the run is the sampler's batch b, so a step's data
depends only on the seed and the step: resumed runs and every rank see the same batches.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import inspect
import json
import math
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from ftc.ir import FtcError

from . import checkpoint, shared_copies
from .comm import PeerFailure, peer_reason, timed_out
from .config import Config
from .data import (
    Sampler,
    build_dataset,
    epoch_steps,
    held_out_indices,
    split_held_out,
    fingerprint,
    load_batch,
    map_with_dims,
    output_specs,
    synthetic_targets,
    target_batch_dims,
    tree_map,
)
from .engine import BatchStream, Engine, call_loss, one_sample_hint, unique_parameters
from .model_file import ModelFile, function_from_file, load_model_file, user_error
from .materialize import build_stages, load_checkpoint
from .mode import train_model
from .optim import build_optimizer, build_scheduler, lr_factor
from .pipeline import Pipeline, load_pipeline
from .precision import autocast as precision_autocast, check_device as check_precision_device, failure_hint, value_specs
from .seeding import seed_generators, seeded
from .staleness import GAP_SQUARES, SharedSet, StaleWeights, shared_sets


@dataclass
class Rank:
    """Who this process is: its rank, the world, and its share of the pipeline."""

    rank: int
    world_size: int
    device: torch.device
    stages: list[int]


@dataclass
class History:
    """The per-step figures of a run's steps before this process's first: a resumed run takes
    them from its checkpoint, so that its final figures and loss curve are the whole run's, as
    an uninterrupted run's are."""

    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"loss": self.loss, "lr": self.lr, "grad_norm": self.grad_norm,
                "eval": _eval_json(self.eval_loss)}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict) -> History:
        return cls(list(data["loss"]), list(data["lr"]), list(data["grad_norm"]), _eval_pairs(data["eval"]))


def _eval_json(pairs: list[tuple[int, float]]) -> list[dict]:
    return [{"step": step, "loss": loss} for step, loss in pairs]


def _eval_pairs(entries: list[dict]) -> list[tuple[int, float]]:
    return [(entry["step"], entry["loss"]) for entry in entries]


@dataclass
class Results:
    config: dict
    mode: str
    world_size: int
    first_step: int
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    samples_per_s: float = 0.0
    wall_time_s: float = 0.0
    checkpoint: str | None = None
    results: str | None = None
    plot: str | None = None
    peak_memory_bytes: list[int] | None = None  # per rank, on CUDA: torch.cuda.max_memory_allocated
    grad_norm: list[float] = field(default_factory=list)  # per step, before clipping (optimizer.clip_grad_norm)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss), config eval
    # A resumed run's steps before first_step (the lists above hold this process's steps only).
    earlier: History = field(default_factory=History)

    def history(self) -> History:
        """The run's figures from its first step (as far as its checkpoints carried them) to now."""
        earlier = self.earlier
        return History(earlier.loss + self.loss, earlier.lr + self.lr, earlier.grad_norm + self.grad_norm,
                       earlier.eval_loss + self.eval_loss)  # fmt: skip

    def to_json(self) -> dict:
        whole = self.history()
        last = whole.loss[-10:]
        return {
            "config": self.config, "mode": self.mode, "world_size": self.world_size,
            "first_step": self.first_step, "loss": self.loss, "lr": self.lr,
            "samples_per_s": self.samples_per_s, "wall_time_s": self.wall_time_s,
            "final": {"loss": whole.loss[-1] if whole.loss else None,
                      "mean_loss_last_10": sum(last) / len(last) if last else None,
                      "steps": self.first_step + len(self.loss)}
                     | ({"eval_loss": whole.eval_loss[-1][1]} if whole.eval_loss else {}),
            "checkpoint": self.checkpoint, "plot": self.plot, "peak_memory_bytes": self.peak_memory_bytes,
        } | ({"grad_norm": self.grad_norm} if self.grad_norm else {}) | (
            {"eval": _eval_json(self.eval_loss)} if self.eval_loss else {}
        ) | ({"before_resume": self.earlier.to_json()} if self.earlier.loss else {})  # fmt: skip

    @classmethod
    def from_json(cls, data: dict, results: str | None) -> Results:
        """What to_json wrote (`results`: where it was written)."""
        return cls(data["config"], data["mode"], data["world_size"], data["first_step"], data["loss"], data["lr"],
                   data["samples_per_s"], data["wall_time_s"], data["checkpoint"], results, data["plot"],
                   data["peak_memory_bytes"], data.get("grad_norm", []),
                   _eval_pairs(data.get("eval", [])),
                   History.from_json(data["before_resume"]) if "before_resume" in data else History())  # fmt: skip


class SingleProcess:
    """The original model trained the plain way; the same interface as the pipeline engine."""

    def __init__(
        self, model: torch.nn.Module, loss_fn: Callable, micro_batches: int, batch_dims: dict[str, int | None],
        target_dims: Any = 0, autocast: Callable[[], Any] = contextlib.nullcontext, precision: str = "fp32",
    ):  # fmt: skip
        self.model = model
        # precision bf16: each micro-batch's forward and loss in an autocast region of its own, as
        # the pipeline runs each stage's (backward outside it, as torch recommends)
        self.autocast = autocast
        self.precision = precision  # what `autocast` runs, named in the fix for a failing forward
        self.loss_fn = loss_fn
        self.micro_batches = micro_batches
        self.batch_dims = batch_dims  # input name -> its batch dimension (None: shared by all samples)
        self.target_dims = target_dims  # the targets' batch dimensions (data.target_batch_dims)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def _micro_inputs(self, inputs: tuple | dict, i: int) -> tuple | dict:
        def cut(tensor: torch.Tensor, dim: int | None) -> torch.Tensor:
            # A copy, as the pipeline gives each micro-batch: forward may change its input in place.
            return (tensor if dim is None else tensor.chunk(self.micro_batches, dim)[i]).clone()

        if isinstance(inputs, dict):
            return {name: cut(value, self.batch_dims.get(name, 0)) for name, value in inputs.items()}
        dims = list(self.batch_dims.values())
        return tuple(cut(value, dims[k] if k < len(dims) else 0) for k, value in enumerate(inputs))

    def train_step(self, step: int, inputs: Any, targets: Any, loss_scale: float = 1.0) -> float:
        losses = []
        for i in range(self.micro_batches):
            x = self._micro_inputs(inputs, i)
            y = map_with_dims(lambda t, dim: t if dim is None else t.chunk(self.micro_batches, dim)[i], targets, self.target_dims)
            with self.autocast():
                loss = call_loss(self.loss_fn, self._forward(x, i), y)
            (loss * (loss_scale / self.micro_batches)).backward()
            losses.append(loss.detach().reshape(()).to(torch.float64))
        # One read of the device per step, as the engine's mean_loss.
        return (torch.stack(losses).sum() / self.micro_batches).item()

    def _forward(self, x: tuple | dict, i: int, evaluating: bool = False) -> Any:
        try:
            return self.model(**x) if isinstance(x, dict) else self.model(*x)
        except Exception as exc:
            raise user_error(exc, f"the model ({type(self.model).__name__}), micro-batch {i}"
                             f"{' of a held-out batch, in eval mode' if evaluating else ''},",
                             [inspect.getsourcefile(type(self.model)) or ""],
                             failure_hint(self.precision, one_sample_hint(
                                 exc, "check the data against the model file's example_inputs (shapes, dtypes)"))
                             ) from exc  # fmt: skip

    def sync_shared_grads(self) -> None:
        """Nothing to do: one process holds every parameter once."""

    def clip_gradients(self, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))

    def evaluate(self, step: int, inputs: Any, targets: Any) -> tuple[float, Any]:
        """The batch's mean loss over its micro-batches, without gradients (eval mode is the
        caller's), as the engine's evaluate."""
        losses = []
        with torch.no_grad():
            for i in range(self.micro_batches):
                x = self._micro_inputs(inputs, i)
                y = map_with_dims(lambda t, dim: t if dim is None else t.chunk(self.micro_batches, dim)[i], targets, self.target_dims)
                with self.autocast():
                    loss = call_loss(self.loss_fn, self._forward(x, i, evaluating=True), y)
                losses.append(loss.reshape(()).to(torch.float64))
        return (torch.stack(losses).sum() / self.micro_batches).item(), None


def resolve_loss(config: Config, model_file: ModelFile) -> Callable:
    if config.loss is None:
        if model_file.loss_fn is None:
            raise FtcError(f"{model_file.path} defines no loss_fn and config key 'loss' is not set",
                           "add `def loss_fn(output, target)` to the model file or set \"loss\"")  # fmt: skip
        return model_file.loss_fn
    if ":" in config.loss:
        return function_from_file(config.loss, "loss", "ftc_loss")
    name = config.loss.removeprefix("torch.nn.functional.").removeprefix("F.")
    function = getattr(model_file.module, config.loss, None) or getattr(torch.nn.functional, name, None)
    if not callable(function):
        raise FtcError(f"config key 'loss' is {config.loss!r}, which names no function",
                       "name a function of the model file, of torch.nn.functional, or \"file.py:function\"")  # fmt: skip
    return function


def recompute_set(config: Config, pipeline: Pipeline) -> set[int]:
    if config.recompute == "always":
        return {s.index for s in pipeline.stages}
    if config.recompute == "never":
        return set()
    return {s.index for s in pipeline.stages if s.recompute}


def check_sparse_gradients(config: Config, modules: list[torch.nn.Module]) -> None:
    """nn.Embedding(sparse=True) and nn.EmbeddingBag(sparse=True) make sparse gradients, which
    Adam and AdamW refuse, SGD cannot combine with weight decay, and clipping cannot take the
    norm of: say so before training."""
    sparse = sorted({
        f"{name}.weight" if name else "weight"
        for module in modules
        for name, layer in module.named_modules()
        if isinstance(layer, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and layer.sparse and layer.weight.requires_grad
    })  # fmt: skip
    if not sparse:
        return
    if config.schedule == "async" and config.mode != "single" and config.staleness.gap_aware:
        raise FtcError(f"config {config.source}: staleness.gap_aware cannot scale the sparse gradients of "
                       f"{', '.join(sparse)}", "set staleness.gap_aware=false, or build the embedding with "
                       "sparse=False")  # fmt: skip
    if config.optimizer.name in ("adam", "adamw"):
        raise FtcError(f"config {config.source}: optimizer.name {config.optimizer.name} cannot update the sparse "
                       f"gradients of {', '.join(sparse)} (an embedding built with sparse=True)",
                       "set optimizer.name to sgd, or build the embedding with sparse=False")  # fmt: skip
    if config.optimizer.clip_grad_norm is not None:
        raise FtcError(f"config {config.source}: optimizer.clip_grad_norm cannot take the norm of the sparse "
                       f"gradients of {', '.join(sparse)} (an embedding built with sparse=True; torch's "
                       "clip_grad_norm_ cannot either)",
                       "leave optimizer.clip_grad_norm out, or build the embedding with sparse=False")  # fmt: skip
    if config.optimizer.weight_decay:
        raise FtcError(f"config {config.source}: optimizer.weight_decay {config.optimizer.weight_decay:g} cannot apply "
                       f"to the sparse gradients of {', '.join(sparse)} (an embedding built with sparse=True)",
                       "set optimizer.weight_decay to 0, or build the embedding with sparse=False")  # fmt: skip


def check_writable(config: Config) -> None:
    """The folders the run writes into (checkpoint.dir, and those of results and plot) exist or
    can be made, and take files: found before training, not at its first checkpoint or its end."""
    places = [("checkpoint.dir", Path(config.checkpoint.dir))] if config.checkpoint.dir else []
    places += [(key, Path(getattr(config, key)).parent) for key in ("results", "plot") if getattr(config, key)]
    for key, folder in places:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".ftc-write-test-"):
                pass
        except OSError as exc:
            raise FtcError(f"config {config.source}: key {key!r}: cannot write into {folder} "
                           f"({type(exc).__name__}: {exc.strerror or exc})",
                           f"set {key} to a path in a folder this user can write") from exc  # fmt: skip
    for key in ("results", "plot"):
        path = getattr(config, key)
        if path and Path(path).is_dir():
            raise FtcError(f"config {config.source}: key {key!r} is {path}, a folder", "give it a file path")


def check_trainable(pipeline: Pipeline, model_file: ModelFile) -> None:
    """Training needs a loss that some parameter's gradient flows into; pipeline.json records
    whether each output of the model needs a gradient. Without one, backward would fail deep
    inside autograd; a model whose parameters are frozen only in part trains them as usual."""
    values = pipeline.manifest["values"]
    if any(values.get(name, {}).get("requires_grad") for name in pipeline.outputs):
        return
    raise FtcError(f"{model_file.path}: no output of the model depends on a trainable parameter (every parameter has "
                   "requires_grad=False, or forward computes the outputs under torch.no_grad): training would have "
                   "nothing to update",
                   "leave requires_grad=True on the parameters to train (build_model), then recompile with "
                   f"`ftc compile` ({pipeline.folder} records the outputs' requires_grad of compile time)")  # fmt: skip


def check_unpacked_inputs(pipeline: Pipeline) -> None:
    """Data sets stack one sample per row of each input's batch dimension, and the engine cuts
    micro-batches by slicing it: an input with several rows per sample (pipeline.packed_inputs)
    would meet a wrong batch size deep in the data set, or wrong offsets in a stage."""
    packed = pipeline.packed_inputs
    if packed:
        name, rows = next(iter(packed.items()))
        spec = pipeline.manifest["values"][name]
        shape, dim = list(spec["shape"]), spec["batch_dim"]
        raise FtcError(f"{pipeline.folder}: input {name!r} has {rows:g} rows per sample along its batch dimension "
                       f"(dim {dim} of its shape {shape} at batch size {pipeline.manifest['batch_size']}: "
                       "a packed input, such as EmbeddingBag's flat indices with offsets or a graph's edge list "
                       "[2, E]): training stacks one sample per row and cuts micro-batches by slicing rows, which "
                       "cannot split it",
                       "give the model one row per sample: e.g. indices [batch, bag_size] (EmbeddingBag takes 2-D "
                       "input; pad with padding_idx), tokens [batch, T] reshaped inside forward, or graphs of equal "
                       "size batched as nodes [batch, N, F] and edges [batch, 2, E]")  # fmt: skip
    for name in pipeline.inputs:
        spec = pipeline.manifest["values"].get(name, {})
        if spec.get("kind") == "tensor" and spec.get("other_batch_dims"):
            dims = [spec["batch_dim"], *spec["other_batch_dims"]]
            raise FtcError(f"{pipeline.folder}: input {name!r} grows with the batch in dimensions {dims} of its shape "
                           f"{spec['shape']} at batch size {pipeline.manifest['batch_size']} (a relation between "
                           "samples, such as a [B, B] mask): training stacks inputs from single samples and cuts "
                           "micro-batches by slicing one dimension, which cannot make it",
                           "compute it inside forward from per-sample inputs (e.g. the mask from per-sample ids)")  # fmt: skip


def check_micro_batch_size(config: Config, pipeline: Pipeline) -> None:
    """A forward bounded in batch size (pipeline.json's batch_range, from the compiler) would
    fail inside a stage, or the original model in mode single, with a shape error naming
    neither the bound nor the config keys that set the micro-batch."""
    if pipeline.batch_range is None:
        return
    low, high = pipeline.batch_range
    size = config.batch_size // config.micro_batches
    if low <= size <= high:
        return
    fits = [m for m in range(1, config.batch_size + 1) if config.batch_size % m == 0 and low <= config.batch_size // m <= high]
    hint = (f"set micro_batches to {', '.join(map(str, fits[:4]))}{' or more' if len(fits) > 4 else ''}"
            f" (keeping batch_size {config.batch_size}), or change batch_size" if fits
            else f"choose batch_size and micro_batches with batch_size / micro_batches from {low} to {high}")  # fmt: skip
    raise FtcError(f"config {config.source}: micro-batches of {size} samples (batch_size {config.batch_size} / "
                   f"micro_batches {config.micro_batches}) are outside the batch sizes {low} to {high} that the model's "
                   f"forward works for ({pipeline.folder}/pipeline.json: batch_range, found by the compiler: a size "
                   "computed from the batch meets a fixed-size tensor, such as a slice of a buffer)", hint)  # fmt: skip


def memory_plan_differences(config: Config, pipeline: Pipeline) -> list[str]:
    """Where the config trains with more memory per stage than a pipeline compiled under
    --memory-limit was planned for (pipeline.json's settings); one line each, empty when it fits
    the plan or no limit was set."""
    settings = pipeline.manifest.get("settings", {})
    if settings.get("memory_limit") is None:
        return []
    planned_sample_share = pipeline.manifest["batch_size"] / pipeline.planned_micro_batches
    optimizer = config.optimizer.name
    if optimizer == "sgd" and config.optimizer.momentum:
        optimizer = "momentum"
    # Copies of the parameters each keeps (the compiler's OPTIMIZER_STATES, which the runtime,
    # reading only generated folders, does not import).
    states = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}
    differences = []
    planned_schedule = settings.get("schedule", "1f1b")
    if config.schedule == "gpipe" and planned_schedule != "gpipe":
        differences.append(f"schedule gpipe (planned: {planned_schedule}; gpipe keeps every micro-batch's activations)")
    if config.schedule == "async" and planned_schedule != "async":
        differences.append(f"schedule async (planned: {planned_schedule}; async keeps more copies of each stage's "
                           "trainable parameters, the stashed weight versions: two when micro_batches * step_every "
                           "is at least the stage's depth, up to the depth when it is less, and the stage's depth "
                           "in micro-batches in flight; compile with --schedule async)")  # fmt: skip
    if config.batch_size / config.micro_batches > planned_sample_share:
        differences.append(
            f"micro-batches of {config.batch_size / config.micro_batches:g} samples (batch_size / micro_batches; "
            f"planned: {planned_sample_share:g})"
        )
    elif config.schedule == "gpipe" and config.batch_size > pipeline.manifest["batch_size"]:
        differences.append(f"batch_size {config.batch_size} under gpipe (planned: {pipeline.manifest['batch_size']})")
    planned_optimizer = settings.get("optimizer", "adam")
    if states.get(optimizer, 2) > states.get(planned_optimizer, 2):
        differences.append(f"optimizer {optimizer} (planned: {planned_optimizer}, which keeps less state)")
    planned_device = settings.get("device", "cpu")
    if config.device == "cuda" and planned_device != "cuda" and optimizer in ("adam", "adamw"):
        differences.append(f"device cuda (planned: {planned_device}; {optimizer}'s step on CUDA makes one copy of "
                           "all the parameters, on the CPU two of the largest)")  # fmt: skip
    if config.recompute == "never" and any(s.recompute for s in pipeline.stages):
        planned = [s.index for s in pipeline.stages if s.recompute]
        differences.append(f"recompute never (planned: stages {planned} recompute)")
    if not differences:
        return []
    return [
        f"{pipeline.folder} was partitioned to fit {settings['memory_limit'] / 1e6:.1f} MB per device (--memory-limit), "
        f"but config {config.source} trains with " + "; ".join(differences) + ": stages may need more memory "
        "than the limit\n  fix: recompile with these settings (ftc compile --schedule, --micro-batches, "
        "--batch-size, --optimizer, --device), or train with the planned ones (`ftc explain` shows the plan)"
    ]


def plan_rank(config: Config, pipeline: Pipeline, rank: int, world_size: int, device: torch.device) -> Rank:
    if config.mode != "dist":
        return Rank(0, 1, device, [s.index for s in pipeline.stages])
    return Rank(rank, world_size, device, [s.index for s in pipeline.stages if s.device == rank])


def build_single(config: Config, model_file: ModelFile, device: torch.device) -> torch.nn.Module:
    seed_generators(config.seed)
    model = model_file.build()
    if config.init is not None:
        # the pipeline modes' reader, so their errors match
        load_checkpoint({0: model}, config.init, set(model.state_dict(keep_vars=True)))
    # As a plain loop does: the model's own train() may keep some layers in eval mode.
    train_model(model, True)
    return model.to(device)


class Progress:
    """A \\r status line on a terminal, plus a log line every log_every steps; only the latter
    when the output is not a terminal."""

    def __init__(self, steps: int, log_every: int, enabled: bool):
        self.steps = steps
        self.log_every = log_every
        self.enabled = enabled
        self.tty = enabled and sys.stdout.isatty()
        self.status_width = 0  # of the \r line on screen, which the next line must cover

    def update(self, step: int, loss: float, lr: float, samples_per_s: float, grad_norm: float | None = None) -> None:
        if not self.enabled:
            return
        speed = f"{samples_per_s:.1f} samples/s" if samples_per_s else "- samples/s"
        norm = f"  grad norm {grad_norm:.3g}" if grad_norm is not None else ""
        line = f"step {step + 1:>{len(str(self.steps))}}/{self.steps}  loss {loss:.4f}{norm}  lr {lr:.3g}  {speed}"
        if (step + 1) % self.log_every == 0 or step + 1 == self.steps or step == 0:
            print(("\r" + line.ljust(self.status_width)) if self.tty else line, flush=True)
            self.status_width = 0
        elif self.tty:
            bar = "#" * (20 * (step + 1) // self.steps)
            status = f"[{bar:<20}] {line}"
            print("\r" + status.ljust(self.status_width), end="", flush=True)
            self.status_width = len(status)

    def note(self, line: str) -> None:
        """A line of its own (an evaluation's result), over the status line where one shows."""
        if not self.enabled:
            return
        print(("\r" + line.ljust(self.status_width)) if self.tty else line, flush=True)
        self.status_width = 0


class Status:
    """This rank's state in FTC_STATUS_DIR/rank-<r>.json (when set), so the launcher can say
    which rank failed, at which step, and why."""

    def __init__(self, rank: int):
        folder = os.environ.get("FTC_STATUS_DIR")
        self.path = Path(folder) / f"rank-{rank}.json" if folder else None
        self.rank = rank

    def write(self, state: str, step: int, error: str | None = None, caused_by_peer: bool = False) -> None:
        """`caused_by_peer`: the error is another rank's failure seen from here (PeerFailure)."""
        if self.path is not None:
            checkpoint.write_json(self.path, {"rank": self.rank, "state": state, "step": step, "error": error,
                                              "caused_by_peer": caused_by_peer})  # fmt: skip


def counted(count: float, noun: str, nouns: str | None = None) -> str:
    """'1 step', '3 steps', '0.5 epochs'."""
    return f"{count:g} {noun if count == 1 else nouns or noun + 's'}"


def check_fault_rank(config: Config, world_size: int) -> None:
    """An injected fault must name a rank of the run (modes single and local: rank 0), or it
    never strikes and a test of the fault passes without one."""
    fault = config.inject_fault
    if fault is not None and fault.rank >= world_size:
        raise FtcError(f"config {config.source}: key 'inject_fault.rank' is {fault.rank}, but the run has "
                       f"{world_size} process(es) (mode {config.mode}), ranks 0 to {world_size - 1}")  # fmt: skip


def inject_fault(config: Config, me: Rank, step: int, modules: list[torch.nn.Module]) -> None:
    fault = config.inject_fault
    if fault is None or fault.rank != me.rank or fault.step != step:
        return
    if fault.kind == "exit":
        os._exit(3)
    if fault.kind == "hang":
        while True:
            time.sleep(1)
    with torch.no_grad():
        for module in modules:
            for param in module.parameters():
                param.fill_(float("nan"))


def training_device(config: Config, rank: int) -> torch.device:
    """The config's device; in mode dist on CUDA, this rank's GPU (ranks beyond the GPU count
    share GPUs round-robin, which only gloo allows)."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise FtcError(f"config {config.source}: key 'device' is \"cuda\", but torch here sees no CUDA device "
                       f"(torch {torch.__version__})", 'set device to "cpu", or install a CUDA build of torch')  # fmt: skip
    if config.device == "cuda" and config.mode == "dist":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    return torch.device(config.device)


def train(config: Config, rank: int = 0, world_size: int = 1, status: Status | None = None) -> Results:
    """Train per `config` as rank `rank` of `world_size` (mode "dist": the process group is up);
    return the results (rank 0 also writes them)."""
    status = status or Status(rank)
    status.write("setting up", -1)
    started = time.perf_counter()
    # For the waits that may be long (building the stages and the data set; writing checkpoints),
    # which timeout_s, the bound of one message, must not cut short. Made while the ranks are in
    # step: new_group is collective.
    setup_group = (
        dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=config.setup_timeout_s))
        if config.mode == "dist"
        else None
    )
    pipeline = load_pipeline(config.pipeline)
    model_file = load_model_file(pipeline.model_file_or(config.model))
    loss_fn = resolve_loss(config, model_file)
    if config.mode == "dist" and pipeline.num_devices != world_size:
        raise FtcError(f"{pipeline.folder} places its stages on {pipeline.num_devices} devices, "
                       f"but {world_size} processes run", "set nprocs to the number of pipeline devices")  # fmt: skip
    recorded = pipeline.manifest.get("model_file_sha256")
    if rank == 0 and recorded is not None and recorded != model_file.digest():
        print(f"ftc train: warning: {model_file.path} is not the model file {pipeline.folder} was compiled from "
              "(it changed since, or is another file): the stages run the code of compile time, and only the values "
              "passed between stages are checked\n  fix: recompile with `ftc compile`; `ftc check` compares the "
              "stages with this model file", file=sys.stderr, flush=True)  # fmt: skip
    if config.nprocs is not None and config.mode != "dist":
        print(f"ftc train: warning: config {config.source}: nprocs ({config.nprocs}) applies to mode dist; mode "
              f"{config.mode} runs in this one process", file=sys.stderr, flush=True)  # fmt: skip
    if rank == 0 and config.mode == "single" and config.schedule == "async":
        print("ftc train: note: mode single trains the original model synchronously: schedule async applies to "
              "modes local and dist", file=sys.stderr, flush=True)  # fmt: skip
    if rank == 0 and config.mode != "single":
        for line in memory_plan_differences(config, pipeline):
            print(f"ftc train: warning: {line}", file=sys.stderr, flush=True)
    check_fault_rank(config, world_size if config.mode == "dist" else 1)
    check_unpacked_inputs(pipeline)
    check_micro_batch_size(config, pipeline)
    check_trainable(pipeline, model_file)
    if rank == 0:
        check_writable(config)
    device = training_device(config, rank)
    check_precision_device(config.precision, device, config.source)
    batch_dims = {name: pipeline.manifest["values"].get(name, {}).get("batch_dim", 0) for name in pipeline.inputs}
    # Synthetic targets shaped like the outputs, where the model file does not say what they are.
    shaped = config.data["name"] == "synthetic" and getattr(model_file.module, "example_targets", None) is None
    outputs = synthetic_targets(output_specs(pipeline, config.batch_size // config.micro_batches), loss_fn) if shaped else None
    target_dims = target_batch_dims(model_file, outputs)
    dataset = None
    if config.epochs is not None:
        # Every rank counts the steps itself (the data set's size decides them), so ranks that
        # read no data build the data set too, once.
        with seeded(config.seed):
            dataset = build_dataset(config.data, model_file, outputs)
        config = replace(config, steps=epoch_steps(config.epochs, training_samples(config, len(dataset)),
                                                   config.batch_size * config.step_every))  # fmt: skip
    if rank == 0 and config.lr_schedule.warmup_steps >= config.steps > 0:
        print(f"ftc train: warning: config {config.source}: lr_schedule.warmup_steps ({config.lr_schedule.warmup_steps}) "
              f"is not below steps ({config.steps}): the learning rate never reaches optimizer.lr "
              f"({config.optimizer.lr:g}), and no decay follows", file=sys.stderr, flush=True)  # fmt: skip
    me = plan_rank(config, pipeline, rank, world_size, device)

    # Mode single is the synchronous baseline whatever the schedule: it has no pipeline.
    asynchronous = config.schedule == "async" and config.mode != "single"
    if config.mode == "single":
        model = build_single(config, model_file, device)
        engine: Any = SingleProcess(model, loss_fn, config.micro_batches, batch_dims, target_dims,
                                    autocast=functools.partial(precision_autocast, device, config.precision),
                                    precision=config.precision)  # fmt: skip
        modules = [model]
    else:
        stage_modules = build_stages(model_file, pipeline, me.stages, me.device, config.seed, config.init)
        if config.mode == "dist":
            # Mode local builds the model once: there, what stages share is one tensor.
            digests = gather_setup(setup_group, shared_copies.digests(pipeline, stage_modules), world_size)
            shared_copies.check_equal(pipeline, digests)
        modules = list(stage_modules.values())
        # The dtypes values cross devices in under autocast, learned once for every engine of the
        # run (in dist, the ranks tell each other what their stages produce).
        exchange = functools.partial(gather_setup, setup_group, world_size=world_size) if config.mode == "dist" else None
        values = value_specs(pipeline, stage_modules, device, config.precision, exchange)
        make_engine = functools.partial(
            Engine, pipeline, stage_modules, schedule=config.schedule, loss_fn=loss_fn, seed=config.seed,
            device=device, recompute=recompute_set(config, pipeline), distributed=config.mode == "dist",
            timeout_s=config.timeout_s, target_dims=target_dims, precision=config.precision, values=values,
        )  # fmt: skip
        if not asynchronous:
            engine = make_engine(micro_batches=config.micro_batches, batch_size=config.batch_size)
    parameters = unique_parameters(stage_modules) if asynchronous else engine.parameters()
    check_sparse_gradients(config, modules)
    # A rank may hold only parameter-free stages (a pooling, a normalization): it steps nothing.
    optimizer = build_optimizer(parameters, config.optimizer) if parameters else None
    scheduler = build_scheduler(optimizer, config.lr_schedule, config.optimizer.lr, config.steps) if optimizer else None
    if asynchronous:
        stale = StaleWeights(stage_modules, optimizer, lambda step: learning_rate(config, step), config.staleness,
                             config.micro_batches * config.step_every, pipeline.tied,
                             async_shared_sets(pipeline, config.mode == "dist", config.timeout_s))  # fmt: skip
        engines: dict[int, Engine] = {}

        def segment_engine(steps: int) -> Engine:
            """The engine of a segment of `steps` steps (their micro-batches in one run)."""
            if steps not in engines:
                batches = steps * config.step_every
                engines[steps] = make_engine(micro_batches=batches * config.micro_batches,
                                             batch_size=batches * config.batch_size, stale=stale,
                                             batch_micro_batches=config.micro_batches)  # fmt: skip
            return engines[steps]

        engine = segment_engine(segment_end(config, 0))
    # Async engines run segments of steps with stale weights: evaluation runs a plain one (made
    # here, where every rank is in step, as its process groups need).
    eval_engine = make_engine(micro_batches=config.micro_batches, batch_size=config.batch_size, schedule="1f1b") if (
        asynchronous and config.eval.every) else engine  # fmt: skip

    root = Path(config.checkpoint.dir) if config.checkpoint.dir else None
    first_step, run = 0, uuid.uuid4().hex[:12]
    resumed_from: Path | None = None
    if root is not None:
        # Rank 0 clears half-written step folders before any rank can write one (that needs a
        # step, which needs rank 0); complete ones stay, the latest for the others to resume from.
        folder = checkpoint.prepare(root, config.checkpoint.resume) if rank == 0 else checkpoint.latest(root)
        if config.mode == "dist" and config.checkpoint.resume:
            # Every rank resumes from rank 0's choice: prepare may have just put a step folder in
            # place (checkpoint.prepare), after another rank looked for the latest.
            folder = gather_setup(setup_group, folder, world_size)[0]
        if rank == 0 and config.checkpoint.resume:
            for damaged, missing in checkpoint.damaged_steps(root).items():
                print(f"ftc train: warning: skipped {damaged}: it lacks {', '.join(missing)}", file=sys.stderr, flush=True)
        if folder is not None and config.checkpoint.resume:
            model_keys = {key for stage in pipeline.stages for key in stage.state} | set(pipeline.tied)
            model_keys |= {key for module in modules for key in module.state_dict()}  # mode single: the model's
            first_step = resume(folder, me, modules, optimizer, scheduler, pipeline.tied, model_keys)
            resumed_from = folder
            if rank == 0:
                for line in sampling_changes(config, checkpoint.manifest(folder)):
                    print(f"ftc train: warning: {line}", file=sys.stderr, flush=True)
            run = checkpoint.run_of(folder)
        elif rank == 0 and config.checkpoint.resume:
            print(f"ftc train: warning: checkpoint.resume is true, but {root} holds no complete checkpoint: training "
                  "starts at step 1", file=sys.stderr, flush=True)  # fmt: skip

    # The engine's message plan says which ranks read inputs and which computes the loss.
    reads_inputs, reads_targets = (True, True) if config.mode == "single" else (engine.reads_inputs, engine.reads_targets)
    if not (reads_inputs or reads_targets):
        dataset = None
    elif dataset is None:
        with seeded(config.seed):
            dataset = build_dataset(config.data, model_file, outputs)
    # With evaluation, training draws from the data set's first samples, evaluation its last.
    trained = training_samples(config, len(dataset)) if dataset is not None else None
    sampler = Sampler(trained, config.batch_size, config.seed) if dataset is not None else None
    if rank == 0 and trained is not None:
        for line in small_split_warnings(config, len(dataset), trained):
            print(f"ftc train: warning: {line}", file=sys.stderr, flush=True)
    if config.mode == "dist":
        agree_on_data(setup_group, dataset, sampler, world_size)
    def load(batches: list[int]) -> tuple[Any, Any]:
        """The samples of these batches as one batch, on the device: (inputs, targets), None for
        what this rank does not read."""
        if sampler is None:
            return None, None
        return load_samples([i for batch in batches for i in sampler.indices(batch)])

    def load_held_out(batch: int) -> tuple[Any, Any]:
        if sampler is None:
            return None, None
        return load_samples(held_out_indices(trained, len(dataset), batch, config.batch_size))

    def load_samples(indices: list[int]) -> tuple[Any, Any]:
        inputs, targets = load_batch(dataset, indices, reads_inputs, reads_targets, batch_dims, target_dims)
        if inputs is not None:
            check_inputs(inputs, pipeline, config)
        return tuple(None if t is None else tree_map(lambda x: x.to(device), t) for t in (inputs, targets))

    results = Results(config.to_json(), config.mode, world_size, first_step, checkpoint=str(root) if root else None)
    if rank == 0 and first_step:
        results.earlier = earlier_history(resumed_from)
    progress = Progress(config.steps, config.log_every, enabled=rank == 0)
    if rank == 0:
        epochs = f" ({counted(config.epochs, 'epoch')})" if config.epochs is not None else ""
        held_out = f", the last {len(dataset) - trained} held out for eval" if dataset is not None and config.eval.every else ""
        print(f"{pipeline.name}: mode {config.mode}, {counted(world_size, 'process', 'processes')}, "
              f"{counted(len(pipeline.stages), 'stage')}, schedule {config.schedule}{async_settings(config)}, "
              f"{'bf16 autocast, ' if config.precision == 'bf16' else ''}"
              f"batch {config.batch_size} = {counted(config.micro_batches, 'micro-batch', 'micro-batches')}"
              f"{f' x {config.step_every} per step' if config.step_every > 1 else ''}, {counted(config.steps, 'step')}{epochs}, "
              f"data {config.data['name']}" + (f" ({len(dataset)} samples{held_out})" if dataset is not None else ""),
              flush=True)  # fmt: skip
        if first_step:
            print(f"resumed from {checkpoint.step_folder(root, first_step)}", flush=True)
    samples, timed_from = 0, time.perf_counter()
    step = first_step
    while step < config.steps:
        # Async: a segment of steps runs as one pipeline fill and drain; the others: one step.
        end = segment_end(config, step) if asynchronous else step + 1
        # Steps as people see them, in the progress lines and in errors, count from 1; an async
        # segment's failure is reported at its first step (its steps overlap).
        status.write("running", step + 1)
        for later in range(step, end):
            inject_fault(config, me, later + 1, modules)
        if asynchronous:
            losses = train_segment(segment_engine(end - step), stale, config, step, end, load)
        else:
            batch_losses = [
                engine.train_step(batch, *load([batch]), loss_scale=1.0 / config.step_every)
                for batch in range(step * config.step_every, end * config.step_every)
            ]
            losses = [sum(batch_losses) / len(batch_losses)]
        for done, loss in enumerate(losses, start=step + 1):
            if not math.isfinite(loss):
                raise FtcError(f"the loss is {loss} at step {done}; stopping",
                               "lower optimizer.lr, add warmup (lr_schedule.warmup_steps) or check the data")  # fmt: skip
        if not asynchronous:
            engine.sync_shared_grads()
            if config.optimizer.clip_grad_norm is not None:
                results.grad_norm.append(engine.clip_gradients(config.optimizer.clip_grad_norm))
        if optimizer is not None:
            if not asynchronous:  # async segments stepped each stage as its backwards finished
                optimizer.step()
            for _ in range(end - step):
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if step == first_step and (not asynchronous or end < config.steps):
            # The first step (segment) pays for warm-up (allocations, connections): throughput starts after it.
            timed_from, samples = time.perf_counter(), 0
        else:
            samples += config.batch_size * config.step_every * (end - step)
        results.samples_per_s = samples / (time.perf_counter() - timed_from) if samples else 0.0
        for done, loss in enumerate(losses, start=step + 1):
            results.loss.append(loss)
            results.lr.append(learning_rate(config, done - 1))
            norm = results.grad_norm[-1] if results.grad_norm else None
            progress.update(done - 1, loss, results.lr[-1], results.samples_per_s, norm)
        # After the last step, and where a multiple of eval.every falls in this step (or segment).
        if config.eval.every and (end == config.steps or end // config.eval.every > step // config.eval.every):
            results.eval_loss.append((end, evaluate(eval_engine, modules, end, config.eval.batches, load_held_out)))
            progress.note(f"eval after step {end}: loss {results.eval_loss[-1][1]:.4f} "
                          f"({counted(config.eval.batches, 'held-out batch', 'held-out batches')})")  # fmt: skip
        step = end
        if root is not None and (
            end == config.steps or (config.checkpoint.every and end % config.checkpoint.every == 0)
        ):
            status.write("checkpointing", end)
            save(root, end, me, modules, optimizer, scheduler, config, run, pipeline.tied, setup_group,
                 results.history())  # fmt: skip
    results.wall_time_s = time.perf_counter() - started
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        results.peak_memory_bytes = [peak] * world_size
        if config.mode == "dist":
            dist.all_gather_object(results.peak_memory_bytes, peak)
    if rank == 0:
        write_results(config, results)
    status.write("done", config.steps)
    return results


def small_split_warnings(config: Config, size: int, trained: int) -> list[str]:
    """Warnings for a training or held-out share of the data set's `size` samples smaller than one
    batch: the sampler (or held_out_indices) then repeats samples within every batch, so a batch's
    mean counts some samples twice or more. Legitimate (overfitting a handful of samples) but
    rarely meant (eval.fraction 0.999 leaves one sample to train on), so said, not refused."""
    lines, batch, data = [], config.batch_size, config.data
    sized = " (data.size)" if data.get("name") == "synthetic" else ""
    held = size - trained
    if trained < batch:
        held_out = f" ({held} more held out for eval)" if held else ""
        lines.append(f"config {config.source}: data set {data['name']!r} has {trained} samples{held_out} to train on, "
                     f"fewer than batch_size ({batch}): every batch repeats samples\n"
                     f"  fix: a larger data set{sized}{', a lower eval.fraction' if held else ''} or a smaller batch_size")  # fmt: skip
    if held and held < batch:
        raise_to = f"an eval.fraction of at least {batch / size:.3g}, " if batch < size / 2 else ""
        lines.append(f"config {config.source}: eval.fraction ({config.eval.fraction:g}) holds out {held} of the {size} "
                     f"samples of data set {data['name']!r}, fewer than batch_size ({batch}): every held-out batch repeats "
                     f"samples, so the held-out loss is a mean over {held}, some counted more often than others\n"
                     f"  fix: {raise_to}a larger data set{sized} or a smaller batch_size")  # fmt: skip
    return lines


def training_samples(config: Config, size: int) -> int:
    """How many of a data set's `size` samples training draws from: the first ones, all but those
    evaluation holds out."""
    return split_held_out(size, config.eval.fraction, config.source) if config.eval.every else size


def evaluate(engine: Any, modules: list[torch.nn.Module], step: int, batches: int, load: Callable) -> float:
    """The mean loss of `batches` held-out batches, every module in eval mode (dropout off,
    normalization by its running statistics), their flags restored after: the model's own
    train() is not called, so the modes an override of it chose for training stay. So are the
    buffers: stage code that keeps a branch on self.training as traced in training mode (export,
    `if self.training: self.mean.mul_(...)`) updates them in eval mode too, where the original
    model does not, and training would go on from other statistics than mode single's."""
    flags = [(module, module.training) for stage in modules for module in stage.modules()]
    buffers = {id(b): (b, b.clone()) for stage in modules for b in stage.buffers()}
    for module, _ in flags:
        module.training = False
    try:
        losses = [engine.evaluate(step, *load(batch))[0] for batch in range(batches)]
    finally:
        for module, training in flags:
            module.training = training
        with torch.no_grad():
            for buffer, value in buffers.values():
                buffer.copy_(value)
    return sum(losses) / len(losses)


def async_settings(config: Config) -> str:
    if config.schedule != "async" or config.mode == "single":
        return ""
    staleness = config.staleness
    mitigations = [name for name, on in (("weight prediction", staleness.predict), ("gap-aware", staleness.gap_aware)) if on]
    return f" (a flush every {staleness.flush_every} steps, weight stashing{''.join(', ' + m for m in mitigations)})"


def learning_rate(config: Config, step: int) -> float:
    return config.optimizer.lr * lr_factor(step, config.lr_schedule, config.optimizer.lr, config.steps)


def segment_end(config: Config, step: int) -> int:
    """Schedule async: the step (exclusive) where the segment starting at `step` flushes: after
    staleness.flush_every steps, at a checkpoint, or at the end; the same boundaries whichever
    step a run resumed from. An injected fault (a testing aid) starts a segment, so that it
    strikes at its step, not at the start of the segment holding it."""
    every = [config.staleness.flush_every] + ([config.checkpoint.every] if config.checkpoint.every else [])
    ends = [config.steps] + [(step // n + 1) * n for n in every]
    fault = config.inject_fault
    if fault is not None and fault.step - 1 > step:
        ends.append(fault.step - 1)
    return min(ends)


def train_segment(engine: Engine, stale: StaleWeights, config: Config, first: int, end: int, load) -> list[float]:
    """Steps first..end-1 as one async pipeline run; the loss of each step (the mean of its
    micro-batches')."""
    stale.begin(first)
    stream = BatchStream(lambda batch: load([batch]), first * config.step_every)
    # The engine divides each micro-batch's loss by all its micro-batches; a step's are 1 / (end - first) of them.
    losses = engine.train_losses(first * config.step_every, stream, None, loss_scale=end - first)
    per_step = config.micro_batches * config.step_every
    return [sum(losses[k : k + per_step]) / per_step for k in range(0, len(losses), per_step)]


def async_shared_sets(pipeline: Pipeline, distributed: bool, timeout_s: float = 60.0) -> list[SharedSet]:
    """Schedule async: the parameter sets several stages hold, with a process group for those
    whose stages sit on several devices in mode dist (new_group is collective: every rank
    makes every group, in the same order)."""
    sets = shared_sets(pipeline)
    if distributed:
        device_of = {s.index: s.device for s in pipeline.stages}
        for entry in sets:
            devices = sorted({device_of[stage] for stage in entry.stages})
            if len(devices) > 1:
                entry.group = dist.new_group(devices, timeout=datetime.timedelta(seconds=timeout_s))
                entry.ranks = devices
    return sets


def check_inputs(inputs: tuple | dict, pipeline: Pipeline, config: Config) -> None:
    """The data set's inputs must be what the pipeline was compiled for, but for the batch size:
    a stage meets another size as a wrong shape somewhere inside, far from its cause."""
    values = pipeline.manifest["values"]
    given = list(inputs) if isinstance(inputs, dict) else pipeline.inputs[: len(inputs)] + [
        f"#{k}" for k in range(len(pipeline.inputs), len(inputs))]  # fmt: skip
    if given != pipeline.inputs and sorted(given) != sorted(pipeline.inputs):
        # An input the pipeline does not take would be dropped by the pipeline modes while mode
        # single passes it to forward (an optional mask, say): the modes would train apart.
        shown = (f"{{{', '.join(repr(k) for k in inputs)}}}" if isinstance(inputs, dict)
                 else f"a tuple of {len(inputs)}")  # fmt: skip
        raise FtcError(f"data set {config.data['name']!r} gives inputs {shown}, but {pipeline.folder} was compiled "
                       f"for the inputs {pipeline.inputs} (the model file's example_inputs)",
                       "make the data set give the inputs example_inputs gives, or change example_inputs and "
                       "recompile")  # fmt: skip
    named = inputs.items() if isinstance(inputs, dict) else zip(pipeline.inputs, inputs)
    for name, value in named:
        spec = values.get(name, {})
        if spec.get("kind") != "tensor":
            continue
        dim, shape = spec.get("batch_dim"), list(spec["shape"])
        compiled = f"{spec['dtype']}[{', '.join('B' if d == dim else str(n) for d, n in enumerate(shape))}]"
        if not isinstance(value, torch.Tensor):
            # A container inside the inputs (a sample's ((x,),)): mode single failed with a raw
            # AttributeError cutting micro-batches, the stages deep inside their first op.
            raise FtcError(f"input {name!r} from data set {config.data['name']!r} is a {type(value).__name__}, but "
                           f"{pipeline.folder} was compiled for a tensor, {compiled}",
                           "give each sample's inputs as a tuple or dict of tensors, one per input of the model, not "
                           "nested in another tuple, list or dict")  # fmt: skip
        got = list(value.shape)
        same_shape = len(got) == len(shape) and all(a == b for d, (a, b) in enumerate(zip(got, shape)) if d != dim)
        if not same_shape or str(value.dtype).removeprefix("torch.") != spec["dtype"]:
            raise FtcError(
                f"input {name!r} from data set {config.data['name']!r} is {str(value.dtype).removeprefix('torch.')}"
                f"{got}, but {pipeline.folder} was compiled for {compiled}",
                "make the data set give what the model file's example_inputs gives (data options such as "
                "data.image), or change example_inputs and recompile",
            )


def gather_setup(group: Any, mine: Any, world_size: int) -> list[Any]:
    """Every rank's `mine`, once every rank has got this far in setting up (`group`'s timeout is
    setup_timeout_s: building stages or a corpus may take long, while timeout_s bounds one message)."""
    gathered: list[Any] = [None] * world_size
    try:
        dist.all_gather_object(gathered, mine, group=group)
    except RuntimeError as exc:
        raise PeerFailure(f"not every rank finished setting up (building its stages and data set) "
                          f"{_within_setup_timeout(exc)} ({peer_reason(exc)})",
                       "raise setup_timeout_s if building takes this long; a rank that failed says why in its own "
                       "line") from exc  # fmt: skip
    return gathered


def _within_setup_timeout(exc: Exception) -> str:
    """How a wait of setup_timeout_s ended: it ran out, or a rank's connection closed (it died)."""
    return "within setup_timeout_s" if timed_out(exc) else "(a rank died)"


def agree_on_data(group: Any, dataset: Any, sampler: Sampler | None, world_size: int) -> None:
    """Wait until every rank has built its data, and check that the ranks reading inputs and the
    one reading targets built the same data set: each builds its own."""
    mine = fingerprint(dataset, sampler.indices(0)) if dataset is not None else None
    prints: list[str | None] = gather_setup(group, mine, world_size)
    readers = {rank: value for rank, value in enumerate(prints) if value is not None}
    if len(set(readers.values())) > 1:
        listed = ", ".join(f"rank {rank}: {value}" for rank, value in readers.items())
        raise FtcError(f"the ranks built different data sets (digest of the first batch: {listed})",
                       "make the data set deterministic: every rank builds it, with Python's, NumPy's and torch's "
                       "generators seeded from the config's seed; seed any other randomness it uses")  # fmt: skip


def save(
    root: Path, step: int, me: Rank, modules: list[torch.nn.Module], optimizer, scheduler, config: Config, run: str,
    tied: dict[str, str], group: Any = None, history: History | None = None,
) -> None:
    """Every rank writes its shard; once all have (`group`, mode dist: a writer of a large shard is
    slow, not dead), rank 0 seals the step. `history`: the run's figures so far, which rank 0's
    shard carries for a resumed run's results."""
    state = {
        "step": step, "optimizer": optimizer.state_dict() if optimizer else None,
        "scheduler": scheduler.state_dict() if scheduler else None,
        "rng": torch.get_rng_state(), "stages": me.stages, "parameters": parameter_names(modules, optimizer, tied),
    }  # fmt: skip
    if me.rank == 0 and history is not None:  # rank 0 writes the results, from any checkpoint's rank 0
        state["history"] = history.to_json()
    if me.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(me.device)
    checkpoint.save_shard(root, step, me.rank, modules, state)
    if group is not None:
        try:
            dist.barrier(group=group)
        except RuntimeError as exc:
            raise PeerFailure(f"not every rank wrote its checkpoint shard of step {step} {_within_setup_timeout(exc)} "
                              f"({peer_reason(exc)})",
                           "a rank that failed says why in its own line; raise setup_timeout_s if shards take "
                           "this long to write") from exc  # fmt: skip
    if me.rank == 0:
        checkpoint.write_manifest(root, step, me.world_size, run, {"mode": config.mode, "sampling": sampling(config)},
                                  config.checkpoint.keep)  # fmt: skip


def sampling(config: Config) -> dict:
    """The settings that decide which samples, and which dropout masks, each step draws."""
    return {"seed": config.seed, "batch_size": config.batch_size, "step_every": config.step_every,
            "data": config.data, "eval.fraction": config.eval.fraction if config.eval.every else None}  # fmt: skip


def sampling_changes(config: Config, manifest: dict) -> list[str]:
    """Lines that say which of the checkpoint's sampling settings this config changes: the
    resumed steps then draw other samples (and dropout masks) than the run would have drawn
    uninterrupted. Checkpoints written before manifests recorded them say nothing."""
    then, now = manifest.get("sampling"), sampling(config)
    if then is None:
        return []
    changed = [key for key in now if json.dumps(then.get(key), sort_keys=True) != json.dumps(now[key], sort_keys=True)]
    return [f"config {config.source}: {key} is {json.dumps(now[key])}, but the checkpoint's run used "
            f"{json.dumps(then.get(key))}: the resumed steps draw other samples (and dropout masks) than that run "
            f"would have" for key in changed]  # fmt: skip


def parameter_names(modules: list[torch.nn.Module], optimizer, tied: dict[str, str]) -> list[str]:
    """The optimizer's parameters by name, in its order (a tied weight by its first name), so a
    checkpoint's optimizer state maps onto the same weights in any mode."""
    if optimizer is None:
        return []
    names: dict[int, str] = {}
    for module in modules:
        for name, param in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), tied.get(name, name))
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


# The state torch's optimizers keep per parameter, by kind: Adam and AdamW read each other's;
# SGD's is its momentum buffer, or async gap-aware's running mean of squares (staleness.py).
_OPTIMIZER_KINDS = {"SGD": "SGD", "Adam": "Adam", "AdamW": "Adam"}


def _state_kind(states: Any) -> str | None:
    """The kind of per-parameter optimizer state (see _OPTIMIZER_KINDS), None when it holds no
    tensors (SGD without momentum)."""
    for state in states:
        if "exp_avg" in state:
            return "Adam"
        if isinstance(state.get("momentum_buffer"), torch.Tensor) or GAP_SQUARES in state:
            return "SGD"
    return None


def _optimizer_state(optimizer: Any, states: list[dict], folder: Path, now: list[str]) -> dict:
    """The optimizer state for this run's parameters `now`, in its order, gathered by name from
    the checkpoint's ranks (`states`): a run may resume with other ranks than wrote it, mode
    single from a pipeline's checkpoint and the reverse (a tied parameter's state is the same
    on every rank that holds it)."""
    by_name: dict[str, Any] = {}
    for state in states:
        saved, optimizer_state = state.get("parameters") or [], state["optimizer"]
        if optimizer_state is None:  # a rank of parameter-free stages
            continue
        for k, name in enumerate(saved):
            if k in optimizer_state["state"]:
                by_name.setdefault(name, optimizer_state["state"][k])
    written, kind = _state_kind(by_name.values()), _OPTIMIZER_KINDS.get(type(optimizer).__name__)
    if written is None:
        by_name = {}  # nothing to carry over (SGD without momentum): any optimizer starts afresh
    elif kind is not None and written != kind:
        raise FtcError(f"checkpoint {folder} holds {written} optimizer state, but the config's optimizer.name is "
                       f"{type(optimizer).__name__.lower()}, which cannot take it over",
                       f"resume with the optimizer that wrote it, or start a new run from its weights: "
                       f"`ftc merge-checkpoint {folder}` and set \"init\" to the merged file")  # fmt: skip
    trained = {name for state in states for name in state.get("parameters") or []}
    missing = sorted(set(now) - trained)
    if missing:
        raise FtcError(f"checkpoint {folder} holds no optimizer state for {len(missing)} of this rank's parameters "
                       f"({', '.join(missing[:5])})",
                       "it is another model's checkpoint: resume with the model that wrote it, or start a new run "
                       "with \"init\" set to a merged checkpoint (ftc merge-checkpoint)")  # fmt: skip
    (group,) = next(state["optimizer"]["param_groups"] for state in states if state["optimizer"] is not None)
    return {
        "state": {k: by_name[name] for k, name in enumerate(now) if name in by_name},
        "param_groups": [{**group, "params": list(range(len(now)))}],
    }


def resume(
    folder: Path, me: Rank, modules: list[torch.nn.Module], optimizer, scheduler, tied: dict[str, str],
    model_keys: set[str] | None = None,
) -> int:  # fmt: skip
    """Load this rank's weights and training state from a complete step folder, whichever mode
    and processes wrote it: weights and optimizer state go by name. `model_keys`: every state key
    of the model (all ranks'), which the checkpoint must not exceed."""
    if model_keys is not None:
        # Each rank loads only its own keys; a checkpoint of a larger model (another model with
        # this one's names, and more) would lose its other weights without a word.
        unknown = sorted({key for keys in checkpoint.manifest(folder)["shards"].values() for key in keys} - model_keys)
        if unknown:
            raise FtcError(f"checkpoint {folder} holds {len(unknown)} weights the model does not have "
                           f"({', '.join(unknown[:5])})",
                           "it is another model's checkpoint: resume with the model and pipeline that wrote it, or "
                           "set checkpoint.dir to a new folder")  # fmt: skip
    written = checkpoint.manifest(folder)["world_size"]
    own = checkpoint.load_training_state(folder, me.rank) if me.rank < written else None
    now = parameter_names(modules, optimizer, tied)
    # The same layout reads its own shard only; another gathers what it holds from every shard.
    states = [own] if own is not None and set(now) <= set(own.get("parameters") or []) else checkpoint.training_states(folder)
    state = own if own is not None else states[0]
    keys = {key for module in modules for key in module.state_dict()}
    weights = checkpoint.load_weights(folder, keys)
    missing = sorted(keys - set(weights))
    if missing:
        raise FtcError(f"checkpoint {folder} lacks {len(missing)} of rank {me.rank}'s weights ({', '.join(missing[:5])})",
                       "it is another model's checkpoint: resume with the model and pipeline that wrote it, or "
                       "set checkpoint.dir to a new folder")  # fmt: skip
    for module in modules:
        for key, tensor in module.state_dict().items():
            if weights[key].shape != tensor.shape:
                raise FtcError(f"checkpoint {folder}: {key} has shape {list(weights[key].shape)} but the model's is "
                               f"{list(tensor.shape)}",
                               "it is the checkpoint of a model built with other settings: resume with the model that "
                               "wrote it, or set checkpoint.dir to a new folder")  # fmt: skip
        module.load_state_dict({key: weights[key] for key in module.state_dict()}, strict=True)
    if optimizer is not None:
        # The config's settings (lr, betas, weight decay, schedule) govern the resumed steps; the
        # checkpoint gives the optimizer's state and the schedule's position.
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(_optimizer_state(optimizer, states, folder, now))
        # Every rank steps the same schedule; one with parameters saved it.
        scheduler.load_state_dict(next(s["scheduler"] for s in [state, *states] if s["scheduler"] is not None))
        scheduler.base_lrs = [group["initial_lr"] for group in settings]
        for group, fresh, factor in zip(optimizer.param_groups, settings, scheduler.lr_lambdas):
            group.update(fresh)
            group["lr"] = fresh["initial_lr"] * factor(scheduler.last_epoch)
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and me.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], me.device)
    return state["step"]


def earlier_history(folder: Path) -> History:
    """The figures of the steps up to the checkpoint `folder` that it carries (none from a
    checkpoint written before checkpoints carried them)."""
    data = checkpoint.load_training_state(folder, 0).get("history")
    return History() if data is None else History.from_json(data)


def write_results(config: Config, results: Results) -> None:
    if not results.loss and _reached_by_earlier_results(config, results.first_step):
        # Resuming a finished run trains nothing: its results and loss curve stay, not an empty
        # pair written over them (mode dist's launcher then reads the kept results).
        results.results = config.results
        results.plot = config.plot if config.plot and Path(config.plot).is_file() else None
        return
    if config.plot:
        plot_loss(Path(config.plot), results)
        results.plot = config.plot
    if config.results:
        results.results = config.results
        checkpoint.write_json(Path(config.results), results.to_json())


def _reached_by_earlier_results(config: Config, step: int) -> bool:
    """Whether config.results already holds the results of a run that ended at `step`."""
    if not config.results or step == 0:
        return False
    try:
        earlier = json.loads(Path(config.results).read_text())
        return earlier["final"]["steps"] == step
    except (OSError, ValueError, KeyError, TypeError):
        return False


def plot_loss(path: Path, results: Results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.ticker
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4))
    whole = results.history()  # a resumed run's curve starts where its checkpoints' history does
    first = results.first_step - len(results.earlier.loss)
    axes.plot(range(first + 1, first + len(whole.loss) + 1), whole.loss, linewidth=1, label="training")
    if whole.eval_loss:
        axes.plot(*zip(*whole.eval_loss), marker="o", linewidth=1, label="held out")
        axes.legend()
    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes.set_ylabel("loss")
    # A log scale drops losses at or below zero (a negative log-likelihood, a custom loss), and
    # within a decade it shows little but tick labels such as 2.4×10⁰.
    shown = whole.loss + [loss for _, loss in whole.eval_loss]
    axes.set_yscale("log" if min(shown, default=0) > 0 and max(shown) >= 10 * min(shown) else "linear")
    name = Path(results.config["pipeline"]).name
    axes.set_title(f"{name}: {results.mode}, {counted(results.world_size, 'process', 'processes')}, {results.config['schedule']}")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    # The format the path names (loss.pdf, loss.svg), PNG for any other.
    kind = path.suffix.lstrip(".").lower()
    figure.savefig(temp, format=kind if kind in figure.canvas.get_supported_filetypes() else "png", dpi=100)
    pyplot.close(figure)
    os.replace(temp, path)


def summary(results: Results) -> str:
    final = results.to_json()["final"]
    if not results.loss:
        steps = results.config.get("steps", final["steps"])
        return f"nothing to train: the run is at step {final['steps']}, and the config asks for {steps} steps"
    lines = [
        f"final loss {final['loss']:.4f} (mean of the last {counted(min(10, len(results.history().loss)), 'step')} "
        f"{final['mean_loss_last_10']:.4f}) after {counted(final['steps'], 'step')}"
        + (f", held-out loss {final['eval_loss']:.4f}" if "eval_loss" in final else ""),
        (f"{results.samples_per_s:.1f} samples/s" if results.samples_per_s else
         "samples/s not measured (it counts from the end of the first step, or under async the first segment, "
         "and this run had no other)") + f", wall time {results.wall_time_s:.1f} s",
    ]
    for label, value in (
        ("results", results.results),
        ("loss curve", results.plot),
        ("checkpoints", results.checkpoint),
    ):
        if value:
            lines.append(f"{label}: {_shown(value)}")
    return "\n".join(lines)


def _shown(path: str) -> str:
    """A path as short as it is unambiguous: relative to the working folder when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
