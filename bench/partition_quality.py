"""How well do the partitioners balance real work? Every method compiles every example at
P = 2, 4, 8; every generated stage's forward + backward is then timed on this CPU, one thread,
on the values it receives when the whole pipeline runs one batch (warm-up, then the fastest of
repeated rounds, each the mean of a few calls in a row, as a device runs its micro-batches);
the last stage also computes the model file's loss on the model's outputs and starts
its backward from it, as the runtime's last stage does (ftc/profiling/stages.py). Time is the process's CPU time (time.process_time), not wall-clock: on
a machine shared with other work, wall-clock times of the same stage moved by 10-30% between
runs here, while CPU time counts only the work done. Printed side by side per method:

  measured imbalance   max over mean of the per-device time (the sum of the device's stages),
                       the figure that bounds pipeline throughput
  predicted imbalance  the same from the cost model
  prediction error     |predicted - measured| / measured per stage (median and worst), after
                       scaling the predictions by one factor fitted per model and profile: the
                       analytic device model's absolute speed (--tflops, --memory-gbps) is
                       arbitrary, only its proportions are tested; for the measured and refined
                       profiles the factor shows how far their absolute times are off
  slowest device       how many model ops the device with the most measured time holds: "1 op"
                       is a bottleneck no split can divide, so methods that give that op a
                       device of its own tie (up to the timer's noise)

Denormal floats are flushed to zero (torch.set_flush_denormal), as in bench/runtime_speedup.py.
Stages run in one process here, so nothing is sent: the pipelines are compiled with fast links
(--bandwidth 1000) so that the partitioners balance compute, which is what is measured. With
--profile measure available (ftc/profiling/measure.py), pipedream is also compiled from
measured node times (column "pipedream+measured"), and as a user runs `ftc compile --profile
measure --refine 3` (column "pipedream+refined", ftc/passes/partition/refine.py): the compiler
then times its candidate stages with the timer used here (ftc/profiling/stages.py), at compile
time, before and apart from the rounds that measure every method here. Its predictions are in
seconds of this timer, yet they are scaled by a fitted factor too, one per compile: this
machine's speed drifts (the same stages timed up to 2x apart a few seconds apart), and the
factors show by how much.

    .venv/bin/python bench/partition_quality.py [--models gpt unet] [--stages 2 4 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from ftc.backend.writer import write_pipeline
from ftc.compiler import CompileOptions, compile_model
from ftc.frontends import trace
from ftc.ir import FtcError
from ftc.passes.cleanup import eliminate_dead_code
from ftc.passes.naming import name_values
from ftc.passes.partition import METHODS, assign, build_problem, partition
from ftc.passes.partition.refine import stage_compute
from ftc.profiling import DeviceModel, MeasureSettings, profile_analytic, profile_measured
from ftc.profiling.stages import StageTimer
from ftc.runtime.model_file import load_model_file

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("gpt", "unet", "resnet", "mlp", "two_tower")
BANDWIDTH = 1000.0
REFINE_ROUNDS = 3
TRANSFORMERS = ("gpt",)  # target: imbalance <= 1.10 at P=4; irregular models: <= 1.15


def analyze(path: Path, batch_size: int):
    model_file = load_model_file(path)
    graph, model, batch = trace(model_file, batch_size, "auto", path.stem)
    graph = name_values(eliminate_dead_code(graph), model_file.path.parent)
    return profile_analytic(graph, model, batch, DeviceModel(), model_file), model_file, model


def compile_with(graph, model_file, method: str, stages: int, out_dir: Path):
    method = method.partition("+")[0]
    problem = build_problem(graph, BANDWIDTH)
    result = partition(problem, method, stages)
    assigned = assign(graph, problem, result)
    folder, _ = write_pipeline(
        assigned, problem, out_dir / f"{method}{stages}", model_file.path, method, {}, recompute=result.recompute
    )
    return folder, result, problem


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
        compute + problem.recompute_time(result.members(s), result.recompute[s])
        for s, compute in enumerate(stage_compute(problem, result))
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
    parser.add_argument("--calls", type=int, default=4,
                        help="calls of a stage in a row per round, as a device runs its micro-batches (default 4)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    # At initialisation the gpt example's logits are large, so the loss's softmax gradients in
    # the last stage's backward are mostly denormal floats, which x86 cores process tens of times
    # slower (45 ms of backward against 11 ms flushed, where a gradient of ones takes 11 ms):
    # bench/runtime_speedup.py flushes them for the same reason.
    torch.set_flush_denormal(True)
    methods = sorted(METHODS) + ["pipedream+measured", "pipedream+refined"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = ROOT / "examples" / f"{name}.py"
            graph, model_file, meta_model = analyze(path, args.batch_size)
            measured_graph, _ = profile_measured(graph, model_file, meta_model, MeasureSettings(), None)
            timer = StageTimer(model_file, args.batch_size, calls=args.calls)
            rows = []
            for stages in args.stages:
                for method in methods:
                    out_dir = Path(tmp) / name / method
                    try:
                        if method.endswith("+refined"):
                            devices, predicted, folder = compile_refined(path, stages, args.batch_size, out_dir)
                        else:
                            source = measured_graph if method.endswith("+measured") else graph
                            folder, result, problem = compile_with(source, model_file, method, stages, out_dir)
                            devices, predicted = result.devices, predicted_compute(problem, result)
                    except FtcError as exc:
                        rows.append((stages, method, None, None, None, None, exc.message))
                        continue
                    rows.append((stages, method, devices, predicted, timer.add(folder), stage_ops(folder), ""))
            seconds = timer.measure(warmup=2, repeats=args.repeats)
            # One factor per moment the predictions were taken at: the profiles once per model,
            # each refined compile at its own (the machine's speed drifts in between).
            scale = {source: _fit([(p, seconds[k]) for row in rows if row[2] is not None and _source(row) == source
                                   for p, k in zip(row[3], row[4])])
                     for source in {_source(row) for row in rows if row[2] is not None}}  # fmt: skip
            refined = ", ".join(f"{scale[s]:.3g} at P={s[1]}" for s in sorted(scale) if s[0] == "refined")
            print(f"\n{name}: CPU time on this machine, 1 thread, batch {args.batch_size}, fastest of {args.repeats} "
                  f"rounds of {args.calls} calls (load average {os.getloadavg()[0]:.1f}); predictions scaled by "
                  f"{scale.get(('analytic', 0), 1):.3g} (analytic) and {scale.get(('measured', 0), 1):.3g} (measured "
                  f"profile), fitted over all the model's stages, and refined ones by {refined or '-'}")  # fmt: skip
            print(f"{'P':>2}  {'method':<20} {'stages':>6}  {'measured imb.':>13}  {'predicted imb.':>14}  "
                  f"{'pred. error median':>18}  {'worst':>6}  {'slowest device':>14}")  # fmt: skip
            for stages, method, devices, predicted, keys, ops, note in rows:
                if devices is None:
                    print(f"{stages:>2}  {method:<20} {'-':>6}  {note}")
                    continue
                measured = [seconds[k] for k in keys]
                factor = scale[_source((stages, method, devices))]
                errors = [abs(factor * a - b) / b for a, b in zip(predicted, measured)]
                loads = per_device(measured, devices)
                slowest = loads.index(max(loads))
                slowest_ops = sum(n for n, d in zip(ops, devices) if d == slowest)
                print(f"{stages:>2}  {method:<20} {len(devices):>6}  "
                      f"{imbalance(loads):>13.3f}  "
                      f"{imbalance(per_device(predicted, devices)):>14.3f}  "
                      f"{statistics.median(errors):>18.1%}  {max(errors):>6.1%}  "
                      f"{slowest_ops:>11} op{'s' if slowest_ops > 1 else ' '}")  # fmt: skip


def stage_ops(folder: Path) -> list[int]:
    """The number of model ops in each stage of a compiled folder."""
    manifest = json.loads((folder / "pipeline.json").read_text())
    return [stage["cost"]["ops"] for stage in manifest["stages"]]


def _source(row: tuple) -> tuple[str, int]:
    """Where a row's predictions come from: (profile, 0), or ("refined", P) for the compile at P."""
    stages, method = row[0], row[1]
    profile = method.partition("+")[2] or "analytic"
    return (profile, stages) if profile == "refined" else (profile, 0)


def compile_refined(path: Path, stages: int, batch_size: int, out_dir: Path) -> tuple[list[int], list[float], Path]:
    """`ftc compile --profile measure --refine 3` as a user runs it: each stage's device and
    predicted compute (forward, backward, stage call and loss; nothing sent), and the folder."""
    options = CompileOptions(stages=stages, batch_size=batch_size, bandwidth=BANDWIDTH, profile="measure",
                             refine=REFINE_ROUNDS, cache=False)  # fmt: skip
    compiled = compile_model(path, out_dir / f"p{stages}", options)
    devices = [stage["device"] for stage in compiled.stages]
    predicted = [stage["cost"]["fwd_time"] + stage["cost"]["bwd_time"] for stage in compiled.stages]
    return devices, predicted, compiled.folder


if __name__ == "__main__":
    main()
