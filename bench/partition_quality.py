"""How well do the partitioners balance real work? Every method compiles every example at
P = 2, 4, 8; every generated stage's forward + backward is then timed on this CPU, one thread,
on the values it receives when the whole pipeline runs one batch (warm-up, then the fastest of
repeats); the last stage also computes the model file's loss on the model's outputs and starts
its backward from it, as the runtime's last stage does (with the target the profiles use,
ftc/profiling/loss.py). Time is the process's CPU time (time.process_time), not wall-clock: on
a machine shared with other work, wall-clock times of the same stage moved by 10-30% between
runs here, while CPU time counts only the work done. Printed side by side per method:

  measured imbalance   max over mean of the per-device time (the sum of the device's stages),
                       the figure that bounds pipeline throughput
  predicted imbalance  the same from the cost model
  prediction error     |predicted - measured| / measured per stage (median and worst), after
                       scaling the predictions by one factor fitted per model and profile: the
                       analytic device model's absolute speed (--tflops, --memory-gbps) is
                       arbitrary, only its proportions are tested; for the measured profile the
                       factor shows how far its absolute times are off

Denormal floats are flushed to zero (torch.set_flush_denormal), as in bench/runtime_speedup.py.
Stages run in one process here, so nothing is sent: the pipelines are compiled with fast links
(--bandwidth 1000) so that the partitioners balance compute, which is what is measured. With
--profile measure available (ftc/profiling/measure.py), pipedream is also compiled from
measured node times (column "pipedream+measured").

    .venv/bin/python bench/partition_quality.py [--models gpt unet] [--stages 2 4 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ftc.backend.writer import write_pipeline
from ftc.frontends import trace
from ftc.ir import FtcError
from ftc.passes.cleanup import eliminate_dead_code
from ftc.passes.naming import name_values
from ftc.passes.partition import METHODS, assign, build_problem, partition
from ftc.profiling import DeviceModel, MeasureSettings, profile_analytic, profile_measured
from ftc.profiling.loss import as_leaves, loss_target
from ftc.runtime import LocalExecutor, load_pipeline
from ftc.runtime.model_file import load_model_file

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("gpt", "unet", "resnet", "mlp", "two_tower")
BANDWIDTH = 1000.0
TRANSFORMERS = ("gpt",)  # target: imbalance <= 1.10 at P=4; irregular models: <= 1.15


def analyze(path: Path, batch_size: int):
    model_file = load_model_file(path)
    graph, model, batch = trace(model_file, batch_size, "auto", path.stem)
    graph = name_values(eliminate_dead_code(graph), model_file.path.parent)
    return profile_analytic(graph, model, batch, DeviceModel(), model_file), model_file, model


def compile_with(graph, model_file, method: str, stages: int, out_dir: Path):
    problem = build_problem(graph, BANDWIDTH)
    result = partition(problem, method, stages)
    assigned = assign(graph, problem, result)
    folder, manifest_stages = write_pipeline(
        assigned, problem, out_dir / f"{method}{stages}", model_file.path, method, {}, recompute=result.recompute
    )
    return folder, result, problem


def _leaf(value):
    if isinstance(value, torch.Tensor):
        leaf = value.detach().clone()
        return leaf.requires_grad_() if value.requires_grad else leaf
    return value


class StageTimer:
    """Forward + backward of generated stages on their reference inputs (the values each stage
    receives when its pipeline runs one batch), the last stage with the loss. Every distinct
    stage of a model, whatever method made it, is timed in the same rounds, one after another:
    interference from other work on the machine then falls on all methods alike. Stages with
    the same code (the same inputs, outputs and state) are timed once."""

    def __init__(self, model_file, batch_size: int):
        self.model_file, self.batch_size = model_file, batch_size
        self.runs: dict[tuple, object] = {}
        self.samples: dict[tuple, list[float]] = {}

    def add(self, folder: Path) -> list[tuple]:
        """Register the stages of a pipeline; their keys, in stage order."""
        pipeline = load_pipeline(folder)
        torch.manual_seed(0)
        executor = LocalExecutor(pipeline, self.model_file.build().train())
        torch.manual_seed(1)
        output = executor.forward(self.model_file.inputs(self.batch_size))
        target = loss_target(self.model_file, as_leaves(output), self.batch_size, "cpu")
        keys = []
        for spec, stage, received in zip(executor.specs, executor.stages, executor.received):
            last = spec is executor.specs[-1]
            key = (tuple(spec.inputs), tuple(spec.outputs), tuple(spec.state), len(executor.specs), last)
            if key not in self.runs:
                inputs = [received[name] for name in spec.inputs]
                loss = None
                if last and target is not None:
                    # Outputs made by earlier stages reach the loss as received values.
                    made = {name: value for sent in executor.sent for name, value in sent.items()}
                    made_before = {name: made[name] for name in pipeline.outputs}
                    loss = _Loss(self.model_file.loss_fn, target, pipeline, spec.outputs, made_before)
                self.runs[key] = _runner(stage, inputs, loss)
            keys.append(key)
        return keys

    def measure(self, warmup: int, repeats: int) -> dict[tuple, float]:
        for round_ in range(warmup + repeats):
            for key, run in self.runs.items():
                start = time.process_time()
                run()
                if round_ >= warmup:
                    self.samples.setdefault(key, []).append(time.process_time() - start)
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


def _runner(stage, inputs, loss: _Loss | None):
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


def per_device(times: list[float], devices: list[int]) -> list[float]:
    loads = [0.0] * (max(devices) + 1)
    for t, d in zip(times, devices):
        loads[d] += t
    return loads


def imbalance(loads: list[float]) -> float:
    return max(loads) / (sum(loads) / len(loads))


def predicted_compute(problem, result) -> list[float]:
    """Compute seconds of each stage as the cost model predicts them (nothing is sent here): its
    ops, the forward again where it recomputes, its call and, for the last, the loss."""
    return [
        float(
            problem.time[result.members(s)].sum()
            + (problem.forward[result.members(s)].sum() if result.recompute[s] else 0)
            + problem.fixed(result.members(s)).total
        )
        for s in range(result.num_stages)
    ]


def _fit(pairs: list[tuple[float, float]]) -> float:
    """The factor k minimizing the squared error of k * predicted against measured."""
    predicted, measured = np.array(pairs).T
    return float(predicted @ measured / (predicted @ predicted))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--stages", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # At initialisation the gpt example's logits are large, so the loss's softmax gradients in
    # the last stage's backward are mostly denormal floats, which x86 cores process tens of times
    # slower (45 ms of backward against 11 ms flushed, where a gradient of ones takes 11 ms):
    # bench/runtime_speedup.py flushes them for the same reason.
    torch.set_flush_denormal(True)
    methods = sorted(METHODS) + ["pipedream+measured"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = ROOT / "examples" / f"{name}.py"
            graph, model_file, meta_model = analyze(path, args.batch_size)
            measured_graph, _ = profile_measured(graph, model_file, meta_model, MeasureSettings(), None)
            timer = StageTimer(model_file, args.batch_size)
            rows = []
            for stages in args.stages:
                for method in methods:
                    source = measured_graph if method.endswith("+measured") else graph
                    try:
                        folder, result, problem = compile_with(
                            source, model_file, method.split("+")[0], stages, Path(tmp) / name / method
                        )
                    except FtcError as exc:
                        rows.append((stages, method, None, None, None, exc.message))
                        continue
                    rows.append((stages, method, result, predicted_compute(problem, result), timer.add(folder), ""))
            seconds = timer.measure(warmup=2, repeats=args.repeats)
            scale = {
                measured_profile: _fit(
                    [
                        (p, seconds[k])
                        for _, method, result, predicted, keys, _ in rows
                        if result is not None and method.endswith("+measured") == measured_profile
                        for p, k in zip(predicted, keys)
                    ]
                )
                for measured_profile in (False, True)
            }
            print(f"\n{name}: CPU time on this machine, 1 thread, batch {args.batch_size}, fastest of {args.repeats} "
                  f"(load average {os.getloadavg()[0]:.1f}); predictions scaled by {scale[False]:.3g} (analytic) "
                  f"and {scale[True]:.3g} (measured profile), fitted over all the model's stages")  # fmt: skip
            print(f"{'P':>2}  {'method':<20} {'stages':>6}  {'measured imb.':>13}  {'predicted imb.':>14}  "
                  f"{'pred. error median':>18}  {'worst':>6}")  # fmt: skip
            for stages, method, result, predicted, keys, note in rows:
                if result is None:
                    print(f"{stages:>2}  {method:<20} {'-':>6}  {note}")
                    continue
                measured = [seconds[k] for k in keys]
                factor = scale[method.endswith("+measured")]
                errors = [abs(factor * a - b) / b for a, b in zip(predicted, measured)]
                print(f"{stages:>2}  {method:<20} {result.num_stages:>6}  "
                      f"{imbalance(per_device(measured, result.devices)):>13.3f}  "
                      f"{imbalance(per_device(predicted, result.devices)):>14.3f}  "
                      f"{statistics.median(errors):>18.1%}  {max(errors):>6.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
