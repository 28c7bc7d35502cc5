"""The compiler's memory estimate per device against what each device holds while the engine
trains (tests/memory_truth.py: live storages, counted once, charged to the device whose action
made them; parameters and buffers added), for the examples and the edge models of
tests/test_memory_truth.py, over schedules, micro-batch counts and optimizers.

    .venv/bin/python bench/memory_audit.py [--models gpt,mlp,...] [--stages 4] [--batch-size 8]
        [--schedules gpipe,1f1b,async] [--micro-batches 1,4,8] [--optimizers sgd,adam]
        [--method pipedream] [--recompute never] [--profile analytic]

Prints one row per device: the estimate (pipeline.json's predicted device_memory, compiled with
the same --schedule, --micro-batches and --optimizer), the measured peak and their ratio, then
the range of the ratios. Deterministic: no clocks, no RSS.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ftc.compiler import CompileOptions, compile_model  # noqa: E402
from tests.memory_truth import measure  # noqa: E402

MODELS = {
    "gpt": ROOT / "examples" / "gpt.py",
    "resnet": ROOT / "examples" / "resnet.py",
    "unet": ROOT / "examples" / "unet.py",
    "mlp": ROOT / "examples" / "mlp.py",
    "two_tower": ROOT / "examples" / "two_tower.py",
    "memory_lm": ROOT / "tests" / "models" / "memory_lm.py",  # tied, frozen, buffers, a large loss
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--schedules", default="gpipe,1f1b,async")
    parser.add_argument("--micro-batches", default="1,4,8")
    parser.add_argument("--optimizers", default="sgd,adam")
    parser.add_argument("--method", default="pipedream")
    parser.add_argument("--recompute", default="never", help="never, always or auto (the compiler's choice)")
    parser.add_argument("--profile", default="analytic", help="analytic or measure (on this CPU, not cached)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ratios = []
    print(f"{'model':10} {'schedule':8} {'M':>2} {'optimizer':9} {'device':>6} {'stages':8} "
          f"{'estimate MB':>11} {'measured MB':>11} {'ratio':>6}")  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models.split(","):
            stages = 2 if name == "memory_lm" else args.stages
            for optimizer in args.optimizers.split(","):
                for schedule in args.schedules.split(","):
                    for micro_batches in map(int, args.micro_batches.split(",")):
                        options = CompileOptions(stages=stages, batch_size=args.batch_size, schedule=schedule,
                                                 micro_batches=micro_batches, optimizer=optimizer, method=args.method,
                                                 recompute=args.recompute, name=name, profile=args.profile,
                                                 cache=False)  # fmt: skip
                        result = compile_model(MODELS[name], Path(scratch) / f"{schedule}{micro_batches}{optimizer}",
                                               options)  # fmt: skip
                        measured = measure(result.folder, schedule=schedule, micro_batches=micro_batches,
                                           optimizer=optimizer)  # fmt: skip
                        for device, estimate in enumerate(result.manifest["predicted"]["device_memory"]):
                            held = [s["index"] for s in result.stages if s["device"] == device]
                            recomputing = [s["index"] for s in result.stages if s["recompute"]]
                            ratio = measured.total(device) / estimate
                            ratios.append(ratio)
                            mark = "r" if set(held) & set(recomputing) else ""
                            print(f"{name:10} {schedule:8} {micro_batches:>2} {optimizer:9} {device:>6} "
                                  f"{','.join(map(str, held)) + mark:8} {estimate / 1e6:>11.2f} "
                                  f"{measured.total(device) / 1e6:>11.2f} {ratio:>6.2f}", flush=True)  # fmt: skip
    print(f"measured / estimate: {min(ratios):.2f} to {max(ratios):.2f} over {len(ratios)} devices "
          "(r: the device recomputes)")


if __name__ == "__main__":
    main()
