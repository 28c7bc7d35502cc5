"""`ftc check`: does a generated (and perhaps hand-edited) pipeline still compute exactly what
the model computes?

Three copies of the model start from the same seed and weights. The original model runs
forward and backward on one batch; the pipeline's stages run the same batch through the local
executor; and the IR (ir.json) is interpreted on the third copy to give every intermediate value
the stages send, so that a wrong value is pinned to the stage that made it. Compared per stage:
the values it sends, its parameters' gradients, and its buffers after the step (BatchNorm's
running statistics, say). The loss is a fixed random projection of every floating output, so
every output gets a gradient.

Relative difference: max |a - b| / max(max |b|, 1e-6), per tensor.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ftc.interpreter import Interpreter
from ftc.ir import FtcError, load
from ftc.runtime import LocalExecutor, load_model_file, load_pipeline

DEFAULT_TOLERANCE = 1e-5


def relative_difference(actual: Any, expected: Any) -> float:
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
            return float("inf")
        if not expected.is_floating_point():
            return 0.0 if torch.equal(actual, expected) else float("inf")
        diff = (actual.detach().double() - expected.detach().double()).abs().max().item() if expected.numel() else 0.0
        scale = expected.detach().double().abs().max().item() if expected.numel() else 0.0
        return diff / max(scale, 1e-6)
    if isinstance(expected, (tuple, list)):
        if not isinstance(actual, (tuple, list)) or len(actual) != len(expected):
            return float("inf")
        return max((relative_difference(a, e) for a, e in zip(actual, expected)), default=0.0)
    return 0.0 if actual == expected else float("inf")


@dataclass
class StageReport:
    index: int
    file: str
    outputs: float = 0.0
    gradients: float = 0.0
    buffers: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def worst(self) -> float:
        return max(self.outputs, self.gradients, self.buffers)


@dataclass
class CheckReport:
    folder: Path
    batch_size: int
    tolerance: float
    stages: list[StageReport]
    model_outputs: float
    problems: list[str]

    @property
    def ok(self) -> bool:
        return (
            not self.problems
            and self.model_outputs <= self.tolerance
            and all(s.worst <= self.tolerance and not s.problems for s in self.stages)
        )


def _loss(output: Any, seed: int) -> torch.Tensor:
    """A fixed random projection of every floating tensor in the output, to a scalar."""
    tensors = [t for t in _flat(output) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    if not tensors:
        raise FtcError("the model's outputs hold no floating tensor that requires grad; nothing to backpropagate")
    generator = torch.Generator().manual_seed(seed)
    return sum((t * torch.randn(t.shape, generator=generator, dtype=t.dtype)).sum() for t in tensors)


def _flat(value: Any) -> list:
    if isinstance(value, dict):
        return [v for item in value.values() for v in _flat(item)]
    if isinstance(value, (tuple, list)):
        return [v for item in value for v in _flat(item)]
    return [value]


def _call(model: torch.nn.Module, batch: tuple | dict) -> Any:
    return model(**batch) if isinstance(batch, dict) else model(*batch)


def check_pipeline(
    folder: str | Path,
    model_path: str | Path | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    tolerance: float = DEFAULT_TOLERANCE,
) -> CheckReport:
    pipeline = load_pipeline(folder)
    model_file = load_model_file(model_path or pipeline.model_file)
    batch_size = batch_size or pipeline.manifest["batch_size"]
    if batch_size < 1:
        raise FtcError(f"--batch-size must be at least 1, got {batch_size}")
    graph = load(Path(folder) / "ir.json")

    torch.manual_seed(seed)
    original = model_file.build()
    original.train()
    staged, interpreted = copy.deepcopy(original), copy.deepcopy(original)
    torch.manual_seed(seed + 1)
    batch = model_file.inputs(batch_size)

    torch.manual_seed(seed + 2)
    expected = _call(original, batch)
    _loss(expected, seed).backward()

    torch.manual_seed(seed + 2)
    recorder = Interpreter(graph, interpreted)
    with torch.no_grad():
        recorder.run(batch)
    reference_values = recorder.env

    executor = LocalExecutor(pipeline, staged)
    problems = _state_problems(pipeline, executor, original)
    torch.manual_seed(seed + 2)
    actual = executor.forward(batch)
    sent_by_stage = [dict(sent) for sent in executor.sent]
    executor.backward(_loss(actual, seed))

    model_outputs = relative_difference(_flat(actual), _flat(expected))
    reference_params = dict(original.named_parameters(remove_duplicate=False))
    reference_buffers = dict(original.named_buffers(remove_duplicate=False))
    reports = []
    for spec, stage, sent in zip(pipeline.stages, executor.stages, sent_by_stage):
        report = StageReport(spec.index, spec.file)
        for name, value in sent.items():
            if name in reference_values:
                report.outputs = max(report.outputs, relative_difference(value, reference_values[name]))
        for name, param in stage.named_parameters(remove_duplicate=False):
            expected_grad = reference_params[name].grad if name in reference_params else None
            if expected_grad is None and param.grad is None:
                continue
            if expected_grad is None or param.grad is None:
                report.problems.append(f"gradient of {name} is {'missing' if param.grad is None else 'unexpected'}")
                continue
            report.gradients = max(report.gradients, relative_difference(param.grad, expected_grad))
        for name, buffer in stage.named_buffers(remove_duplicate=False):
            if name in reference_buffers:
                report.buffers = max(report.buffers, relative_difference(buffer, reference_buffers[name]))
        reports.append(report)
    return CheckReport(Path(folder), batch_size, tolerance, reports, model_outputs, problems)


def _state_problems(pipeline, executor: LocalExecutor, original: torch.nn.Module) -> list[str]:
    """The stages' state_dict keys must be the model's, and the model's state_dict must load."""
    problems = []
    expected = set(original.state_dict())
    held = set()
    for spec, stage in zip(pipeline.stages, executor.stages):
        keys = set(stage.state_dict())
        unknown = keys - expected
        if unknown:
            problems.append(f"{spec.file} holds keys the model does not have: {sorted(unknown)[:5]}")
        held |= keys
    missing = expected - held
    if missing:
        problems.append(f"no stage holds the model's keys {sorted(missing)[:5]}{' ...' if len(missing) > 5 else ''}")
    return problems
