"""GPU checks for the lent GPU machine (bench/gpu_check.sh runs this; a few minutes on one GPU).

1. Compile bench/models/gpt_gpu.py (151M parameters) into 4 stages with a measured CUDA profile.
2. Run the generated stages locally on the GPU beside the original model: equal outputs and
   gradients, and the stage code's time overhead (forward + backward, CUDA events, medians).
3. Train in `local` mode on CUDA and with the plain training loop (`single`): equal losses, and
   local mode's throughput as a share of the plain loop's.
4. Per-device peak memory of the partitioned model (`dist` mode, one process per pipeline
   device, all four on this one GPU, gloo moving activations through host copies) beside the
   whole model's (`single`), as torch.cuda.max_memory_allocated reports them.
5. `precision: "bf16"` (torch.autocast("cuda", dtype=torch.bfloat16)): 10 steps in `local`
   mode and with the plain loop, their losses (equal on the CPU, bit for bit, for a model without
   tied weights; this one ties its head to the embedding), their distance from the fp32 losses
   of check 3 and their throughputs (a few seconds).

Prints one line per figure and writes them to $OUT/gpu_check.json (or ./gpu_check.json).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "bench" / "models" / "gpt_gpu.py"
WORK = Path(os.environ.get("FTC_GPU_WORK", "/tmp/ftc_gpu_check"))
STAGES = 4
BATCH = 16
FIGURES: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}


def ftc(*args: str) -> str:
    command = [sys.executable, "-m", "ftc.cli", *args]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    print(done.stdout + done.stderr, flush=True)
    if done.returncode != 0:
        raise SystemExit(f"`ftc {' '.join(args)}` failed with exit code {done.returncode}")
    print(f"[`ftc {args[0]}` took {time.perf_counter() - started:.1f} s]", flush=True)
    return done.stdout


def cuda_time(fn, repeats: int = 20, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def compile_pipeline(profile: str) -> Path:
    device = ["--device", "cuda"] if profile == "measure" else []
    # Links between GPUs move ~100 GB/s or more; the default (1 GB/s) describes CPU processes.
    ftc("compile", str(MODEL), "--stages", str(STAGES), "--batch-size", str(BATCH), "--profile", profile,
        *device, "--bandwidth", "100", "--no-cache", "-o", str(WORK))  # fmt: skip
    ftc("explain", str(WORK / "gpt_gpu"), "--micro-batches", "4")
    FIGURES["profile"] = profile
    return WORK / "gpt_gpu"


def stages_beside_model(folder: Path) -> None:
    from ftc.runtime.local import LocalExecutor
    from ftc.runtime.model_file import load_model_file
    from ftc.runtime.pipeline import load_pipeline

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    pipeline = load_pipeline(folder)
    model_file = load_model_file(MODEL)
    torch.manual_seed(0)
    model = model_file.build().cuda()
    executor = LocalExecutor(pipeline, model, "cuda")
    (idx,) = model_file.inputs(BATCH, "cuda")
    target = torch.randint(0, 256, idx.shape, device="cuda")

    def original() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss = model_file.loss_fn(model(idx), target)
        loss.backward()
        return [loss.detach()] + [p.grad for p in model.parameters()]

    def staged() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss = model_file.loss_fn(executor.forward((idx,)), target)
        executor.backward(loss)
        return [loss.detach()] + [p.grad for p in model.parameters()]

    reference, ours = original(), staged()
    diff = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(ours, reference))
    FIGURES["stages_vs_model_max_relative_difference"] = diff
    print(f"stages beside the model on {FIGURES['device']}: loss and every gradient, max relative difference {diff:.2e}")
    # Alternate the two in rounds so clock and thermal drift hit both alike.
    plain, split = [], []
    for _ in range(3):
        plain += cuda_time(original)
        split += cuda_time(staged)
    overhead = statistics.median(split) / statistics.median(plain) - 1
    FIGURES["forward_backward_ms"] = {"model": statistics.median(plain) * 1e3, "stages": statistics.median(split) * 1e3}
    FIGURES["stage_code_overhead"] = overhead
    print(f"forward+backward, batch {BATCH}: model {statistics.median(plain) * 1e3:.2f} ms, "
          f"stages {statistics.median(split) * 1e3:.2f} ms: overhead {overhead * 100:+.2f}% (target <= 3%)")  # fmt: skip


def train(folder: Path, mode: str, steps: int, extra: list[str] = (), tag: str = "") -> dict:
    results = WORK / f"results_{mode}{tag}.json"
    ftc("train", str(ROOT / "configs" / "base.json"),
        "--set", f"pipeline={folder}", "--set", f"model={MODEL}", "--set", 'data={"name": "bytes"}',
        "--set", f"mode={mode}", "--set", "device=cuda", "--set", f"steps={steps}",
        "--set", f"batch_size={BATCH}", "--set", "micro_batches=4", "--set", "log_every=10",
        "--set", f"results={results}", "--set", "checkpoint.every=0", *extra)  # fmt: skip
    return json.loads(results.read_text())


def local_vs_single(folder: Path) -> dict:
    single = train(folder, "single", 40)
    local = train(folder, "local", 40)
    losses = [(a, b) for a, b in zip(local["loss"], single["loss"])]
    diff = max(abs(a - b) / abs(b) for a, b in losses)
    share = local["samples_per_s"] / single["samples_per_s"]
    FIGURES["train_local_vs_single"] = {
        "max_relative_loss_difference": diff, "single_samples_per_s": single["samples_per_s"],
        "local_samples_per_s": local["samples_per_s"], "throughput_share": share,
    }  # fmt: skip
    print(f"training 40 steps on CUDA: local mode vs the plain loop, max relative loss difference {diff:.2e}; "
          f"{local['samples_per_s']:.1f} vs {single['samples_per_s']:.1f} samples/s = {share * 100:.1f}% (target >= 97%)")  # fmt: skip
    return single


def bf16_local_vs_single(folder: Path, fp32: dict) -> None:
    steps = 10
    single = train(folder, "single", steps, ["--set", "precision=bf16"], "_bf16")
    local = train(folder, "local", steps, ["--set", "precision=bf16"], "_bf16")
    diff = max(abs(a - b) / abs(b) for a, b in zip(local["loss"], single["loss"]))
    from_fp32 = max(abs(a - b) / abs(b) for a, b in zip(single["loss"], fp32["loss"][:steps]))
    FIGURES["bf16_local_vs_single"] = {
        "max_relative_loss_difference": diff, "bitwise_equal_losses": local["loss"] == single["loss"],
        "max_relative_difference_from_fp32": from_fp32, "single_samples_per_s": single["samples_per_s"],
        "local_samples_per_s": local["samples_per_s"],
    }  # fmt: skip
    print(f"bf16 autocast, {steps} steps on CUDA: local mode vs the plain loop, max relative loss difference {diff:.2e} "
          f"(bitwise equal: {local['loss'] == single['loss']}); the plain loop's bf16 vs fp32 losses {from_fp32:.2e}; "
          f"{local['samples_per_s']:.1f} vs {single['samples_per_s']:.1f} samples/s")  # fmt: skip


def memory_per_device(folder: Path, single: dict) -> None:
    pipelined = train(folder, "dist", 10, ["--set", "backend=gloo"])
    whole = single["peak_memory_bytes"][0]
    ranks = pipelined["peak_memory_bytes"]
    FIGURES["peak_memory_bytes"] = {"whole_model": whole, "per_rank": ranks, "largest_share": max(ranks) / whole}
    print(f"peak CUDA memory (allocator, adamw, batch {BATCH}, 4 micro-batches): whole model {whole / 2**30:.2f} GiB; "
          f"pipeline ranks {', '.join(f'{r / 2**30:.2f}' for r in ranks)} GiB: the largest is {max(ranks) / whole * 100:.0f}% of the whole")  # fmt: skip


def section(name: str, fn, *args):
    """Run one check; a failure is reported and recorded, and the other checks still run."""
    try:
        return fn(*args)
    except BaseException as exc:  # a failed check must not hide the figures of the others
        traceback.print_exc()
        FIGURES.setdefault("failed", {})[name] = f"{type(exc).__name__}: {exc}"
        return None


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    # Without a measured profile the other checks still run on an analytic one.
    folder = section("compile_measured", compile_pipeline, "measure") or compile_pipeline("analytic")
    section("stages_beside_model", stages_beside_model, folder)
    single = section("local_vs_single", local_vs_single, folder)
    if single is not None:
        section("memory_per_device", memory_per_device, folder, single)
        section("bf16_local_vs_single", bf16_local_vs_single, folder, single)
    out = Path(os.environ.get("OUT", ".")) / "gpu_check.json"
    out.write_text(json.dumps(FIGURES, indent=1))
    print(json.dumps(FIGURES, indent=1))


if __name__ == "__main__":
    main()
