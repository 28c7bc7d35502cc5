"""How well do the partitioners balance real work? Every method compiles every example at
P = 2, 4, 8; every generated stage's forward + backward is then timed on this CPU, one thread,
on the values it receives when the whole pipeline runs one batch (warm-up, then the fastest of
repeats). Time is the process's CPU time (time.process_time), not wall-clock: on a machine
shared with other work, wall-clock times of the same stage moved by 10-30% between runs here,
while CPU time counts only the work done. Printed side by side per method:

  measured imbalance   max over mean of the per-device time (the sum of the device's stages),
                       the figure that bounds pipeline throughput
  predicted imbalance  the same from the cost model
  prediction error     |predicted - measured| / measured per stage (median and worst), after
                       scaling the predictions by one factor fitted per model and profile: the
                       analytic device model's absolute speed (--tflops, --memory-gbps) is
                       arbitrary, only its proportions are tested; for the measured profile the
                       factor shows how far its absolute times are off

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
from pathlib import Path

import numpy as np
import torch

from ftc.backend.writer import write_pipeline
from ftc.frontends import trace
from ftc.ir import FtcError
from ftc.passes.cleanup import eliminate_dead_code
from ftc.passes.naming import name_values
from ftc.passes.partition import METHODS, assign, build_problem, partition
from ftc.profiling import DeviceModel, MeasureSettings, profile_analytic, profile_measured
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
    return profile_analytic(graph, model, batch, DeviceModel()), model_file, model


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
    receives when its pipeline runs one batch). Every distinct stage of a model, whatever
    method made it, is timed in the same rounds, one after another: interference from other
    work on the machine then falls on all methods alike. Stages with the same code (the same
    inputs, outputs and state) are timed once."""

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
        executor.forward(self.model_file.inputs(self.batch_size))
        keys = []
        for spec, stage, received in zip(executor.specs, executor.stages, executor.received):
            key = (tuple(spec.inputs), tuple(spec.outputs), tuple(spec.state), len(executor.specs))
            if key not in self.runs:
                self.runs[key] = _runner(stage, [received[name] for name in spec.inputs])
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


def _runner(stage, inputs):
    def run() -> None:
        outputs = stage(*(_leaf(value) for value in inputs))
        pairs = [(t, torch.ones_like(t)) for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])

    return run


def per_device(times: list[float], devices: list[int]) -> list[float]:
    loads = [0.0] * (max(devices) + 1)
    for t, d in zip(times, devices):
        loads[d] += t
    return loads


def imbalance(loads: list[float]) -> float:
    return max(loads) / (sum(loads) / len(loads))


def predicted_compute(problem, result) -> list[float]:
    """Compute seconds of each stage as the cost model predicts them (nothing is sent here)."""
    return [
        float(
            problem.time[result.members(s)].sum()
            + (problem.forward[result.members(s)].sum() if result.recompute[s] else 0)
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
