"""Pipeline speedup on CPU: the GPT example trained by one process (the plain PyTorch loop on the
original model) against the ftc engine with 2 stages (and 4, reported only) and against
torch.distributed.pipelining (ScheduleGPipe, Schedule1F1B) on the same generated stages, at the
same global batch, one thread per process.

    .venv/bin/python bench/runtime_speedup.py [--batch 128] [--rounds 5] [--steps 2] [--micro-batches 4 8 16]
                                              [--async-segment 4]

One torchrun launch per stage count builds every configuration, then times them in rounds, each
step between barriers. This machine's speed drifts by 10-30% over seconds to minutes, more than
the differences measured, so nothing is compared across minutes: each configuration's steps
sit between two steps of the reference (rank 0 training the original model on the whole batch
while the other ranks wait), its speedup in a round is the faster reference step's time over its
fastest step, and the
figure printed is the median over rounds. For P stages and M micro-batches the bubble bound
P*M/(M+P-1) is the speedup of a perfectly balanced pipeline with free communication on P free
cores; "of bound" is the share of it reached, "same-M" the same against the single process
accumulating over M micro-batches (which leaves out what small micro-batches cost by
themselves), and "of ceiling" the share of what P processes reach here at all: P independent
copies of the plain loop running at once are timed the same way, and their speedup (P on P
free cores) scales the bound. ftc and torch.distributed.pipelining at the same schedule and M
run one after the other in every round, and their speedups are compared round by round.

All processes flush denormal floats to zero (see worker()) and keep freed heap memory
(KEEP_FREED_MEMORY).

Rows of schedule "async" (runtime/staleness.py; `--async-segment S`, default 4, 0 leaves them
out) run S steps per call, flushing the pipeline once per S steps instead of once per step, each
stage updating its weights as its backwards of a step finish; their speedup counts the S batches
a call trains, and their bound is that of one pipeline of S*M micro-batches, P*S*M/(S*M+P-1).

The tied embedding / LM head of the GPT example sits in the first and the last stage: the ftc
engine all-reduces its gradient every step (sync_shared_grads; async: once per step, when the
last holder's backward of the step is done); torch.distributed.pipelining has no notion of tied
weights, so its runs skip that (and would train the copies apart).
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
# glibc malloc hands freed memory back to the OS (trimming the heap top, unmapping large
# blocks), so a schedule that frees a step's activations all at once faults them in again the
# next step: thousands of page faults per step here, in some steps and not others, depending on
# what ran before. Every configuration runs with the heap kept, alike.
KEEP_FREED_MEMORY = {
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
    "MALLOC_TOP_PAD_": str(1 << 28),
    "MALLOC_MMAP_THRESHOLD_": str(1 << 25),
}


class _Unwrap(torch.nn.Module):
    """A generated stage returns a tuple; torch.distributed.pipelining hands a one-value output
    to the next stage or to the loss as the value itself."""

    def __init__(self, stage: torch.nn.Module):
        super().__init__()
        self.stage = stage

    def forward(self, *inputs):
        outputs = self.stage(*inputs)
        return outputs[0] if len(outputs) == 1 else outputs


def worker(folder: str, out: str, batch: int, rounds: int, steps: int, warmup: int, micro_batches: list[int], compare: bool,
           segment: int) -> None:  # fmt: skip
    """One rank of a P-stage launch: builds every configuration, then times them in rounds."""
    import torch.distributed as dist

    from ftc.runtime import load_model_file, load_pipeline
    from ftc.runtime.config import StalenessConfig
    from ftc.runtime.engine import Engine
    from ftc.runtime.staleness import StaleWeights
    from ftc.runtime.train import async_shared_sets

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
    data = [(model_file.inputs(batch), torch.randint(0, 256, (batch, 64))) for _ in range(4)]

    def fresh_model() -> torch.nn.Module:
        torch.manual_seed(0)
        return model_file.build()

    def plain_loop(m: int, ranks: set[int]):
        """The original model trained by the ranks in `ranks`, each on its own copy and the
        whole batch (accumulating over m micro-batches); the other ranks wait."""
        model = fresh_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(k: int) -> None:
            if rank in ranks:
                optimizer.zero_grad()
                (inputs,), targets = data[k % len(data)]
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
            inputs, targets = data[k % len(data)]
            engine.train_step(k, inputs if rank == 0 else None, targets if rank == world - 1 else None)
            engine.sync_shared_grads()
            optimizer.step()

        return step

    def ftc_async(m: int):
        """Schedule async: one call runs `segment` steps as one pipeline fill and drain, each stage
        updating its weights as its backwards of a step finish."""
        model = fresh_model()
        modules = {s.index: pipeline.stage_class(s)(model) for s in pipeline.stages if s.device == rank}
        parameters = [p for module in modules.values() for p in module.parameters()]
        optimizer = torch.optim.SGD(parameters, lr=1e-3)
        stale = StaleWeights(modules, optimizer, lambda step: 1e-3, StalenessConfig(flush_every=segment), m,
                             pipeline.tied, async_shared_sets(pipeline, distributed=True))  # fmt: skip
        engine = Engine(
            pipeline,
            modules,
            schedule="async",
            micro_batches=m * segment,
            loss_fn=model_file.loss_fn,
            seed=0,
            device=torch.device("cpu"),
            distributed=True,
            batch_size=batch * segment,
            stale=stale,
            batch_micro_batches=m,
        )
        batches = [data[k % len(data)] for k in range(segment)]
        inputs = tuple(torch.cat(parts) for parts in zip(*(b[0] for b in batches)))
        targets = torch.cat([b[1] for b in batches])

        def step(k: int) -> None:
            stale.begin(k * segment)
            engine.train_losses(k * segment, inputs if rank == 0 else None, targets if rank == world - 1 else None,
                                loss_scale=segment)  # fmt: skip

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
            inputs, targets = data[k % len(data)]
            if rank == 0:
                runner.step(*inputs)
            elif rank == world - 1:
                runner.step(target=targets, losses=[])
            else:
                runner.step()
            optimizer.step()

        return step

    reference = plain_loop(1, {0})
    configs = [("parallel copies", "-", 1, plain_loop(1, set(range(world))))]
    configs += [("single", "-", m, plain_loop(m, {0})) for m in micro_batches if m > 1]
    for m in micro_batches:
        for schedule in SCHEDULES:
            configs.append(("ftc", schedule, m, ftc_engine(schedule, m)))
            if compare:
                configs.append(("torch.pipelining", schedule, m, torch_pipelining(schedule, m)))
        if segment:
            configs.append(("ftc", "async", m, ftc_async(m)))

    def timed(run_step, step_number: int) -> float:
        """One step between barriers, so that it ends when its last rank does."""
        dist.barrier()
        start = time.perf_counter()
        run_step(step_number)
        dist.barrier()
        return time.perf_counter() - start

    for run_step in [reference, *(config[3] for config in configs)]:
        for k in range(warmup):
            timed(run_step, k)
    # This machine's speed drifts by 10-30% over seconds to minutes (other tenants), far more
    # than the differences measured. So every configuration's steps sit between two steps of
    # the reference (the single process on the whole batch), and rounds visit the
    # configurations in turn, starting one further each round.
    rows = [
        {"runtime": name, "schedule": schedule, "micro_batches": m, "batches": segment if schedule == "async" else 1,
         "rounds": []}
        for name, schedule, m, _ in configs
    ]  # fmt: skip
    step_number = warmup
    reference_times = [timed(reference, step_number)]
    for round_ in range(rounds):
        for offset in range(len(configs)):
            index = (round_ + offset) % len(configs)
            times = [timed(configs[index][3], step_number + 1 + k) for k in range(steps)]
            step_number += steps + 1
            reference_times.append(timed(reference, step_number))
            rows[index]["rounds"].append({"reference": reference_times[-2:], "times": times})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def launch(stages: int, folder: Path, args, compare: bool, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **KEEP_FREED_MEMORY}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={stages}"]
    command += [__file__, "--worker", str(folder), str(out), "--batch", str(args.batch)]
    command += ["--rounds", str(args.rounds), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--micro-batches", *map(str, args.micro_batches)]
    command += ["--compare"] if compare else []
    command += ["--async-segment", str(args.async_segment)]
    subprocess.run(command, env=env, check=True, capture_output=True)
    return json.loads(out.read_text())


def report(stages: int, batch: int, results: list[dict]) -> None:
    """Speedup over the single process on the whole batch: per round, the reference step's time
    (the faster of the two around it) over the configuration's fastest step; the median over
    rounds. "same-M"
    compares with the single process accumulating over the same micro-batches instead, which
    takes out what small micro-batches cost by themselves. "of ceiling" compares with what P
    processes reach here when they need no pipeline at all (P independent copies of the plain
    loop at once): the bubble bound scaled by that speedup over P, the share of the reachable
    speedup that the schedule and runtime got."""

    def speedups(row: dict) -> list[float]:
        return [min(r["reference"]) * row.get("batches", 1) / min(r["times"]) for r in row["rounds"]]

    def speedup(row: dict) -> float:
        return statistics.median(speedups(row))

    references = [t for row in results for r in row["rounds"] for t in r["reference"]]
    single = {1: 1.0}
    single.update({row["micro_batches"]: speedup(row) for row in results if row["runtime"] == "single"})
    (copies,) = [row for row in results if row["runtime"] == "parallel copies"]
    ceiling = stages * speedup(copies)
    print(
        f"\n{stages} processes; the single process on the whole batch: {batch / min(references):.1f} samples/s "
        f"fastest step, {batch / statistics.median(references):.1f} median; accumulating over M micro-batches: "
        + ", ".join(f"M={m} {rate:.2f}x" for m, rate in sorted(single.items()) if m > 1)
    )
    print(
        f"{stages} independent copies of the plain loop at once: {ceiling:.2f}x one copy's samples/s "
        f"(the most {stages} processes reach on this machine; {stages}x on one free core each)"
    )
    def of_ceiling(share: float) -> str:
        # With more processes than cores, a pipeline's idle ranks lend their core to the busy
        # ones, which independent copies cannot: the ceiling does not bound it.
        return f"{share:.0%}" if stages <= (os.cpu_count() or 1) else "-"

    header = (
        f"{'P':>2} {'runtime':>17} {'schedule':>8} {'M':>3} {'samples/s':>10} {'speedup':>8} {'(range)':>11} "
        f"{'bound':>6} {'of bound':>9} {'same-M':>7} {'of ceiling':>11}"
    )
    print(header)
    print("-" * len(header))
    pipelines = [row for row in results if row["runtime"] not in ("single", "parallel copies")]
    for row in pipelines:
        m, batches = row["micro_batches"], row.get("batches", 1)
        best = batch * batches / min(t for r in row["rounds"] for t in r["times"])
        # One fill and drain per call: per step under gpipe and 1f1b, per segment under async.
        bound = stages * m * batches / (m * batches + stages - 1)
        rate, spread = speedup(row), speedups(row)
        print(
            f"{stages:>2} {row['runtime']:>17} {row['schedule']:>8} {m:>3} {best:>10.1f} {rate:>8.2f} "
            f"{min(spread):>5.2f}-{max(spread):<5.2f} {bound:>6.2f} {rate / bound:>9.0%} "
            f"{rate / single[m] / bound:>7.0%} {of_ceiling(rate / (bound * ceiling / stages)):>11}"
        )
    by_key = {(row["runtime"], row["schedule"], row["micro_batches"]): row["rounds"] for row in pipelines}
    by_batches = {(row["runtime"], row["schedule"], row["micro_batches"]): row.get("batches", 1) for row in pipelines}
    if any(key[0] == "torch.pipelining" for key in by_key):
        print("\nftc's speedup over torch.distributed.pipelining's, round by round (timed one after the other)")
        for (runtime, schedule, m), ours in by_key.items():
            theirs = by_key.get(("torch.pipelining", schedule, m))
            if runtime != "ftc" or theirs is None:
                continue
            print(f"  {schedule:>5} M={m:<3} {compared(ours, theirs, 1, 'ftc')}")
    segments = [batches for (_, schedule, _), batches in by_batches.items() if schedule == "async"]
    if segments:
        print(f"\nftc async ({segments[0]} steps per flush) over ftc 1f1b, round by round (timed one after the other)")
        for (runtime, schedule, m), ours in by_key.items():
            theirs = by_key.get(("ftc", "1f1b", m))
            if schedule == "async" and theirs is not None:
                print(f"  M={m:<3} {compared(ours, theirs, by_batches[(runtime, schedule, m)], 'async')}")


def compared(ours: list[dict], theirs: list[dict], batches: int, name: str) -> str:
    """Our speedup over theirs in each round (timed one after the other), summarized; `batches`:
    how many batches one of our calls trains."""
    ratios = [
        (min(o["reference"]) * batches / min(o["times"])) / (min(t["reference"]) / min(t["times"]))
        for o, t in zip(ours, theirs)
    ]
    won = sum(ratio > 1 for ratio in ratios)
    return (f"median of rounds {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}); "
            f"{name} faster in {won} of {len(ratios)} rounds")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--worker", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--async-segment", type=int, default=4,
                        help="steps per flush of the async rows (0: no async rows)")  # fmt: skip
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.batch, args.rounds, args.steps, args.warmup, args.micro_batches, args.compare,
               args.async_segment)  # fmt: skip
        sys.stdout.flush()
        os._exit(0)  # skips the interpreter's teardown of the transport, as ftc.runtime.worker does

    from ftc.compiler import CompileOptions, compile_model

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for stages in args.stages:
            folder = compile_model(MODEL, Path(tmp) / f"p{stages}", CompileOptions(stages=stages)).folder
            out = Path(tmp) / f"p{stages}.json"
            runs.append((stages, launch(stages, folder, args, compare=stages == 2, out=out)))
    load_after = os.getloadavg()[0]
    print(
        f"GPT example, global batch {args.batch}, {args.rounds} rounds of {args.steps} timed steps per "
        f"configuration after {args.warmup} warm-up, 1 thread/process, {time.perf_counter() - started:.0f} s"
    )
    print(f"load average (1 min) before {load_before:.2f}, after {load_after:.2f}, on {os.cpu_count()} CPUs")
    for stages, results in runs:
        report(stages, args.batch, results)


if __name__ == "__main__":
    main()
