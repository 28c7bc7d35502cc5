"""Pipeline speedup on CPU: the GPT example trained by one process (the plain PyTorch loop on the
original model) against the ftc engine with 2 stages (and 4, reported only) and against
torch.distributed.pipelining (ScheduleGPipe, Schedule1F1B) on the same generated stages, at the
same global batch, one thread per process.

    .venv/bin/python bench/runtime_speedup.py [--batch 64] [--steps 4] [--micro-batches 4 8 16]

Every step is timed between barriers inside one torchrun launch per stage count; the
single-process baseline is rank 0 training the original model while the other ranks wait, once
before and once after the pipeline runs. It prints samples/s of the fastest and of the median
step, the speedup over the single process and, for P stages and M micro-batches, the bubble
bound P*M/(M+P-1) (the speedup of a perfectly balanced pipeline with free communication) and the
share of it reached; "same-M" is that share against the single process accumulating over the
same M micro-batches, which leaves out what small micro-batches cost by themselves. Each process runs one thread, so a P-stage run needs P idle cores: on a
busy machine the numbers drift (the fastest step is the least disturbed one); the script prints
the load.

All processes flush denormal floats to zero (see worker()).

The tied embedding / LM head of the GPT example sits in the first and the last stage: the ftc
engine all-reduces its gradient every step (sync_shared_grads); torch.distributed.pipelining
has no notion of tied weights, so its runs skip that (and would train the copies apart).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "gpt.py"
SCHEDULES = ("gpipe", "1f1b")


class _Unwrap(torch.nn.Module):
    """A generated stage returns a tuple; torch.distributed.pipelining hands a one-value output
    to the next stage or to the loss as the value itself."""

    def __init__(self, stage: torch.nn.Module):
        super().__init__()
        self.stage = stage

    def forward(self, *inputs):
        outputs = self.stage(*inputs)
        return outputs[0] if len(outputs) == 1 else outputs


def worker(folder: str, out: str, batch: int, steps: int, warmup: int, micro_batches: list[int], compare: bool) -> None:
    """One rank of a P-stage launch: the baseline and every configuration, step by step."""
    import torch.distributed as dist

    from ftc.runtime import load_model_file, load_pipeline
    from ftc.runtime.engine import Engine

    torch.set_num_threads(1)
    # At initialisation the example's logits are large, so the softmax gradients reaching the
    # last blocks are mostly denormal floats, which x86 cores process tens of times slower: the
    # last stage's backward takes 2-3x the first's, for every runtime and the single process
    # alike. Flushing them to zero (a usual CPU training setting) measures the pipelines, not that.
    torch.set_flush_denormal(True)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    pipeline = load_pipeline(folder)
    model_file = load_model_file(pipeline.model_file)
    torch.manual_seed(1)
    data = [(model_file.inputs(batch), torch.randint(0, 256, (batch, 64))) for _ in range(warmup + steps)]

    def step_times(run_step) -> list[float]:
        """Seconds per step, each between barriers, so that a step ends when its last rank does."""
        times = []
        for k in range(warmup + steps):
            dist.barrier()
            start = time.perf_counter()
            run_step(k)
            dist.barrier()
            if k >= warmup:
                times.append(time.perf_counter() - start)
        return times

    def fresh_model() -> torch.nn.Module:
        torch.manual_seed(0)
        return model_file.build()

    def single_process(m: int = 1):
        """Rank 0 alone trains the original model, accumulating over m micro-batches."""
        model = fresh_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(k: int) -> None:
            if rank == 0:
                optimizer.zero_grad()
                (inputs,), targets = data[k]
                for part, target in zip(inputs.chunk(m), targets.chunk(m)):
                    (model_file.loss_fn(model(part), target) / m).backward()
                optimizer.step()

        return step

    def ftc_engine(schedule: str, m: int):
        model = fresh_model()
        modules = {s.index: pipeline.stage_class(s)(model) for s in pipeline.stages if s.device == rank}
        engine = Engine(
            pipeline,
            modules,
            schedule=schedule,
            micro_batches=m,
            loss_fn=model_file.loss_fn,
            seed=0,
            device=torch.device("cpu"),
            distributed=True,
            batch_size=batch,
        )
        optimizer = torch.optim.SGD(engine.parameters(), lr=1e-3)

        def step(k: int) -> None:
            optimizer.zero_grad()
            inputs, targets = data[k]
            engine.train_step(k, inputs if rank == 0 else None, targets if rank == world - 1 else None)
            engine.sync_shared_grads()
            optimizer.step()

        return step

    def torch_pipelining(schedule: str, m: int):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        model = fresh_model()
        (spec,) = [s for s in pipeline.stages if s.device == rank]
        module = pipeline.stage_class(spec)(model)
        stage = PipelineStage(_Unwrap(module), rank, world, torch.device("cpu"))
        runner = (ScheduleGPipe if schedule == "gpipe" else Schedule1F1B)(
            stage, n_microbatches=m, loss_fn=model_file.loss_fn
        )
        optimizer = torch.optim.SGD(module.parameters(), lr=1e-3)

        def step(k: int) -> None:
            optimizer.zero_grad()
            inputs, targets = data[k]
            if rank == 0:
                runner.step(*inputs)
            elif rank == world - 1:
                runner.step(target=targets, losses=[])
            else:
                runner.step()
            optimizer.step()

        return step

    results = [{"runtime": "single", "schedule": "-", "micro_batches": 1, "times": step_times(single_process())}]
    for m in micro_batches:
        results.append(
            {"runtime": "single", "schedule": "-", "micro_batches": m, "times": step_times(single_process(m))}
        )
        for schedule in SCHEDULES:
            runtimes = {"ftc": ftc_engine}
            if compare:
                runtimes["torch.pipelining"] = torch_pipelining
            for name, build in runtimes.items():
                times = step_times(build(schedule, m))
                results.append({"runtime": name, "schedule": schedule, "micro_batches": m, "times": times})
    results.append({"runtime": "single", "schedule": "-", "micro_batches": 1, "times": step_times(single_process())})
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def launch(stages: int, folder: Path, args, compare: bool, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={stages}"]
    command += [__file__, "--worker", str(folder), str(out), "--batch", str(args.batch), "--steps", str(args.steps)]
    command += ["--warmup", str(args.warmup), "--micro-batches", *map(str, args.micro_batches)]
    command += ["--compare"] if compare else []
    subprocess.run(command, env=env, check=True, capture_output=True)
    return json.loads(out.read_text())


def report(stages: int, batch: int, results: list[dict]) -> None:
    """Speedups over the single process on whole batches; the last column compares with the
    single process on the same micro-batches instead, which takes out what small micro-batches
    cost by themselves (less efficient kernels) and leaves the pipelining."""
    single_times: dict[int, list[float]] = {}
    for row in results:
        if row["runtime"] == "single":
            single_times.setdefault(row["micro_batches"], []).extend(row["times"])
    single = {m: batch / min(times) for m, times in single_times.items()}
    header = (
        f"{'P':>2} {'runtime':>17} {'schedule':>8} {'M':>3} {'samples/s':>10} {'(median)':>9} "
        f"{'speedup':>8} {'bound':>6} {'of bound':>9} {'same-M':>7}"
    )
    print(f"\n{stages} processes; single process (rank 0 alone, fastest step), by micro-batches: ", end="")
    print(", ".join(f"M={m} {rate:.1f}" for m, rate in sorted(single.items())) + " samples/s")
    print(header)
    print("-" * len(header))
    for row in results:
        if row["runtime"] == "single":
            continue
        m = row["micro_batches"]
        best = batch / min(row["times"])
        median = batch / statistics.median(row["times"])
        bound = stages * m / (m + stages - 1)
        print(
            f"{stages:>2} {row['runtime']:>17} {row['schedule']:>8} {m:>3} {best:>10.1f} {median:>9.1f} "
            f"{best / single[1]:>8.2f} {bound:>6.2f} {best / single[1] / bound:>9.0%} {best / single[m] / bound:>7.0%}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--worker", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.batch, args.steps, args.warmup, args.micro_batches, args.compare)
        return

    from ftc.compiler import CompileOptions, compile_model

    load_before = os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for stages in args.stages:
            folder = compile_model(MODEL, Path(tmp) / f"p{stages}", CompileOptions(stages=stages)).folder
            out = Path(tmp) / f"p{stages}.json"
            runs.append((stages, launch(stages, folder, args, compare=stages == 2, out=out)))
    load_after = os.getloadavg()[0]
    print(f"GPT example, global batch {args.batch}, {args.steps} timed steps after {args.warmup}, 1 thread/process")
    print(f"load average (1 min) before {load_before:.2f}, after {load_after:.2f}, on {os.cpu_count()} CPUs")
    for stages, results in runs:
        report(stages, args.batch, results)


if __name__ == "__main__":
    main()
