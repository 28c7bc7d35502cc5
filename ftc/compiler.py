"""The compiler pipeline: model file -> frontend -> passes -> profile -> partition -> backend."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ftc.backend.writer import write_pipeline
from ftc.frontends import trace
from ftc.ir import FtcError, Graph, validate
from ftc.passes.cleanup import eliminate_dead_code
from ftc.passes.naming import name_values
from ftc.passes.partition import METHODS, assign, build_problem
from ftc.profiling import DeviceModel, profile_analytic
from ftc.runtime.model_file import load_model_file


@dataclass(frozen=True)
class CompileOptions:
    stages: int
    batch_size: int = 8
    method: str = "pipedream"
    frontend: str = "auto"
    bandwidth: float = 1.0  # GB/s between stages
    tflops: float = DeviceModel.tflops
    memory_gbps: float = DeviceModel.memory_gbps
    name: str | None = None
    force: bool = False

    def check(self) -> None:
        for key in ("stages", "batch_size"):
            if getattr(self, key) < 1:
                raise FtcError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        for key in ("bandwidth", "tflops", "memory_gbps"):
            if not getattr(self, key) > 0:
                raise FtcError(f"--{key.replace('_', '-')} must be positive, got {getattr(self, key)}")
        if self.method not in METHODS:
            raise FtcError(f"unknown --method {self.method!r}", f"use one of: {', '.join(METHODS)}")
        if self.name is not None and not self.name.isidentifier():
            raise FtcError(f"--name {self.name!r} is not a Python identifier", "use letters, digits and _")


@dataclass
class Compiled:
    graph: Graph
    folder: Path
    stages: list[dict]  # the manifest's stage entries


def compile_model(model_path: str | Path, out_dir: str | Path, options: CompileOptions) -> Compiled:
    options.check()
    model_file = load_model_file(model_path)
    name = options.name or model_file.stem
    if not name.isidentifier():
        raise FtcError(f"the model file's name {model_file.stem!r} is not a Python identifier", "pass --name NAME")
    graph, model, batch = trace(model_file, options.batch_size, options.frontend, name)
    graph = eliminate_dead_code(graph)
    graph = name_values(graph, model_file.path.parent)
    validate(graph)
    graph = profile_analytic(graph, model, batch, DeviceModel(options.tflops, options.memory_gbps))
    problem = build_problem(graph, options.bandwidth)
    if options.stages > problem.size:
        raise FtcError(
            f"cannot split the {problem.size} ops of {name!r} into {options.stages} stages",
            f"use --stages {problem.size} or fewer",
        )
    graph = assign(graph, problem, METHODS[options.method](problem, options.stages))
    validate(graph)
    settings = {
        key: value for key, value in asdict(options).items() if key in ("bandwidth", "tflops", "memory_gbps")
    }
    folder, stages = write_pipeline(
        graph, problem, out_dir, model_file.path, options.method, settings, force=options.force
    )
    return Compiled(graph, folder, stages)
