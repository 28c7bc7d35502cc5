"""The compiler pipeline: model file -> frontend -> passes -> profile -> partition -> backend."""

from __future__ import annotations

import keyword
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ftc.backend.codegen import shape_text
from ftc.backend.writer import write_pipeline
from ftc.frontends import trace
from ftc.ir import FtcError, Graph, TensorMeta, validate
from ftc.own_train import own_train_warnings
from ftc.passes.cleanup import eliminate_dead_code, hooked_modules
from ftc.passes.local_sizes import take_sizes_locally
from ftc.passes.naming import name_values
from ftc.passes.partition import METHODS, Partition, Problem, assign, build_problem, partition
from ftc.passes.partition.coarsen import cut_candidates
from ftc.passes.partition.memory import OPTIMIZER_STATES, MemorySettings, planned_micro_batches
from ftc.passes.partition.refine import kept_round, refine
from ftc.passes.recompute import POLICIES
from ftc.passes.unpack import unpack_containers_early
from ftc.profiling import PROFILES, DeviceModel, MeasureSettings, ProfileCache, profile_analytic, profile_measured
from ftc.profiling.save_memory import wants_save_memory
from ftc.profiling.stages import StageTimer
from ftc.runtime.checkpoint import file_in_the_way
from ftc.runtime.config import TRAINING_SCHEDULES
from ftc.runtime.model_file import ModelFile, load_model_file


@dataclass(frozen=True)
class CompileOptions:
    stages: int
    batch_size: int = 8
    method: str = "pipedream"
    frontend: str = "auto"
    bandwidth: float = 1.0  # GB/s between stages
    tflops: float = DeviceModel.tflops
    memory_gbps: float = DeviceModel.memory_gbps
    op_overhead_us: float = DeviceModel.op_overhead_us
    stage_overhead_us: float = DeviceModel.stage_overhead_us
    name: str | None = None
    force: bool = False
    profile: str = "analytic"  # or "measure": times measured on `device` (ftc/profiling/measure.py)
    device: str = "cpu"
    threads: int = 1  # CPU threads while measuring
    save_memory: bool | None = None  # None: automatic, when the model is large for the device
    cache: bool = True  # read and write measured profiles in the profile cache
    memory_limit: int | None = None  # bytes per device (ftc/passes/partition/memory.py)
    optimizer: str = "adam"  # sizes the optimizer state
    schedule: str = "1f1b"  # sizes the activations kept in flight (async: and the stashed weights)
    micro_batches: int | None = None  # None: as many as stages
    recompute: str = "auto"  # ftc/passes/recompute.py
    blocks: int | None = None  # mpipe's block count (None: 2, 3 and 4 times the stages, the best kept)
    refine: int = 0  # splits to time on `device` (ftc/passes/partition/refine.py); 0: none

    def memory_settings(self) -> MemorySettings:
        planned_batch = self.batch_size if self.micro_batches is None else None
        return MemorySettings(self.memory_limit, self.optimizer, self.schedule, self.planned_micro_batches(),
                              self.recompute, self.device, planned_batch)  # fmt: skip

    def planned_micro_batches(self) -> int:
        """--micro-batches, or the compiler's plan for the stage count (memory.py)."""
        if self.micro_batches is not None:
            return self.micro_batches
        return planned_micro_batches(self.stages, self.batch_size)

    def measure_settings(self) -> MeasureSettings:
        return MeasureSettings(device=self.device, threads=self.threads, save_memory=self.save_memory)

    def check(self) -> None:
        for key in ("stages", "batch_size"):
            if getattr(self, key) < 1:
                raise FtcError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        # Bounds far beyond any device, which keep every cost finite (1e-9 TFLOP/s, GB/s: a
        # FLOP or a byte per second; 1e9 us: a thousand seconds per op).
        for key, unit in (("bandwidth", "GB/s"), ("tflops", "TFLOP/s"), ("memory_gbps", "GB/s")):
            if not 1e-9 <= getattr(self, key) <= 1e9:
                flag = f"--{key.replace('_', '-')}"
                raise FtcError(f"{flag} must be between 1e-9 and 1e9 {unit}, got {getattr(self, key):g}",
                               f"give the rate in {unit} (for 16 {unit}, pass {flag} 16)")  # fmt: skip
        for key in ("op_overhead_us", "stage_overhead_us"):
            if not 0 <= getattr(self, key) <= 1e9:
                flag = f"--{key.replace('_', '-')}"
                raise FtcError(f"{flag} must be between 0 and 1e9 microseconds, got {getattr(self, key):g}",
                               f"give the time in microseconds (for 8 us, pass {flag} 8)")  # fmt: skip
        if self.method not in METHODS:
            raise FtcError(f"unknown --method {self.method!r}", f"use one of: {', '.join(METHODS)}")
        for key, allowed in (("optimizer", OPTIMIZER_STATES), ("schedule", TRAINING_SCHEDULES), ("recompute", POLICIES)):
            if getattr(self, key) not in allowed:
                raise FtcError(f"unknown --{key} {getattr(self, key)!r}", f"use one of: {', '.join(allowed)}")
        for key in ("memory_limit", "micro_batches", "blocks"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise FtcError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        if self.micro_batches is not None and self.batch_size % self.micro_batches:
            divisors = [m for m in range(1, self.batch_size + 1) if self.batch_size % m == 0]
            raise FtcError(f"--micro-batches {self.micro_batches} does not split --batch-size {self.batch_size} into "
                           "equal micro-batches, as the runtime does",
                           f"use one of {', '.join(map(str, divisors))}, or another --batch-size")  # fmt: skip
        if self.profile not in PROFILES:
            raise FtcError(f"unknown --profile {self.profile!r}", f"use one of: {', '.join(PROFILES)}")
        if self.refine < 0:
            raise FtcError(f"--refine must be 0 or more, got {self.refine}")
        if self.profile == "measure" or self.refine:
            self.measure_settings().check()
        if self.profile != "measure" and self.save_memory:
            raise FtcError("--save-memory applies to measured profiles", "add --profile measure")
        if self.profile != "measure" and not self.refine and self.threads != 1:
            raise FtcError("--threads applies to measured profiles and --refine", "add --profile measure or --refine N")
        if self.name is not None:
            check_package_name(self.name, "--name", "use letters, digits and _")


@dataclass
class Compiled:
    graph: Graph
    folder: Path
    manifest: dict  # pipeline.json
    notes: list[str] = field(default_factory=list)  # lines for the compile output (the profile used)

    @property
    def stages(self) -> list[dict]:
        return self.manifest["stages"]


def check_package_name(name: str, where: str, fix: str, stdlib: bool = True) -> None:
    """The generated folder is a Python package named `name`: an identifier, not a keyword, and
    not torch, which its stage code imports, nor (`stdlib`) a standard library module, which it
    may import too: the package would hide them from code run beside it."""
    if not name.isidentifier() or keyword.iskeyword(name):
        raise FtcError(f"{where} {name!r} is not a Python identifier a package can have", fix)
    if name == "torch" or (stdlib and name in sys.stdlib_module_names):
        # `fix` says how to spell an identifier, which this name is: it needs another name.
        another = f"pass another --name ({name}_pipeline, say)" if where == "--name" else f"pass --name {name}_pipeline"
        raise FtcError(f"{where} {name!r} is the name of a module the stage code or Python imports: the generated "
                       "package would hide it", another)  # fmt: skip


def folder_not_writable(folder: Path) -> str | None:
    """Why files cannot be written into `folder` (or, where it does not exist yet, into the
    nearest folder above it that does, where it would be made), or None. Tried with a file made
    and removed there: permissions alone do not tell (root, read-only and virtual file systems)."""
    existing = next((p for p in (folder, *folder.parents) if p.is_dir()), Path("."))
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".ftc-write-test-"):
            pass
    except OSError as exc:
        return f"{existing}: {exc.strerror or exc}"
    return None


def compile_model(model_path: str | Path, out_dir: str | Path, options: CompileOptions) -> Compiled:
    options.check()
    model_file = load_model_file(model_path)
    name = options.name or model_file.stem
    if options.name is None:  # a model file named like a module (test.py) compiled before, and still does
        check_package_name(name, "the model file's name", "pass --name NAME", stdlib=False)
    target = Path(out_dir) / name
    blocking = file_in_the_way(target)
    if blocking is not None:  # found before minutes of tracing and profiling, not after
        raise FtcError(f"the output folder {target} cannot be made: {blocking} is a file", "pass another -o or --name")
    unwritable = folder_not_writable(target)
    if unwritable is not None:
        raise FtcError(f"the output folder {target} cannot be written: {unwritable}", "pass another -o (a folder you can write)")
    graph, model, batch = _traced(model_file, options, name, options.frontend)
    if options.frontend == "auto" and graph.frontend == "fx":
        graph, model, batch = _finer_through_export((graph, model, batch), model_file, options, name)
    notes = [f"note: {line}" for line in graph.trace_notes]
    if graph.frontend == "export" and model_file.leaf_modules:
        called = {node.target for node in graph.nodes if node.op == "call_module"}
        split = sorted({type(module).__name__ for path, module in model.named_modules()
                        if isinstance(module, model_file.leaf_modules) and path not in called})  # fmt: skip
        if split:
            notes.append(
                f"note: torch.export traced into LEAF_MODULES ({', '.join(split)}) and could not write their calls "
                "whole (one that reads or returns a value other than its arguments, outputs and own parameters, "
                "or is called with a non-tensor argument): their ops may be split across stages"
            )
    if graph.training_branches:
        notes.append(
            f"note: forward uses the value of self.training at {', '.join(graph.training_branches)} (a branch, "
            "`and`/`or`, arithmetic): the stages keep what it computed in training mode, in eval() too (torch.nn "
            "layers such as nn.Dropout, and self.training passed to a function as it is, follow the stage's mode); "
            "for stages that follow eval(), move a branch of the model's own into a module that holds no other layer "
            "(a DropPath whose forward starts `if not self.training: return x`), which the stages call whole"
        )
    notes += [f"warning: {line}" for line in own_train_warnings(graph, model)]
    packed = [node.name for node in graph.nodes if node.op == "input" and isinstance(node.meta, TensorMeta)
              and node.meta.batch_dim is not None and node.meta.shape[node.meta.batch_dim] != graph.batch_size]  # fmt: skip
    if packed:
        notes.append(
            f"note: input {packed[0]!r} has several rows per sample along its batch dimension (a packed input): the "
            "stages run, but `ftc train` cannot stack or micro-batch it; give the model one row per sample"
        )
    paired = [node for node in graph.nodes if node.op == "input" and isinstance(node.meta, TensorMeta)
              and node.meta.other_batch_dims]  # fmt: skip
    if paired:
        notes.append(
            f"note: input {paired[0].name!r} ({shape_text(paired[0].meta, graph.batch_size)}) grows with the batch "
            "in several dimensions (a relation between samples): the stages run, but `ftc train` cannot stack it "
            "from samples or micro-batch it; compute it inside forward from per-sample inputs"
        )
    if options.profile == "measure":
        cache = ProfileCache() if options.cache else None
        graph, note = profile_measured(graph, model_file, model, options.measure_settings(), cache)
        notes.append(note)
    problem = build_problem(graph, options.bandwidth, options.memory_settings())
    if options.stages > problem.size:
        raise FtcError(
            f"cannot split the {problem.size} ops of {name!r} into {options.stages} stages",
            f"use --stages {problem.size} or fewer",
        )
    notes += _glue_notes(problem, options.stages) + _cut_notes(problem, options, name)
    if options.refine:
        graph, problem, result, note = _refine(graph, model_file, options)
        notes.append(note)
    else:
        result = partition(problem, options.method, options.stages, options.blocks)
    notes += _kept_from_recompute(problem, result, options.recompute)
    graph = take_sizes_locally(assign(graph, problem, result))
    validate(graph)
    # micro_batches: the count the memory estimate is for, given or the default plan
    settings = {
        key: value
        for key, value in (asdict(options) | {"micro_batches": options.planned_micro_batches()}).items()
        if key in ("bandwidth", "tflops", "memory_gbps", "op_overhead_us", "stage_overhead_us", "profile")
        or key in ("memory_limit", "optimizer", "schedule", "micro_batches", "recompute")
        or (options.method == "mpipe" and key == "blocks")
        or ((options.profile == "measure" or options.refine) and key in ("device", "threads"))
        or ((options.memory_limit is not None or options.device != "cpu") and key == "device")
        or (options.refine and key == "refine")
    }
    folder, manifest = write_pipeline(
        graph, problem, out_dir, model_file.path, options.method, settings, force=options.force, recompute=result.recompute
    )  # fmt: skip
    return Compiled(graph, folder, manifest, notes)


def _kept_from_recompute(problem: Problem, result, policy: str) -> list[str]:
    """Notes on the stages that --recompute always leaves alone: their forward changes a
    parameter in place, which a second forward would change again."""
    if policy != "always":
        return []
    notes = []
    for stage, recomputed in enumerate(result.recompute):
        written = [problem.rewrites[k] for k in np.flatnonzero(result.members(stage)) if problem.rewrites[k]]
        if not recomputed and written:
            notes.append(f"note: stage {stage} does not recompute: its forward changes parameter {written[0]} in place "
                         "(an EMA update, an Embedding's max_norm), which a second forward would change again")  # fmt: skip
    return notes


def _cut_notes(problem: Problem, options: CompileOptions, name: str) -> list[str]:
    """Notes where the partitioner cannot consider every allowed cut (coarsen.py), and where
    --blocks asks mpipe for more blocks than it can cut."""
    kept = cut_candidates(problem, options.stages)
    allowed = problem.max_stages() - 1
    runs = allowed + 1 if kept is None else len(kept)
    notes = []
    if runs - 1 < allowed:
        notes.append(f"note: {problem.size:,} ops with {allowed:,} places to cut: the partitioner considers "
                     f"{runs - 1:,} of them (the block boundaries, and per equal share of the time the one that "
                     "moves the fewest bytes)")  # fmt: skip
    if options.blocks is not None and options.blocks > runs:
        # mpipe cannot cut finer than the graph allows (or, coarsened, than the cuts it considers):
        # it coarsens into as many blocks as that.
        notes.append(f"note: --blocks {options.blocks} is more than the {runs} runs of ops "
                     f"{name!r} can be cut into: mpipe packed {runs} blocks")  # fmt: skip
    return notes


def _glue_notes(problem: Problem, stages: int) -> list[str]:
    """Notes on the runs of ops that must share a stage and hold more than a stage's share of the
    time: they, not the partitioner, bound the balance."""
    total = float(problem.time.sum())
    notes = []
    for first, last, reason in problem.glue:
        held = float(problem.time[first : last + 1].sum())
        if stages > 1 and total > 0 and held > total / stages:
            notes.append(f"note: {last - first + 1} ops ({held / total:.0%} of the time) must share a stage: {reason}")
    return notes


def _traced(model_file: ModelFile, options: CompileOptions, name: str, frontend: str) -> tuple[Graph, Any, Any]:
    """The model traced by `frontend`, cleaned up, named, validated and analytically profiled."""
    graph, model, batch = trace(model_file, options.batch_size, frontend, name)
    graph = unpack_containers_early(eliminate_dead_code(graph, hooked_modules(model)))
    graph = name_values(graph, model_file.path.parent)
    validate(graph)
    device = DeviceModel(options.tflops, options.memory_gbps, options.op_overhead_us, options.stage_overhead_us)
    return profile_analytic(graph, model, batch, device, model_file), model, batch


def _finer_through_export(fx_traced: tuple, model_file: ModelFile, options: CompileOptions, name: str) -> tuple:
    """--frontend auto, where fx's graph cannot be cut into --stages stages: torch.export's may
    be (fx keeps every reader of a parameter or buffer that forward updates in place with the
    update; export passes the updated tensor on as a value). fx's graph otherwise."""
    fx_stages = build_problem(fx_traced[0], options.bandwidth).max_stages()
    if options.stages <= fx_stages:
        return fx_traced
    try:
        exported = _traced(model_file, options, name, "export")
    except FtcError:
        return fx_traced
    export_stages = build_problem(exported[0], options.bandwidth).max_stages()
    if export_stages <= fx_stages:
        return fx_traced
    exported[0].trace_notes.append(f"traced with torch.export, whose graph splits into up to {export_stages} stages "
                                   f"where torch.fx's allows {fx_stages}")  # fmt: skip
    return exported


def _refine(graph: Graph, model_file: ModelFile, options: CompileOptions) -> tuple[Graph, Problem, Partition, str]:
    """ftc/passes/partition/refine.py with this compile's problem, method and device; the stages
    of each split are generated into a temporary folder and timed there (ftc/profiling/stages.py)."""
    settings = options.measure_settings()
    if wants_save_memory(graph, settings):
        reason = "--save-memory was given" if settings.save_memory else f"{graph.name} is large for {settings.device}"
        raise FtcError(
            f"--refine times whole stages on the device, which save-memory mode avoids ({reason})",
            "compile without --refine" + (", or without --save-memory" if settings.save_memory else ""),
        )

    def build(graph: Graph) -> Problem:
        return build_problem(graph, options.bandwidth, options.memory_settings())

    def split(problem: Problem) -> Partition:
        return partition(problem, options.method, options.stages, options.blocks)

    def measure(candidates: list[tuple[Graph, Problem, Partition]]) -> list[list[float]]:
        threads = torch.get_num_threads()
        torch.set_num_threads(settings.threads)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                timer = StageTimer(model_file, graph.batch_size, settings.device)
                keys = []
                for k, (graph_k, problem, result) in enumerate(candidates):
                    assigned = assign(graph_k, problem, result)
                    folder, _ = write_pipeline(assigned, problem, Path(tmp) / str(k), model_file.path,
                                               options.method, {}, recompute=result.recompute)  # fmt: skip
                    keys.append(timer.add(folder))
                seconds = timer.measure()
        finally:
            torch.set_num_threads(threads)
        return [[seconds[key] for key in stage_keys] for stage_keys in keys]

    graph, problem, result, history = refine(graph, build, split, measure, options.refine)
    kept = kept_round(history)
    rounds = ", ".join(f"{r.measured * 1e3:.3f}" for r in history)
    again = ", ".join(f"{r.remeasured * 1e3:.3f}" for r in history)
    note = (
        f"refine: {len(history)} split(s) timed on {settings.device}, busiest device {rounds} ms"
        + (f" (timed together again: {again} ms)" if len(history) > 1 else "")
        + f"; kept split {kept + 1}, whose stage times the profile had predicted within "
        f"{history[kept].worst_stage_error:.0%} (after one scale factor)"
    )
    return graph, problem, result, note
