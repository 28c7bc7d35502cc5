"""Measured profile: every node's forward and backward time and the activation memory it keeps,
timed on real tensors at the compile batch size.

Two ways to run, both node by node with the IR interpreter:

- in context (the default): the real model is built on the device and the whole graph runs
  forward, then backward from all floating outputs, `warmup + repeats` times. Forward time is
  the clock around each node; backward time is attributed through post hooks on the autograd
  nodes each IR node created: the engine runs them one after another, so the time from one
  hook to the next belongs to the node whose hook fired, engine bookkeeping included, less
  the cost of a hook itself (calibrated on a chain of cheap ops), and less one engine start
  for the first (the whole model's backward starts the engine once; every stage pays its own
  start, in the stage call below). So a stage's predicted time, the sum of its nodes' times
  and one stage call, is what running that stage forward and backward costs, with the caches
  as warm as in training and the engine's per-node overhead, which a node timed alone on its
  cut inputs would not give (each such backward pays a whole engine start).
- save-memory (FTPipe's mode, for models larger than the device): the model stays on the meta
  device; each node gets only the parameters it reads materialized on the device (values from
  `initial_state`, good for timing), runs forward and its own backward on inputs cut from the
  graph, and its outputs go back to the host, where all activations live (views and in-place
  writes keep sharing memory there as in the model, so the values are the model's). Each
  backward then pays one engine start, which a stage pays once; the start of a trivial
  backward, measured the same way, is subtracted.

Beside the nodes, both modes time what every stage pays once (Graph.stage_cost): calling a
stage module whose forward returns a view of its input, and its backward, which starts the
engine; and the training loss (Graph.loss_cost), the model file's loss_fn on the model's
outputs cut from the graph, with a target made as the runtime's data sets make one
(ftc/profiling/loss.py), forward and backward (less an engine start), as the last stage runs it.

In context, a node's time is what it costs inside the whole model's run, where the code and
data of its kind of op (its module class, its function) are warm from the kind's earlier ops.
A stage runs between other work (the rest of its device's schedule), so its first op of each
kind finds them cold: on this project's CPU a stage of one Linear (8 x 256 features) took 41 us
beyond the Linear's time in a chain of them, where a stage of one ReLU took what the stage call
predicts. For every kind the model runs more than once, a few of its ops are also timed alone,
called again and again as a one-op stage is; what they take beyond their in-context time is
the kind's cost to a stage (Graph.kind_costs), which the partitioner charges once to each stage
holding the kind (ftc/passes/partition/problem.py). The ops the whole model's run meets first
of their kind, forward and backward, meet it cold there, and the forward's first op also finds
what the backward before it left in the caches (an Embedding at the model's start took twice
its time alone): those ops are timed alone too and take that time, less the kind's cost.

Node times are medians over the repeats, which resist the odd slow run, less what timing a
node adds (the clock's stamps, the interpreter's dispatch), which stage code does not pay;
the calibrations (that overhead, a hook, an engine start, a stage call) take the fastest try,
as they want a fixed cost, not the noise. The engine start is taken anew right before each
timed backward it is subtracted from: a machine's speed drifts (on a shared one, 2x within
seconds), and an engine start taken once, in a slow moment, would swallow a fast backward. On
the CPU torch runs with `threads` intra-op threads
(torch.set_num_threads, restored afterwards; the default 1 models one pipeline stage per core)
and, with one thread, the clock is that thread's CPU time, so that other programs on a busy
machine do not show up in the profile; with more, it is time.perf_counter. On CUDA the clock
is CUDA events, read after a synchronize, so the times are the device's.

Activation memory (Cost.peak_memory) is the bytes of the tensor storages the node's forward
saves for backward (torch.autograd.graph.saved_tensors_hooks), parameters and buffers left
out, each storage counted once model-wide, for the first node that saves it: summed over a
stage's nodes it is what the stage holds per micro-batch between its forward and backward. (In
save-memory mode every node runs on copies of its inputs, so a tensor two nodes save counts
for both.) In context, Cost.transient_memory is the bytes of the storages a node's outputs are
new in (no view or in-place result of an input) that no node saves: a stage's forward keeps
them until it returns. Save-memory mode leaves it unset (the memory estimate then takes every
output of the node as such).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FunctionType, ModuleType
from typing import Any, Callable, Iterator

import torch
from torch.utils._pytree import tree_map

from ftc.frontends.common import INSTALLED_PACKAGES
from ftc.interpreter import Interpreter, copy_module, tensor_constant
from ftc.ir import Cost, FtcError, Graph, Node, TensorMeta, map_refs
from ftc.ir.serialize import node_to_dict, tensor_meta_to_dict
from ftc.passes.partition.problem import is_view_op
from ftc.repeats import tensors_in
from ftc.runtime.comm import differentiable
from ftc.runtime.mode import train_model
from ftc.runtime.model_file import MODULE_PREFIX, ModelFile
from ftc.runtime.seeding import seed_generators

from .cache import ProfileCache
from .loss import as_leaves, loss_target

DEVICES = ("cpu", "cuda")
# Training holds parameters, gradients and optimizer state (two more copies for Adam) plus
# activations, so a model whose parameters take a quarter of the device is profiled in
# save-memory mode.
SAVE_MEMORY_FRACTION = 0.25
# Tries of each calibration (hook cost, engine start), whatever the settings: they are cheap,
# and their fastest try must be a warm one.
CALIBRATION_TRIES = 8
RUN_TRIES = 3  # tries of the engine-start calibration taken before each timed backward
KIND_SAMPLES = 3  # ops of a kind timed alone, for its cost to a stage (_InContext._kind_costs)


@dataclass(frozen=True)
class MeasureSettings:
    device: str = "cpu"
    threads: int = 1  # intra-op CPU threads while measuring
    warmup: int = 2
    repeats: int = 5
    save_memory: bool | None = None  # None: when the parameters take SAVE_MEMORY_FRACTION of the device

    def check(self) -> None:
        if self.device not in DEVICES:
            raise FtcError(f"unknown --device {self.device!r}", f"use one of: {', '.join(DEVICES)}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise FtcError("--device cuda: torch finds no CUDA device here", "measure with --device cpu")
        for key in ("threads", "repeats"):
            if getattr(self, key) < 1:
                raise FtcError(f"--{key} must be at least 1, got {getattr(self, key)}")
        if self.warmup < 0:
            raise FtcError(f"warmup must be 0 or more, got {self.warmup}")


@dataclass
class NodeProfile:
    fwd_time: float = 0.0  # seconds
    bwd_time: float = 0.0
    peak_memory: int = 0  # bytes saved for backward
    transient_memory: int | None = None  # bytes of new outputs nothing saves (None: not counted)

    def to_json(self) -> dict:
        return {"fwd_time": self.fwd_time, "bwd_time": self.bwd_time, "peak_memory": self.peak_memory,
                "transient_memory": self.transient_memory}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict) -> NodeProfile:
        transient = data.get("transient_memory")  # absent from profiles cached before it was counted
        return cls(float(data["fwd_time"]), float(data["bwd_time"]), int(data["peak_memory"]),
                   None if transient is None else int(transient))  # fmt: skip


@dataclass
class Measurement:
    nodes: dict[str, NodeProfile]  # compute node name -> what it costs
    save_memory: bool
    outputs: Any = None  # the model's outputs in the last run, on the host
    stage_call: NodeProfile = field(default_factory=NodeProfile)  # what calling any stage costs
    loss: NodeProfile | None = None  # loss_fn on the outputs (None: no loss, see loss.py)
    kinds: dict[str, NodeProfile] = field(default_factory=dict)  # Graph.kind_costs (in context only)

    def to_json(self) -> dict:
        return {
            "nodes": {name: profile.to_json() for name, profile in self.nodes.items()},
            "stage_call": self.stage_call.to_json(),
            "loss": self.loss.to_json() if self.loss is not None else None,
            "kinds": {kind: profile.to_json() for kind, profile in self.kinds.items()},
        }

    @classmethod
    def from_json(cls, data: dict, save_memory: bool) -> Measurement:
        nodes = {name: NodeProfile.from_json(entry) for name, entry in data["nodes"].items()}
        loss = NodeProfile.from_json(data["loss"]) if data["loss"] is not None else None
        kinds = {kind: NodeProfile.from_json(entry) for kind, entry in data["kinds"].items()}
        return cls(nodes, save_memory, stage_call=NodeProfile.from_json(data["stage_call"]), loss=loss, kinds=kinds)


def device_name(device: str) -> str:
    """What the times were measured on, for the cache key and the compile output."""
    if device == "cuda":
        return f"cuda {torch.cuda.get_device_name()}"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return f"cpu {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"cpu {os.uname().machine}"


def device_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def wants_save_memory(graph: Graph, settings: MeasureSettings) -> bool:
    if settings.save_memory is not None:
        return settings.save_memory
    parameter_bytes = sum(t.meta.nbytes for t in graph.state.values())
    return parameter_bytes > SAVE_MEMORY_FRACTION * device_memory(settings.device)


def initial_state(name: str, like: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A value for the parameter or buffer `name` shaped like `like` (any device, meta too):
    random for floating parameters (seeded by the name, so a tensor read by several nodes gets
    the same value each time), ones for floating buffers, True for masks, zero for counters."""
    if like.dtype == torch.bool:
        return torch.ones(like.shape, dtype=torch.bool, device=device)
    if not like.is_floating_point():
        return torch.zeros(like.shape, dtype=like.dtype, device=device)
    if not isinstance(like, torch.nn.Parameter):
        return torch.ones(like.shape, dtype=like.dtype, device=device)
    generator = torch.Generator().manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:15], 16))
    return (torch.randn(like.shape, generator=generator) * 0.02).to(device=device, dtype=like.dtype)


def profile_key(model_file: ModelFile, graph: Graph, settings: MeasureSettings) -> dict:
    """Everything a measured profile depends on; the cache files it under this key's sha256.
    The model file's digest misses an edit of a file it imports, or a library upgrade, that
    changes what runs; the traced graph's digest catches those, and the digests of the files
    beside the model file that it imports (local_sources) what the graph does not show of
    them: the loss they compute, a leaf's forward. What happens inside a leaf of an installed
    library is left: `--no-cache` after changing one."""
    by_name = graph.by_name()
    inputs = {}
    for name in graph.inputs:
        meta = by_name[name].meta
        inputs[name] = [meta.shape, meta.dtype] if isinstance(meta, TensorMeta) else None
    return {
        "model_sha256": model_file.digest(),
        "graph_sha256": graph_digest(graph),
        "inputs": inputs,
        "batch_size": graph.batch_size,
        "frontend": graph.frontend,
        "device": device_name(settings.device),
        "torch": torch.__version__,
        "settings": asdict(settings),
        "local_sources": local_sources(model_file),
    }


def local_sources(model_file: ModelFile) -> dict[str, str]:
    """The sha256 of each module the model file imports, directly or through another, from its
    own folder or package (a helper with its blocks or its loss), by path relative to that
    folder. An edit there that leaves the traced graph as it was (the loss the measured profile
    times, a LEAF_MODULES class's forward) read back the old profile. Not frontends.common's
    CodeFiles, on purpose: that tells whether a file a frame runs is the model's code, for
    naming lines (any file in the model file's folder, imported or not, and the installed
    files of the model's module classes); this lists the files to hash, found from the model
    file's imports (so an unrelated script beside it changes no key), up to the package that
    holds the model file, and none installed (the graph and torch's version key those)."""
    module = model_file.module
    folder = model_file.path.resolve().parent
    # A model file in a package is imported as "outer.inner.model": its package's modules sit
    # under the folder above "outer".
    depth = 0 if module.__name__.startswith(MODULE_PREFIX) else module.__name__.count(".")
    root = folder.parents[depth - 1] if depth else folder
    found: dict[str, str] = {}
    pending, seen = [module], {module.__name__}
    while pending:
        for value in vars(pending.pop()).values():
            if isinstance(value, ModuleType):
                name = value.__name__
            elif isinstance(value, (type, FunctionType)):
                name = value.__module__
            else:
                continue
            imported = sys.modules.get(name) if isinstance(name, str) else None
            if imported is None or name in seen:
                continue
            seen.add(name)
            source = _local_file(imported, root)
            if source is not None:
                found[source.relative_to(root).as_posix()] = hashlib.sha256(source.read_bytes()).hexdigest()
                pending.append(imported)
    return dict(sorted(found.items()))


def _local_file(module: ModuleType, root: Path) -> Path | None:
    """The file `module` was imported from, where it lies under `root` outside installed
    packages and hidden folders (a .venv); else None."""
    file = getattr(module, "__file__", None)
    if not file:
        return None
    path = Path(file).resolve()
    if not path.is_file() or not path.is_relative_to(root):
        return None
    parts = path.relative_to(root).parts
    return None if any(part in INSTALLED_PACKAGES or part.startswith(".") for part in parts) else path


def graph_digest(graph: Graph) -> str:
    """The sha256 of what the graph runs: each node's op, target, arguments, module, shapes and
    dtypes, and the model's state; not where in the source a node came from, nor its costs."""
    where_and_cost = ("source", "callers", "label", "cost", "stage")
    nodes = [{key: value for key, value in node_to_dict(node).items() if key not in where_and_cost} for node in graph.nodes]
    state = {name: [t.kind, tensor_meta_to_dict(t.meta)] for name, t in graph.state.items()}
    return hashlib.sha256(json.dumps([nodes, state], sort_keys=True).encode()).hexdigest()


def profile_measured(
    graph: Graph,
    model_file: ModelFile,
    meta_model: torch.nn.Module,
    settings: MeasureSettings,
    cache: ProfileCache | None = None,
) -> tuple[Graph, str]:
    """The graph with measured costs, read from `cache` when it holds them (measured and stored
    otherwise), and a line for the compile output that says which."""
    settings.check()
    key = profile_key(model_file, graph, settings)
    where = f"{key['device']}, {settings.threads} thread{'s' if settings.threads > 1 else ''}"
    if settings.device == "cuda":
        where = key["device"]
    if cache is not None:
        entries = cache.load(key)
        if entries is not None:
            try:
                cached = Measurement.from_json(entries, wants_save_memory(graph, settings))
                return apply_profile(graph, cached), f"profile: read from the cache {cache.path(key)} ({where})"
            except (FtcError, KeyError, TypeError, ValueError, AttributeError):
                pass  # an entry missing or malformed: measure again and overwrite it
    measurement = measure(graph, model_file, meta_model, settings)
    mode = "save-memory mode, one node at a time" if measurement.save_memory else "in context"
    note = f"profile: measured on {where} ({mode}, median of {settings.repeats})"
    if cache is not None:
        path = cache.store(key, measurement.to_json())
        note += f", cached in {path}"
    return apply_profile(graph, measurement), note


def measure(graph: Graph, model_file: ModelFile, meta_model: torch.nn.Module, settings: MeasureSettings) -> Measurement:
    """Time every compute node of `graph` on real tensors of the compile batch size."""
    settings.check()
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        seed_generators(0)
        clock = _Clock(settings)
        if wants_save_memory(graph, settings):
            batch = model_file.inputs(graph.batch_size)  # on the host; nodes move what they read
            measurement = _SaveMemory(graph, meta_model, settings).measure(batch)
        else:
            model = model_file.build(settings.device)
            # Timed in the mode training runs it in (the model's own train(), an override included).
            train_model(model, True)
            batch = model_file.inputs(graph.batch_size, settings.device)
            measurement = _InContext(graph, model, settings).measure(batch)
        measurement.stage_call = _stage_call(clock, settings.device)
        measurement.loss = _time_loss(model_file, measurement.outputs, graph.batch_size, settings, clock)
        return measurement
    finally:
        torch.set_num_threads(threads)


def apply_profile(graph: Graph, measurement: Measurement) -> Graph:
    """Write measured times and activation memory into the compute nodes' Cost, and the stage
    call's and the loss's times into the graph's (FLOPs and parameter bytes stay as the
    analytic profile counted them)."""
    nodes = measurement.nodes
    missing = [node.name for node in graph.nodes if node.is_compute and node.name not in nodes]
    if missing:
        raise FtcError(f"the measured profile lacks nodes {missing[:5]}", "measure again with --no-cache")
    updated = []
    for node in graph.nodes:
        if node.is_compute:
            profile = nodes[node.name]
            cost = replace(node.cost, fwd_time=profile.fwd_time, bwd_time=profile.bwd_time,
                           peak_memory=profile.peak_memory, transient_memory=profile.transient_memory)  # fmt: skip
            node = replace(node, cost=cost)
        updated.append(node)
    stage_cost = Cost(fwd_time=measurement.stage_call.fwd_time, bwd_time=measurement.stage_call.bwd_time)
    loss_cost = None
    if measurement.loss is not None:
        counted = graph.loss_cost or Cost()
        loss_cost = replace(counted, fwd_time=measurement.loss.fwd_time, bwd_time=measurement.loss.bwd_time)
    kind_costs = {kind: Cost(fwd_time=p.fwd_time, bwd_time=p.bwd_time) for kind, p in measurement.kinds.items()}
    return replace(graph, nodes=updated, stage_cost=stage_cost, loss_cost=loss_cost, kind_costs=kind_costs)


class _Clock:
    """Stamps, read after `sync`: CUDA events on the device's stream; on the CPU, the calling
    thread's CPU time when torch computes on that thread alone (time.thread_time: what the work
    costs on a core of its own, however busy the machine), else time.perf_counter."""

    def __init__(self, settings: MeasureSettings):
        self.cuda = settings.device == "cuda"
        self.host = time.thread_time if settings.threads == 1 else time.perf_counter

    def stamp(self) -> Any:
        if not self.cuda:
            return self.host()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start


class _SavedBytes:
    """Counts the storages autograd saves for backward, once each, for the node saving first."""

    def __init__(self, state: list[torch.Tensor]):
        self.excluded = {t.untyped_storage().data_ptr() for t in state if t.device.type != "meta"}
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = {}
        self.made: dict[str, dict[int, int]] = {}  # node -> data_ptr -> bytes of its new outputs

    def record_made(self, name: str, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        """Remember the storages a node's outputs are new in: none of its inputs shares them (no
        view, no in-place result), no parameter or buffer."""
        reused = {t.untyped_storage().data_ptr() for t in inputs} | self.excluded
        self.made[name] = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in outputs if t.untyped_storage().data_ptr() not in reused
        }  # fmt: skip

    def transient(self) -> dict[str, int]:
        """Bytes of the storages each node made that no node saved, after a whole forward (its
        values all alive, so that no address was reused)."""
        return {name: sum(n for key, n in made.items() if key not in self.seen) for name, made in self.made.items()}

    @contextlib.contextmanager
    def counting(self, name: str) -> Iterator[None]:
        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in self.excluded and key not in self.seen:
                self.seen.add(key)
                self.bytes[name] = self.bytes.get(name, 0) + storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield


def _floating_outputs(output: Any) -> list[torch.Tensor]:
    return [t for t in tensors_in(output) if t.requires_grad and t.grad_fn is not None]


class _InContext(Interpreter):
    def __init__(self, graph: Graph, model: torch.nn.Module, settings: MeasureSettings):
        super().__init__(graph, model, device=settings.device)
        self.settings = settings
        self.clock = _Clock(settings)
        self.stamps: dict[str, tuple[Any, Any]] = {}  # node -> forward (start, end) of this run
        self.owner: dict[Any, str] = {}  # autograd node -> the IR node whose forward made it
        self.saved: _SavedBytes | None = None

    def measure(self, batch: tuple | dict) -> Measurement:
        state = [*self.model.parameters(), *self.model.buffers()]
        per_hook = _hook_cost(self.clock, self.settings.device)
        overhead = _timing_overhead(self)
        fwd: dict[str, list[float]] = {}
        bwd: dict[str, list[float]] = {}
        # Run 0 counts saved tensors (its pack hooks would slow it), then warm-up, then timing.
        for run in range(1 + self.settings.warmup + self.settings.repeats):
            self.saved = _SavedBytes(state) if run == 0 else None
            for param in self.model.parameters():
                param.grad = None  # as after zero_grad(): each backward allocates the gradients
            self.stamps, self.owner = {}, {}
            output = self.run(batch)
            events: list[tuple[str, Any]] = []
            for grad_fn, name in self.owner.items():
                grad_fn.register_hook(lambda *_, name=name: events.append((name, self.clock.stamp())))
            outputs = _floating_outputs(output)
            grads = [torch.ones_like(t) for t in outputs]
            engine_start = _engine_start(self.clock, self.settings.device, RUN_TRIES)
            self.clock.sync()
            start = self.clock.stamp()
            if outputs:
                torch.autograd.backward(outputs, grads)
            self.clock.sync()
            if run == 0:
                saved_bytes, transient = self.saved.bytes, self.saved.transient()
            if run <= self.settings.warmup:
                continue
            for name, (begin, finish) in self.stamps.items():
                fwd.setdefault(name, []).append(max(self.clock.seconds(begin, finish) - overhead, 0.0))
            spent: dict[str, float] = {}
            previous, engine = start, engine_start  # the first interval holds the engine's start
            for name, stamp in events:
                seconds = self.clock.seconds(previous, stamp) - per_hook - engine
                spent[name] = spent.get(name, 0.0) + max(seconds, 0.0)
                previous, engine = stamp, 0.0
            for name in self.stamps:
                bwd.setdefault(name, []).append(spent.get(name, 0.0))
        nodes = {
            name: NodeProfile(statistics.median(times), statistics.median(bwd[name]), saved_bytes.get(name, 0),
                              transient.get(name, 0))
            for name, times in fwd.items()
        }
        kinds = self._kind_costs(nodes, overhead)
        return Measurement(nodes, save_memory=False, outputs=tree_map(_to_host, output), kinds=kinds)

    def _kind_costs(self, nodes: dict[str, NodeProfile], overhead: float) -> dict[str, NodeProfile]:
        """Graph.kind_costs, and `nodes` made warm. Ops are also timed alone, called again and
        again as a stage of their own is (on their inputs of the last run, cut from the graph).
        Where the whole model's run finds a kind warm (forward: any op of the kind but the
        first; backward: any but the last, which backward reaches first), what such an op takes
        alone beyond its in-context time is what a stage pays for its first op of the kind: the
        kind's cost, the median over up to KIND_SAMPLES ops (kinds the model runs once have
        none). The op that meets its kind first in the whole model's forward, and the one its
        backward meets first, meet it cold there, and maybe more (the forward's first op finds
        what the last backward left in the caches): their times become their times alone less
        the kind's cost."""
        by_kind: dict[str, list[str]] = {}
        for node in self.graph.nodes:
            if node.is_compute and node.name in nodes:
                by_kind.setdefault(self.graph.kind(node), []).append(node.name)
        kinds = {}
        for kind, names in by_kind.items():
            warm_forward, warm_backward = names[1 : 1 + KIND_SAMPLES], names[-1 - KIND_SAMPLES : -1]
            first, last = names[0], names[-1]
            try:
                alone = {name: self._alone(name, overhead) for name in dict.fromkeys([first, last, *warm_forward, *warm_backward])}
            except Exception:  # an op that cannot run on copies of its inputs: it keeps its in-context time
                continue
            cost = NodeProfile(
                statistics.median(max(alone[n].fwd_time - nodes[n].fwd_time, 0.0) for n in warm_forward) if warm_forward else 0.0,
                statistics.median(max(alone[n].bwd_time - nodes[n].bwd_time, 0.0) for n in warm_backward) if warm_backward else 0.0,
            )  # fmt: skip
            if cost.fwd_time or cost.bwd_time:
                kinds[kind] = cost
            nodes[first].fwd_time = max(alone[first].fwd_time - cost.fwd_time, 0.0)
            nodes[last].bwd_time = max(alone[last].bwd_time - cost.bwd_time, 0.0)
        return kinds

    def _alone(self, name: str, overhead: float) -> NodeProfile:
        """Node `name` timed alone (_time_alone) on its inputs of the last run."""
        node = self.graph.node(name)
        read = lambda ref: self.env[ref.name]  # noqa: E731
        state = [*self.model.get_submodule(node.target).parameters()] if node.op == "call_module" else []
        return _time_alone(self, node, map_refs(node.args, read), map_refs(node.kwargs, read), state, overhead)[0]

    def run_node(self, node: Node, args: tuple, kwargs: dict) -> Any:
        if not node.is_compute:
            return super().run_node(node, args, kwargs)
        counting = self.saved.counting(node.name) if self.saved else contextlib.nullcontext()
        with counting:
            start = self.clock.stamp()
            out = super().run_node(node, args, kwargs)
            end = self.clock.stamp()
        if self.saved:
            self.saved.record_made(node.name, tensors_in((args, kwargs)), tensors_in(out))
        self.stamps[node.name] = (start, end)
        mutated = args[node.mutates] if node.mutates is not None and node.mutates < len(args) else None
        self._own(node.name, (out, mutated))
        return out

    def _own(self, name: str, values: Any) -> None:
        """Attribute the autograd nodes `values` reach that no earlier node made to `name`."""
        pending = [t.grad_fn for t in tensors_in(values) if t.grad_fn is not None]
        while pending:
            grad_fn = pending.pop()
            if grad_fn in self.owner:
                continue
            self.owner[grad_fn] = name
            pending.extend(next_fn for next_fn, _ in grad_fn.next_functions if next_fn is not None)


class _SaveMemory(Interpreter):
    """Node by node with only that node's state on the device; activations on the host."""

    def __init__(self, graph: Graph, meta_model: torch.nn.Module, settings: MeasureSettings):
        super().__init__(graph, meta_model, device=settings.device)
        self.settings = settings
        self.clock = _Clock(settings)
        self.nodes: dict[str, NodeProfile] = {}
        self.overhead = 0.0
        # A tensor reachable under several names (tied weights) gets its value from the first,
        # as state_dict() and named_parameters() name it.
        state = (*meta_model.named_parameters(), *meta_model.named_buffers())
        self.names = {id(tensor): name for name, tensor in reversed(state)}

    def measure(self, batch: tuple | dict) -> Measurement:
        self.overhead = _timing_overhead(self)
        output = self.run(batch)
        return Measurement(self.nodes, save_memory=True, outputs=output)

    def run_node(self, node: Node, args: tuple, kwargs: dict) -> Any:
        if node.op == "get_attr":
            if node.target in self.graph.constants:
                constant = self.graph.constants[node.target]
                return tensor_constant(constant.data, constant.dtype)
            like = self._state(node.target)
            value = initial_state(self.names.get(id(like), node.target), like, "cpu")
            return value.requires_grad_(like.requires_grad) if differentiable(value) else value
        if not node.is_compute:
            return super().run_node(node, args, kwargs)
        with self._materialized(node) as state:
            saved = _SavedBytes(state)
            times, out, cut_args = _time_alone(self, node, args, kwargs, state, self.overhead,
                                               lambda: saved.counting(node.name))  # fmt: skip
            self.nodes[node.name] = replace(times, peak_memory=saved.bytes.get(node.name, 0))
        return self._host_value(node, args, kwargs, out, cut_args)

    def _host_value(self, node: Node, args: tuple, kwargs: dict, out: Any, cut_args: tuple) -> Any:
        """The node's value for the host-side environment, sharing memory the way the model's
        does: an in-place write reaches the host tensor it was made to (and so every view of
        it), and views are taken of the host tensors again, which is cheap."""
        if node.mutates is not None and node.mutates < len(args) and isinstance(args[node.mutates], torch.Tensor):
            with torch.no_grad():
                args[node.mutates].copy_(cut_args[node.mutates])
            if out is cut_args[node.mutates]:
                return args[node.mutates]
        elif node.op != "call_module" and is_view_op(node.target):
            return super().run_node(node, args, kwargs)
        return tree_map(_to_host, out)

    def _state(self, target: str) -> torch.Tensor:
        module_path, _, attr = target.rpartition(".")
        return getattr(self.model.get_submodule(module_path), attr)

    @contextlib.contextmanager
    def _materialized(self, node: Node) -> Iterator[list[torch.Tensor]]:
        """The node's module with its own parameters and buffers on the device, swapped into the
        meta model while the node runs, then swapped out and freed."""
        if node.op != "call_module":
            yield []
            return
        parent_path, _, child = node.target.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        meta_module = getattr(parent, child)
        if isinstance(meta_module, torch.jit.ScriptModule):
            raise FtcError(
                f"save-memory mode cannot measure {node.target} alone: it is a TorchScript module, whose "
                "weights cannot be moved off the meta device one module at a time (to_empty)",
                "measure without --save-memory (the whole model on the device), or use --profile analytic",
            )
        real = copy_module(meta_module).to_empty(device=self.settings.device)
        with torch.no_grad():
            for name, tensor in (*real.named_parameters(), *real.named_buffers()):
                like = (
                    meta_module.get_parameter(name)
                    if isinstance(tensor, torch.nn.Parameter)
                    else meta_module.get_buffer(name)
                )
                qualified = self.names.get(id(like), f"{node.target}.{name}")
                tensor.copy_(initial_state(qualified, like, self.settings.device))
        setattr(parent, child, real)
        try:
            yield [*real.parameters(), *real.buffers()]
        finally:
            setattr(parent, child, meta_module)
            del real
            if self.settings.device == "cuda":
                torch.cuda.empty_cache()


def _time_alone(
    interpreter: _InContext | _SaveMemory, node: Node, args: tuple, kwargs: dict, state: list[torch.Tensor],
    overhead: float, first_run: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[NodeProfile, Any, tuple]:
    """`node` run by itself on copies of `args` and `kwargs` cut from any graph, forward and
    backward to its inputs and `state` (gradients returned, not accumulated),
    `warmup + repeats` times in a row, as a one-op stage is called: medians, the forward less
    `overhead` (what timing adds), the backward less an engine start (the stage call has it).
    Also the last run's output and cut positional arguments; `first_run` wraps the first
    forward (save-memory mode counts the bytes it saves)."""
    clock, settings = interpreter.clock, interpreter.settings
    fwd, bwd = [], []
    for run in range(settings.warmup + settings.repeats):
        leaves: list[torch.Tensor] = []
        cut_args, cut_kwargs = _cut((args, kwargs), leaves, node.mutates is not None, settings.device)
        targets = leaves + [t for t in state if t.requires_grad]
        with first_run() if run == 0 else contextlib.nullcontext():
            clock.sync()
            start = clock.stamp()
            out = interpreter.execute(node, cut_args, cut_kwargs)
            end = clock.stamp()
        outputs = _floating_outputs(out)
        backward = bool(outputs and targets)
        engine_start = _engine_start(clock, settings.device, RUN_TRIES) if backward else 0.0
        back_start = clock.stamp()
        if backward:
            torch.autograd.grad(outputs, targets, [torch.ones_like(t) for t in outputs], allow_unused=True)
        back_end = clock.stamp()
        clock.sync()
        if run >= settings.warmup:
            fwd.append(max(clock.seconds(start, end) - overhead, 0.0))
            bwd.append(max(clock.seconds(back_start, back_end) - engine_start, 0.0) if backward else 0.0)
    return NodeProfile(statistics.median(fwd), statistics.median(bwd)), out, cut_args


def _cut(value: Any, leaves: list[torch.Tensor], mutating: bool, device: str) -> Any:
    """Copies of the values on the device, cut from any graph: those that require grad become
    leaves (collected in `leaves`), cloned when the node writes in place, as autograd forbids
    in-place writes to leaves."""

    def move(tensor: Any) -> Any:
        if not isinstance(tensor, torch.Tensor):
            return tensor
        moved = tensor.detach().to(device, copy=True)
        if not tensor.requires_grad:
            return moved
        leaves.append(moved.requires_grad_())
        return moved.clone() if mutating else moved

    return tree_map(move, value)


def _engine_start(clock: _Clock, device: str, tries: int = CALIBRATION_TRIES) -> float:
    """What one autograd call costs with nothing to compute: a backward through a view, the
    fastest of `tries`. Taken right before each backward it is subtracted from, so that both
    run at the machine's speed of the moment (which drifts, on a shared machine by 2x within
    seconds: an engine start taken once, in a slow moment, made fast backwards come out at 0)."""
    leaf = torch.zeros(1, device=device, requires_grad=True)
    grad = torch.ones(1, device=device)
    fastest = float("inf")
    for _ in range(tries):
        out = leaf.view(1)
        start = clock.stamp()
        torch.autograd.grad(out, leaf, grad)
        end = clock.stamp()
        clock.sync()
        fastest = min(fastest, clock.seconds(start, end))
    return fastest


class _ViewStage(torch.nn.Module):
    """The least a stage can be: its forward returns a view of its input."""

    def forward(self, value: torch.Tensor) -> tuple[torch.Tensor]:
        return (value.view_as(value),)


def _stage_call(clock: _Clock, device: str) -> NodeProfile:
    """What calling a stage costs beyond its nodes, forward (the module call) and backward (the
    engine's start, the gradient of its input): a _ViewStage run the way a pipeline runs a
    stage, on a received leaf, the fastest of a few tries each."""
    stage = _ViewStage()
    grad = torch.ones(16, device=device)
    fastest = [float("inf"), float("inf")]
    for _ in range(CALIBRATION_TRIES):
        received = torch.zeros(16, device=device, requires_grad=True)
        clock.sync()
        start = clock.stamp()
        (out,) = stage(received)
        middle = clock.stamp()
        torch.autograd.backward([out], [grad])
        end = clock.stamp()
        clock.sync()
        fastest = [min(fastest[0], clock.seconds(start, middle)), min(fastest[1], clock.seconds(middle, end))]
    return NodeProfile(fastest[0], fastest[1])


def _time_loss(
    model_file: ModelFile,
    outputs: Any,
    batch_size: int,
    settings: MeasureSettings,
    clock: _Clock,
) -> NodeProfile | None:
    """loss_fn on the model's outputs, forward and backward to the outputs, as the last stage
    runs it: medians over the repeats after warm-up, the backward less an engine start (the
    stage call has it). None when there is no loss (ftc/profiling/loss.py)."""
    leaves = as_leaves(tree_map(lambda t: t.to(settings.device) if isinstance(t, torch.Tensor) else t, outputs))
    target = loss_target(model_file, leaves, batch_size, settings.device)
    if target is None:
        return None
    inputs = [t for t in tensors_in(leaves) if t.requires_grad]
    fwd, bwd = [], []
    for run in range(settings.warmup + settings.repeats):
        clock.sync()
        start = clock.stamp()
        loss = model_file.loss_fn(leaves, target)
        forward_end = clock.stamp()
        engine_start = _engine_start(clock, settings.device, RUN_TRIES)
        middle = clock.stamp()
        torch.autograd.grad(loss, inputs, allow_unused=True)
        end = clock.stamp()
        clock.sync()
        if run >= settings.warmup:
            fwd.append(clock.seconds(start, forward_end))
            bwd.append(max(clock.seconds(middle, end) - engine_start, 0.0))
    return NodeProfile(statistics.median(fwd), statistics.median(bwd))


def _hook_cost(clock: _Clock, device: str) -> float:
    """Seconds one backward hook adds: a chain of cheap ops backpropagated with and without
    hooks, the fastest of a few tries each (the calibration wants the cost, not the noise)."""
    chain = 64
    leaf = torch.zeros(16, device=device, requires_grad=True)
    fastest = {True: float("inf"), False: float("inf")}
    for _ in range(CALIBRATION_TRIES):
        for hooked in (False, True):
            value = leaf
            grad_fns = []
            for _ in range(chain):
                value = value * 1.0
                grad_fns.append(value.grad_fn)
            if hooked:
                stamps = []
                for grad_fn in grad_fns:
                    grad_fn.register_hook(lambda *_: stamps.append(clock.stamp()))
            clock.sync()
            start = clock.stamp()
            value.backward(torch.ones_like(value))
            end = clock.stamp()
            clock.sync()
            fastest[hooked] = min(fastest[hooked], clock.seconds(start, end))
    return max(fastest[True] - fastest[False], 0.0) / chain


def _timing_overhead(interpreter: _InContext | _SaveMemory) -> float:
    """Seconds that timing a node adds to its op, which stage code calling the op directly does
    not pay: the clock's stamps and the interpreter's dispatch (converting arguments, finding
    the callable). It is the time of a node whose op costs next to nothing (operator.pos on an
    int), the fastest of a few tries of many calls each."""
    node = Node("calibration", "call_function", "operator.pos", (1,))
    clock = interpreter.clock
    calls = 100
    fastest = float("inf")
    for _ in range(CALIBRATION_TRIES):
        stamps = []
        for _ in range(calls):
            start = clock.stamp()
            Interpreter.run_node(interpreter, node, (1,), {})  # what a timed node runs
            stamps.append((start, clock.stamp()))
        clock.sync()
        fastest = min(fastest, sum(clock.seconds(start, end) for start, end in stamps))
    return fastest / calls


def _to_host(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    host = value.detach().to("cpu")
    return host.requires_grad_() if value.requires_grad else host


__all__ = [
    "DEVICES",
    "MeasureSettings",
    "Measurement",
    "NodeProfile",
    "apply_profile",
    "device_name",
    "initial_state",
    "measure",
    "profile_key",
    "profile_measured",
    "wants_save_memory",
]
