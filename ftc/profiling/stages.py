"""Stage timing: the forward + backward of generated stage modules on real tensors, as a
device of the pipeline runs them. Used by `ftc compile --refine` (ftc/passes/partition/
refine.py) to correct a profile where it mispredicts real stages, and by
bench/partition_quality.py to check the partitioners against reality.

Each stage runs on the values it receives when its pipeline runs one batch. The last stage also
computes the model file's loss on the model's outputs and starts its backward from it, as the
runtime's last stage does (with the target the profiles use, ftc/profiling/loss.py); any other
output starts its backward from a gradient of ones, as a received gradient would.

A device runs its stage once per micro-batch, call after call, so a stage is timed as the mean
of `calls` calls in a row: a single call between other stages' calls would find the caches full
of their code and data (on this project's CPU a one-ReLU stage took 143 us so, about 30 in a
row). Rounds visit every stage in turn, so interference from other work on the machine falls on
all stages alike; a stage's time is its fastest round. On the CPU the clock is the process's CPU
time (with one thread, other programs on a busy machine do not show up); on CUDA it is the wall
clock around a synchronized round.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftc.runtime import LocalExecutor, load_pipeline
from ftc.runtime.model_file import ModelFile
from ftc.runtime.seeding import seed_generators

from .loss import as_leaves, loss_target


class StageTimer:
    """Times the stages of one or more pipelines of the same model. Stages with the same code
    (the same inputs, outputs and state, at the same place) are timed once. All pipelines adopt
    the parameters of one model, built (seeded) at the first `add`: timing several candidate
    splits holds one copy of the weights, not one per split."""

    def __init__(self, model_file: ModelFile, batch_size: int, device: str = "cpu", calls: int = 4):
        self.model_file, self.batch_size, self.device, self.calls = model_file, batch_size, device, calls
        self.model: torch.nn.Module | None = None
        self.runs: dict[Hashable, Callable[[], None]] = {}  # key -> one forward + backward
        self.stages: dict[Hashable, torch.nn.Module] = {}  # key -> the stage module it runs
        self.samples: dict[Hashable, list[float]] = {}

    def add(self, folder: Path) -> list[Hashable]:
        """Register the stages of the pipeline in `folder`; their keys, in stage order."""
        pipeline = load_pipeline(folder)
        if self.model is None:
            seed_generators(0)
            self.model = self.model_file.build(self.device)
            self.model.train()  # an override of train() may return None
        executor = LocalExecutor(pipeline, self.model)
        torch.manual_seed(1)
        output = executor.forward(self.model_file.inputs(self.batch_size, self.device))
        target = loss_target(self.model_file, as_leaves(output), self.batch_size, self.device)
        # Outputs made by earlier stages reach the loss as received values.
        made = {name: value for sent in executor.sent for name, value in sent.items()}
        keys = []
        for spec, stage, received in zip(executor.specs, executor.stages, executor.received):
            last = spec is executor.specs[-1]
            key = (tuple(spec.inputs), tuple(spec.outputs), tuple(spec.state), len(executor.specs), last)
            if key not in self.runs:
                loss = None
                if last and target is not None:
                    made_before = {name: made[name] for name in pipeline.outputs}
                    loss = _Loss(self.model_file.loss_fn, target, pipeline, spec.outputs, made_before)
                self.runs[key] = _runner(stage, [received[name] for name in spec.inputs], loss)
                self.stages[key] = stage
            keys.append(key)
        return keys

    def measure(self, warmup: int = 2, repeats: int = 9) -> dict[Hashable, float]:
        """Seconds per forward + backward of every registered stage (see the module doc)."""
        synchronize = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        clock = time.perf_counter if self.device == "cuda" else time.process_time
        for round_ in range(warmup + repeats):
            for key, run in self.runs.items():
                synchronize()
                start = clock()
                for _ in range(self.calls):
                    run()
                synchronize()
                if round_ >= warmup:
                    self.samples.setdefault(key, []).append((clock() - start) / self.calls)
        return {key: min(samples) for key, samples in self.samples.items()}


@dataclass
class _Loss:
    """The loss the last stage computes: loss_fn on the model's outputs (the stage's own, and
    those earlier stages made, as received leaves) with the profiles' target."""

    loss_fn: Callable
    target: Any
    pipeline: Any
    names: list[str]  # the stage's outputs, in order
    made_before: dict[str, Any]  # every model output as the reference run left it

    def __call__(self, outputs: tuple) -> torch.Tensor:
        values = {name: _leaf(value) for name, value in self.made_before.items()}
        values.update((name, value) for name, value in zip(self.names, outputs) if name in values)
        return self.loss_fn(self.pipeline.assemble_output(values), self.target)


def _leaf(value: Any) -> Any:
    """A received value: a fresh leaf, requiring grad where the sent value did."""
    if isinstance(value, torch.Tensor):
        leaf = value.detach().clone()
        return leaf.requires_grad_() if value.requires_grad else leaf
    return value


def _runner(stage: torch.nn.Module, inputs: list, loss: _Loss | None) -> Callable[[], None]:
    def run() -> None:
        outputs = stage(*(_leaf(value) for value in inputs))
        sources = [t for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad]
        if loss is not None:
            # Outputs that are the model's reach the backward through the loss; any other output
            # of the last stage would be a dead end, and gets a gradient of ones as before.
            sources = [loss(outputs)] + [
                t for name, t in zip(loss.names, outputs)
                if name not in loss.made_before and isinstance(t, torch.Tensor) and t.requires_grad
            ]  # fmt: skip
        if sources:
            torch.autograd.backward(sources, [torch.ones_like(t) for t in sources])

    return run
