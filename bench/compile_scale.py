"""How does compile time grow with model size? GPT-2-shaped models (bench/models/gpt2_scale.py:
width 1600, 25 heads, vocabulary 50257, context 1024, batch 4) of 12, 24 and 48 blocks (48 is
GPT-2 XL, 1.5B parameters) are compiled into 8 stages by each partitioning method (pipedream,
metis, mpipe by default), the model built on the meta device as `ftc compile` always does. Each
size and method compiles in a fresh subprocess so peak memory does not mix.
Printed per size: wall time of the compile, CPU time (black formats large pipelines in worker
processes, whose CPU time is included), peak resident memory of the compiler and of its largest
worker, CPU time per block, and the balance over the devices (max over mean) of forward FLOPs
and of the predicted time the partitioner balances (a roofline that also prices memory-bound
ops, and the transfers between stages).

Then graph size without parameters: bench/models/recurrent_scan.py, whose selective scan is a
Python loop over time steps (5,066 ops at 128 steps), into 4 stages with pipedream, each size
compiled twice side by side: as `ftc compile` does it (a graph of more than 1,024 ops is
partitioned coarsened, ftc/passes/partition/coarsen.py) and whole (every cut considered, the
tables O(ops^2)); printed with the ratios of peak memory and CPU time and the predicted balance
of each.

    .venv/bin/python bench/compile_scale.py [--layers 12 24 48] [--stages 8] [--methods pipedream metis mpipe]
                                            [--scan-steps 128 256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "bench" / "models" / "gpt2_scale.py"
SCAN = ROOT / "bench" / "models" / "recurrent_scan.py"
SCAN_STAGES = 4


def compile_once(layers: int, stages: int, method: str) -> dict:
    """Compile in this process (a fresh one per size); the figures as a dict."""
    from ftc.compiler import CompileOptions, compile_model

    os.environ["FTC_BENCH_LAYERS"] = str(layers)
    with tempfile.TemporaryDirectory() as out:
        start, cpu_start = time.perf_counter(), cpu_seconds()
        compiled = compile_model(MODEL, out, CompileOptions(stages=stages, batch_size=4, method=method,
                                                                 name=f"gpt2_{layers}"))
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    flops: dict[int, int] = {}
    for stage in compiled.stages:
        flops[stage["device"]] = flops.get(stage["device"], 0) + stage["cost"]["fwd_flops"]
    parameters = sum(stage["cost"]["parameters"] for stage in compiled.stages)
    per_device = list(flops.values())
    return {
        "layers": layers,
        "method": method,
        "stages": len(compiled.stages),
        "parameters": parameters,
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "flops_balance": max(per_device) / (sum(per_device) / len(per_device)),
        "time_balance": compiled.manifest["predicted"]["balance"],
        "gflops_min": min(per_device) / 1e9,
        "gflops_max": max(per_device) / 1e9,
    }


def compile_scan(steps: int, whole: bool) -> dict:
    """Compile the recurrent scan in this process (a fresh one per run); whole: with every cut."""
    from ftc.compiler import CompileOptions, compile_model
    from ftc.passes.partition import coarsen

    os.environ["FTC_BENCH_STEPS"] = str(steps)
    if whole:
        coarsen.MAX_CUTS = 10**9
    with tempfile.TemporaryDirectory() as out:
        start, cpu_start = time.perf_counter(), cpu_seconds()
        compiled = compile_model(SCAN, out, CompileOptions(stages=SCAN_STAGES, name=f"scan_{steps}"))
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    return {
        "ops": sum(stage["cost"]["ops"] for stage in compiled.stages),
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "time_balance": compiled.manifest["predicted"]["balance"],
    }


def cpu_seconds() -> float:
    """User and system time of this process and of its finished workers."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="*", default=[12, 24, 48])
    parser.add_argument("--stages", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=["pipedream", "metis", "mpipe"])
    parser.add_argument("--scan-steps", type=int, nargs="*", default=[128])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the per-size subprocess
    parser.add_argument("--scan-one", type=int, help=argparse.SUPPRESS)  # the per-run subprocess
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(compile_once(args.one, args.stages, args.methods[0])))
        return
    if args.scan_one is not None:
        print(json.dumps(compile_scan(args.scan_one, args.whole)))
        return
    rows = []
    for layers in args.layers:
        for method in args.methods:
            result = subprocess.run(
                [sys.executable, __file__, "--one", str(layers), "--stages", str(args.stages), "--methods", method],
                capture_output=True, text=True, check=True, cwd=ROOT,
            )  # fmt: skip
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    if rows:
        print_layers(rows, args.stages)
    if args.scan_steps:
        print_scan(args.scan_steps)


def print_layers(rows: list[dict], stages: int) -> None:
    print(f"GPT-2-shaped models (width 1600, vocab 50257, context 1024, batch 4) into {stages} stages")
    print("(wall time depends on what else the machine runs; CPU time is the compiler's own work)")
    print("                                                        peak RSS MB                           max/mean")
    print("blocks  params  method     stages  wall s  CPU s  CPU s/block  compiler  worker  fwd GFLOPs per device  FLOPs  time")
    for row in rows:
        print(
            f"{row['layers']:>6}  {row['parameters'] / 1e9:5.2f}B  {row['method']:9}  {row['stages']:>6}"
            f"  {row['wall_s']:6.2f}  {row['cpu_s']:5.2f}"
            f"  {row['cpu_s'] / row['layers']:11.3f}  {row['peak_rss_mb']:8.0f}  {row['worker_rss_mb']:6.0f}"
            f"  {row['gflops_min']:8.0f} .. {row['gflops_max']:<8.0f}  {row['flops_balance']:5.3f}"
            f"  {row['time_balance']:5.3f}"
        )


def print_scan(steps_list: list[int]) -> None:
    runs = {}
    for steps in steps_list:
        for whole in (False, True):
            command = [sys.executable, __file__, "--scan-one", str(steps)] + (["--whole"] if whole else [])
            result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
            runs[steps, whole] = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\nbench/models/recurrent_scan.py (a Python loop over time steps) into {SCAN_STAGES} stages, pipedream:")
    print("as compiled (coarsened past 1,024 ops) against whole (every cut considered)")
    print("                  peak RSS MB              CPU s             predicted balance")
    print("steps    ops   compiled  whole  ratio   compiled  whole  ratio   compiled  whole")
    for steps in steps_list:
        ours, whole = runs[steps, False], runs[steps, True]
        print(
            f"{steps:>5}  {ours['ops']:>5}   {ours['peak_rss_mb']:8.0f}  {whole['peak_rss_mb']:5.0f}"
            f"  {ours['peak_rss_mb'] / whole['peak_rss_mb']:5.2f}   {ours['cpu_s']:8.1f}  {whole['cpu_s']:5.1f}"
            f"  {ours['cpu_s'] / whole['cpu_s']:5.2f}   {ours['time_balance']:8.3f}  {whole['time_balance']:5.3f}"
        )


if __name__ == "__main__":
    main()
