"""Training: the pipeline modes against plain single-process PyTorch training (mode "single").

A small dropout-free language model is compiled into 2 and 4 stages: its LM head is tied to the
embedding under two names (`head.weight = wte.weight`, as Hugging Face ties), a position
parameter is read by the first and the last stage under one name, and a BatchNorm keeps running
statistics; the same config (seed, data, optimizer) then trains it in mode single (the truth), in
mode local and in mode dist under torchrun with gloo on the CPU. Per-step losses and the final
weights (the merged checkpoint) must agree to a relative 1e-5. The fault tests make one rank
exit, hang or produce NaN and check that the run stops with a message naming the rank and the
step, that the last complete checkpoint survives, and that resuming from it reproduces the
uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ftc.cli import main as cli_main
from ftc.ir import FtcError
from ftc.runtime import checkpoint
from ftc.runtime.comm import peer_reason
from ftc.runtime.config import load_config
from ftc.runtime.data import Sampler, load_batch
from ftc.runtime.datasets import build_dataset
from ftc.runtime.model_file import load_model_file
from ftc.runtime.train import train
from ftc.runtime.worker import _failure_report, launch

STEPS = 20
TINY_LM = """
import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, CONTEXT, WIDTH, LAYERS = 256, 8, 16, 4


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(WIDTH)
        self.fc = nn.Linear(WIDTH, 2 * WIDTH)
        self.norm = nn.BatchNorm1d(2 * WIDTH)
        self.proj = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x):
        hidden = F.gelu(self.fc(self.ln(x)))
        return x + self.proj(self.norm(hidden.transpose(1, 2)).transpose(1, 2))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, WIDTH)
        nn.init.normal_(self.wte.weight, std=0.1)
        self.wpe = nn.Parameter(0.02 * torch.randn(1, CONTEXT, WIDTH))
        self.blocks = nn.ModuleList([Block() for _ in range(LAYERS)])
        self.ln = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x) + self.wpe)


def build_model():
    return TinyLM()


def example_inputs(batch_size):
    return (torch.randint(0, VOCAB, (batch_size, CONTEXT)),)


def loss_fn(output, target):
    return F.cross_entropy(output.reshape(-1, VOCAB), target.reshape(-1))
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model compiled into 2 and 4 stages, and a mixed-pipe copy of the 4-stage
    pipeline: stages on devices [0, 1, 1, 0]."""
    from ftc.compiler import CompileOptions, compile_model

    root = tmp_path_factory.mktemp("tiny")
    model = root / "tiny_lm.py"
    model.write_text(TINY_LM)
    folders = {p: compile_model(model, root / f"p{p}", CompileOptions(stages=p)).folder for p in (2, 4)}
    mixed = root / "mixed" / "tiny_lm"
    shutil.copytree(folders[4], mixed)
    manifest = json.loads((mixed / "pipeline.json").read_text())
    for stage, device in zip(manifest["stages"], [0, 1, 1, 0]):
        stage["device"] = device
    (mixed / "pipeline.json").write_text(json.dumps(manifest))
    folders["mixed"] = mixed
    return root, model, folders


def config(root: Path, pipeline: Path, name: str, **settings):
    data = {
        "pipeline": str(pipeline), "data": {"name": "bytes", "max_bytes": 20000},
        "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.01},
        "lr_schedule": {"name": "cosine", "warmup_steps": 3}, "batch_size": 8, "micro_batches": 4,
        "steps": STEPS, "seed": 1, "log_every": 10, "timeout_s": 30,
        "results": str(root / name / "results.json"), "checkpoint": {"dir": str(root / name / "checkpoints")},
    }  # fmt: skip
    data.update(settings)
    return load_config(data=data)


@pytest.fixture(scope="module")
def single(tiny):
    """The truth: mode single, for step_every 1 and 2 -> (losses, final state_dict)."""
    root, _, folders = tiny
    runs = {}
    for step_every in (1, 2):
        results = train(config(root, folders[2], f"single{step_every}", mode="single", step_every=step_every))
        runs[step_every] = (results.loss, checkpoint.merge(root / f"single{step_every}" / "checkpoints")[1])
    return runs


def assert_same_run(losses, state, truth, first_step=0):
    truth_losses, truth_state = truth
    assert len(losses) == STEPS - first_step
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(truth_losses[first_step:]), rtol=1e-5, atol=0)
    assert set(state) == set(truth_state)
    for key, expected in truth_state.items():
        if expected.is_floating_point():
            # Per tensor, in norm: Adam turns the rounding noise of near-zero gradients (a rare
            # byte's embedding row) into elementwise differences far above 1e-5 of that element.
            error = (state[key] - expected).norm() / expected.norm().clamp(min=1e-12)
            assert error <= 1e-5, f"{key}: relative difference {error:.2e}"
        else:
            assert torch.equal(state[key], expected), key


def test_local_mode_matches_single(tiny, single):
    root, _, folders = tiny
    results = train(config(root, folders[4], "local", mode="local", schedule="gpipe", step_every=2, recompute="never"))
    assert_same_run(results.loss, checkpoint.merge(root / "local" / "checkpoints")[1], single[2])


def test_three_batches_of_three_micro_batches_a_step_equal_single_bit_for_bit(tmp_path):
    """Each micro-batch's loss is scaled by 1 / (M * step_every) in one multiplication, as mode
    single scales it: the engine multiplied by 1/step_every and then divided by M, two roundings
    that under step_every 3 and 3 micro-batches put the gradients 1 ulp off mode single's (fuzz
    round 2: a ResNet's losses 2e-2 apart after 9 Adam steps; this MLP's weights 9e-4 after 3).
    step_every 2 or 4 micro-batches, powers of two, hid it. (The tiny LM ties its head to its
    embedding, whose gradients add up in another order: not bitwise anyway.)"""
    from ftc.compiler import CompileOptions, compile_model

    from .conftest import EXAMPLES

    folder = compile_model(EXAMPLES / "mlp.py", tmp_path / "gen", CompileOptions(stages=4)).folder
    runs = {}
    for mode in ("single", "local"):
        runs[mode] = train(load_config(data={
            "pipeline": str(folder), "mode": mode, "step_every": 3, "micro_batches": 3, "batch_size": 6, "steps": 3,
            "optimizer": {"name": "adamw", "lr": 0.01}, "data": {"name": "synthetic", "size": 64}, "log_every": 10,
            "checkpoint": {"dir": str(tmp_path / mode)},
        }))  # fmt: skip
    assert runs["local"].loss == runs["single"].loss
    got, want = (checkpoint.merge(tmp_path / mode)[1] for mode in ("local", "single"))
    assert [key for key, value in want.items() if not torch.equal(got[key], value)] == []


def test_epochs_decide_the_steps_on_every_rank(tiny):
    """1 epoch of the byte corpus cut to 1000 bytes: (1000 - 1) // 8 = 124 windows, 16 per step
    (batch 8, step_every 2), so 8 steps; in dist the middle ranks, which read no data, count the
    same steps. The truth: mode single with steps given."""
    root, _, folders = tiny
    data = {"name": "bytes", "max_bytes": 1000}
    truth = train(config(root, folders[2], "steps8", mode="single", step_every=2, steps=8, data=data))
    results = launch(config(root, folders[4], "epochs1", mode="dist", step_every=2, epochs=1, steps=3, data=data))
    assert len(results.loss) == 8 and results.config["steps"] == 8 and results.config["epochs"] == 1
    torch.testing.assert_close(torch.tensor(results.loss), torch.tensor(truth.loss), rtol=1e-5, atol=0)
    with pytest.raises(FtcError, match="key 'epochs' is 0"):
        config(root, folders[2], "epochs0", epochs=0)


def test_a_fraction_of_an_epoch_rounds_up_to_whole_steps(tiny):
    """Half of the 124 windows, 16 per step: 62 / 16 rounds up to 4 steps."""
    root, _, folders = tiny
    data = {"name": "bytes", "max_bytes": 1000}
    results = train(config(root, folders[2], "half", mode="local", step_every=2, epochs=0.5, data=data))
    assert len(results.loss) == 4 and results.config["steps"] == 4 and results.config["epochs"] == 0.5


def test_init_loads_a_state_dict_file_into_the_stages(tiny, single):
    root, model_path, folders = tiny
    weights = root / "init.safetensors"
    checkpoint.save_state_dict(weights, single[1][1])
    cfg = config(root, folders[4], "init", mode="local", steps=1, init=str(weights))
    results = train(cfg)
    model_file = load_model_file(model_path)
    model = model_file.build()
    model.load_state_dict(single[1][1], strict=True)
    dataset = build_dataset(cfg.data, model_file)
    (inputs,), targets = load_batch(dataset, Sampler(len(dataset), 8, cfg.seed).indices(0), True, True)
    expected = [model_file.loss_fn(model(x), y).item() for x, y in zip(inputs.chunk(4), targets.chunk(4))]
    assert results.loss[0] == pytest.approx(sum(expected) / 4, rel=1e-5)


def test_dist_without_a_results_path_prints_the_results(tiny):
    """Rank 0 hands its results over in the launcher's run folder when the config names none."""
    root, _, folders = tiny
    data = config(root, folders[2], "noresults", mode="dist", steps=2).to_json()
    del data["results"], data["checkpoint"]
    path = root / "noresults.json"
    path.write_text(json.dumps(data))
    done = subprocess.run([sys.executable, "-m", "ftc.cli", "train", str(path)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and "final loss" in done.stdout, done.stderr


def test_init_with_a_tied_weight_under_one_name_loads_in_dist_as_in_local(tiny, single):
    """Hugging Face saves one name of a tied pair; in dist the embedding's rank and the head's
    rank each hold their own copy under their own name, and both must find it."""
    root, _, folders = tiny
    for kept, dropped in (("wte.weight", "head.weight"), ("head.weight", "wte.weight")):
        state = {key: value for key, value in single[1][1].items() if key != dropped}
        weights = root / f"init_{kept}.safetensors"
        checkpoint.save_state_dict(weights, state)
        local = train(config(root, folders[2], f"init_local_{kept}", mode="local", steps=2, init=str(weights)))
        cfg = config(root, folders[2], f"init_dist_{kept}", mode="dist", steps=2, init=str(weights))
        done = ftc_train(cfg)
        assert done.returncode == 0, done.stderr
        torch.testing.assert_close(torch.tensor(json.loads(Path(cfg.results).read_text())["loss"]),
                                   torch.tensor(local.loss), rtol=1e-5, atol=0)  # fmt: skip


def test_init_with_a_tied_weight_under_two_names_that_disagree_is_refused_in_every_mode(tiny):
    """A state_dict holding both names of a tied pair with different values: each rank of a dist
    run read its own name (the embedding's rank one value, the head's rank the other) and then
    failed on copies 'built' apart, blaming an unseeded build_model(), while modes single and
    local silently kept one value. Every mode names the checkpoint and the two keys; a
    state_dict whose two names agree, as torch.save(model.state_dict()) writes one, loads."""
    from ftc.runtime.materialize import build_stages
    from ftc.runtime.pipeline import load_pipeline

    root, model_path, folders = tiny
    model_file = load_model_file(model_path)
    state = model_file.build().state_dict()
    agreeing, disagreeing = root / "init_tied_agree.pt", root / "init_tied_disagree.pt"
    torch.save(state, agreeing)
    torch.save({**state, "head.weight": state["head.weight"] + 1}, disagreeing)
    refused = r"holds (wte|head)\.weight and (head|wte)\.weight, which the model ties \(one tensor\), with different values"
    for mode in ("single", "local"):
        with pytest.raises(FtcError, match=refused):
            train(config(root, folders[2], f"init_tied_{mode}", mode=mode, steps=1, init=str(disagreeing),
                         lr_schedule={"name": "constant"}))  # fmt: skip
    pipeline = load_pipeline(folders[2])
    head_rank = [spec.index for spec in pipeline.stages if "head.weight" in spec.state]
    assert head_rank == [1]  # the rank that holds the head alone, as a dist rank builds it
    with pytest.raises(FtcError, match=refused):
        build_stages(model_file, pipeline, head_rank, "cpu", 1, disagreeing)
    head = build_stages(model_file, pipeline, head_rank, "cpu", 1, agreeing)[1]
    assert torch.equal(head.state_dict()["head.weight"], state["wte.weight"])


@pytest.mark.parametrize(
    "pipeline, schedule, step_every, recompute",
    # With the crash-and-resume test below (2 processes, gpipe): 2 and 4 processes, both
    # schedules, with and without step_every and recomputation, and a mixed-pipe partition.
    [("mixed", "1f1b", 2, "always"), (4, "1f1b", 1, "never"), (4, "gpipe", 2, "always")],
)
def test_dist_matches_single(tiny, single, pipeline, schedule, step_every, recompute):
    root, _, folders = tiny
    name = f"dist-{pipeline}-{schedule}-{step_every}-{recompute}"
    settings = dict(mode="dist", schedule=schedule, step_every=step_every, recompute=recompute)
    results = launch(config(root, folders[pipeline], name, **settings))
    assert results.world_size == (2 if pipeline == "mixed" else pipeline)
    assert_same_run(results.loss, checkpoint.merge(root / name / "checkpoints")[1], single[step_every])


def test_clipping_takes_the_norm_of_the_whole_model_across_ranks(tiny):
    """optimizer.clip_grad_norm against torch.nn.utils.clip_grad_norm_ on the single model, after
    accumulating two batches. In 2 processes the tied embedding and head, and the position
    parameter, sit on both ranks and count once in the norm. The max norm lies below every
    step's norm, so every step clips, and SGD's updates follow the clipped gradients' size
    (Adam's would hide a wrong factor)."""
    root, _, folders = tiny
    sgd = {"name": "sgd", "lr": 0.2, "momentum": 0.9, "clip_grad_norm": 0.05}
    settings = dict(optimizer=sgd, schedule="1f1b", step_every=2)
    truth = train(config(root, folders[2], "clip-single", mode="single", **settings))
    truth_state = checkpoint.merge(root / "clip-single" / "checkpoints")[1]
    assert len(truth.grad_norm) == STEPS and min(truth.grad_norm) > 0.05
    unclipped = train(config(root, folders[2], "noclip", mode="single", **{**settings, "optimizer": {**sgd, "clip_grad_norm": None}}))
    assert not unclipped.grad_norm and abs(unclipped.loss[-1] - truth.loss[-1]) > 1e-3  # clipping changes the run
    for name, pipeline, mode in (("clip-local", 4, "local"), ("clip-dist", 2, "dist")):
        cfg = config(root, folders[pipeline], name, mode=mode, **settings)
        results = launch(cfg) if mode == "dist" else train(cfg)
        torch.testing.assert_close(torch.tensor(results.grad_norm), torch.tensor(truth.grad_norm), rtol=1e-5, atol=0)
        assert_same_run(results.loss, checkpoint.merge(root / name / "checkpoints")[1], (truth.loss, truth_state))


def test_evaluation_on_held_out_samples_matches_the_model_in_eval_mode(tiny):
    """eval: every 10 steps and after the last, 2 batches of the last tenth of the byte corpus,
    which training never draws. The truth: the final merged weights loaded into the original
    model in eval mode (BatchNorm by its running statistics) and its loss on those samples.
    Local (4 stages) and dist (2 processes) evaluate as mode single does, and evaluating leaves
    training as it was (the per-step losses are single's)."""
    root, model_path, folders = tiny
    settings = dict(eval={"every": 10, "batches": 2, "fraction": 0.1}, schedule="gpipe")
    single = train(config(root, folders[2], "eval-single", mode="single", **settings))
    assert [step for step, _ in single.eval_loss] == [10, 20]
    cfg = config(root, folders[2], "eval-single", mode="single", **settings)
    model_file = load_model_file(model_path)
    model = model_file.build()
    model.load_state_dict(checkpoint.merge(root / "eval-single" / "checkpoints")[1])
    model.eval()
    dataset = build_dataset(cfg.data, model_file)
    held = round(len(dataset) * 0.1)
    losses = []
    with torch.no_grad():
        for batch in range(2):
            indices = [len(dataset) - held + (batch * 8 + k) % held for k in range(8)]
            (inputs,), targets = load_batch(dataset, indices, True, True)
            losses += [model_file.loss_fn(model(x), y).item() for x, y in zip(inputs.chunk(4), targets.chunk(4))]
    assert single.eval_loss[-1][1] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    for name, pipeline, mode in (("eval-local", 4, "local"), ("eval-dist", 2, "dist")):
        cfg = config(root, folders[pipeline], name, mode=mode, **settings)
        results = launch(cfg) if mode == "dist" else train(cfg)
        assert [step for step, _ in results.eval_loss] == [10, 20]
        torch.testing.assert_close(torch.tensor([loss for _, loss in results.eval_loss]),
                                   torch.tensor([loss for _, loss in single.eval_loss]), rtol=1e-5, atol=0)  # fmt: skip
        torch.testing.assert_close(torch.tensor(results.loss), torch.tensor(single.loss), rtol=1e-5, atol=0)


def ftc_train(cfg, *overrides: str) -> subprocess.CompletedProcess:
    path = Path(cfg.results).parent / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg.to_json()))
    command = [sys.executable, "-m", "ftc.cli", "train", str(path), *(a for o in overrides for a in ("--set", o))]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )


def test_a_dead_rank_stops_the_run_keeps_the_last_checkpoint_and_resume_reproduces_the_run(tiny, single):
    root, model_path, folders = tiny
    cfg = config(root, folders[2], "crash", mode="dist", schedule="gpipe", recompute="never",
                 checkpoint={"dir": str(root / "crash" / "checkpoints"), "every": 5})  # fmt: skip
    failed = ftc_train(cfg, 'inject_fault={"rank": 1, "step": 7, "kind": "exit"}')
    assert failed.returncode != 0
    assert "caused by rank 1:\n  rank 1: died or was stopped at step 7" in failed.stderr, failed.stderr
    merged = root / "crash" / "step5.pt"
    assert cli_main(["merge-checkpoint", str(root / "crash" / "checkpoints"), "-o", str(merged)]) == 0
    model = load_model_file(model_path).build()
    model.load_state_dict(torch.load(merged, weights_only=True), strict=True)
    assert checkpoint.merge(root / "crash" / "checkpoints")[0] == 5

    resumed = ftc_train(cfg, "checkpoint.resume=true")
    assert resumed.returncode == 0, resumed.stderr
    data = json.loads(Path(cfg.results).read_text())
    assert data["first_step"] == 5
    assert_same_run(data["loss"], checkpoint.merge(root / "crash" / "checkpoints")[1], single[1], first_step=5)


def test_a_checkpoint_resumes_with_other_processes_and_another_partition(tiny, single):
    """Weights by key, optimizer state by parameter name: mode single's checkpoint resumes in
    dist (1 rank -> 2), and that run's resumes in local mode on the 4-stage pipeline, each
    continuing the single-process run exactly."""
    root, _, folders = tiny
    folder = root / "across" / "checkpoints"
    every = {"dir": str(folder), "every": 5}
    with pytest.raises(FtcError, match="the loss is nan at step 6"):
        train(config(root, folders[2], "across", mode="single", checkpoint=every, inject_fault={"step": 6, "kind": "nan"}))
    cfg = config(root, folders[2], "across", mode="dist", checkpoint={**every, "resume": True})
    resumed = ftc_train(cfg)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(json.loads(Path(cfg.results).read_text())["loss"], checkpoint.merge(folder)[1], single[1], first_step=5)
    for later in ("step-00000015", "step-00000020"):
        shutil.rmtree(folder / later)
    local = train(config(root, folders[4], "across", mode="local", checkpoint={**every, "resume": True}))
    assert_same_run(local.loss, checkpoint.merge(folder)[1], single[1], first_step=10)


def test_a_hanging_rank_makes_the_others_stop_naming_it(tiny):
    root, _, folders = tiny
    cfg = config(
        root, folders[2], "hang", mode="dist", timeout_s=10, inject_fault={"rank": 1, "step": 3, "kind": "hang"}
    )
    failed = ftc_train(cfg)
    assert failed.returncode != 0
    report = failed.stderr
    # rank 1 is named as the cause, rank 0's error as its consequence
    assert "caused by rank 1:\n  rank 1: died or was stopped at step 3" in report, report
    assert "rank 0: stopped at step 3 because rank 1 failed: rank 0 got nothing from rank 1" in report, report


def test_a_nan_loss_stops_every_rank_naming_the_step(tiny):
    root, _, folders = tiny
    cfg = config(root, folders[2], "nan", mode="dist", inject_fault={"rank": 0, "step": 2, "kind": "nan"})
    failed = ftc_train(cfg)
    assert failed.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank}: failed at step 2: the loss is nan at step 2" in failed.stderr, failed.stderr


ZERO_AT_SAMPLE = """
import torch
import torch.nn as nn
import torch.nn.functional as F

ZERO = {zero}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.scale = nn.Parameter(torch.ones(1))
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        # sqrt(s^2 x^2) is |s x|, whose derivative in s is 0/0 where x is 0: NaN, the loss finite
        return self.b(torch.tanh(self.a(x)) + torch.sqrt((self.scale * x[:, :1]) ** 2))


def build_model():
    return Net()


def example_inputs(batch_size):
    x = torch.randn(batch_size, 4)
    x[[i for i in ZERO if i < batch_size], 0] = 0.0
    return (x,)


def loss_fn(output, target):
    return F.mse_loss(output, target)
"""


def test_nan_gradients_under_a_finite_loss_stop_the_run_before_the_weights_take_them(tmp_path):
    """Step 3 draws the one sample whose gradient is NaN: the run stops there naming the
    parameter, and the checkpoint of step 2 is the latest, equal to a 2-step single-process
    run's (the optimizer stepped NaN into every weight, step 3's checkpoint kept them, and the
    run stopped only at step 4's loss, blaming the learning rate)."""
    from ftc.compiler import CompileOptions, compile_model

    zero = [int(Sampler(64, 8, seed=1).indices(2)[0])]
    model = tmp_path / "zero_at_sample.py"
    model.write_text(ZERO_AT_SAMPLE.format(zero=zero))
    pipeline = compile_model(model, tmp_path / "p2", CompileOptions(stages=2)).folder

    def run_config(name: str, **settings):
        return config(tmp_path, pipeline, name, **{"data": {"name": "synthetic", "size": 64}, "steps": 4,
                      "checkpoint": {"dir": str(tmp_path / name / "checkpoints"), "every": 1}, **settings})  # fmt: skip

    failed = ftc_train(run_config("dist", mode="dist"))
    assert failed.returncode == 2, failed.stderr
    assert "failed at step 3: the gradients of 1 parameter(s) (scale) hold NaN or inf at step 3" in failed.stderr, failed.stderr
    folder = tmp_path / "dist" / "checkpoints"
    assert checkpoint.latest(folder) == checkpoint.step_folder(folder, 2)
    train(run_config("single", mode="single", steps=2))
    weights, truth = checkpoint.merge(folder)[1], checkpoint.merge(tmp_path / "single" / "checkpoints")[1]
    assert weights.keys() == truth.keys()
    for key in truth:
        torch.testing.assert_close(weights[key], truth[key], rtol=1e-5, atol=0)


STALLS_IN_EVAL = """
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class StallInEval(nn.Module):
    def forward(self, x):
        if not self.training:
            time.sleep(3600)
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stall = StallInEval()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 2)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(self.stall(x))))))


LEAF_MODULES = (StallInEval,)


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 4),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
"""


def test_a_rank_that_hangs_while_evaluating_is_named_with_the_evaluation_not_a_batch_never_trained(tmp_path):
    """Rank 0 hangs in the evaluation after step 1 of a 1-step run; rank 1's error named
    "micro-batch 0 of batch 2", a batch training never reached."""
    from ftc.compiler import CompileOptions, compile_model

    model = tmp_path / "stalls_in_eval.py"
    model.write_text(STALLS_IN_EVAL)
    pipeline = compile_model(model, tmp_path / "p2", CompileOptions(stages=2)).folder
    cfg = config(tmp_path, pipeline, "eval-hang", mode="dist", data={"name": "synthetic", "size": 64}, steps=1,
                 timeout_s=5, eval={"every": 1, "batches": 1, "fraction": 0.25}, lr_schedule={}, checkpoint={})  # fmt: skip
    failed = ftc_train(cfg)
    assert failed.returncode == 2, failed.stderr
    assert "caused by rank 0:\n  rank 0: died or was stopped at step 1" in failed.stderr, failed.stderr
    assert re.search(r"rank 1: stopped at step 1 because rank 0 failed: rank 1 got nothing from rank 0 \(value \w+, "
                     r"micro-batch 0 of a held-out batch, evaluating after step 1\) within 5 s", failed.stderr), failed.stderr  # fmt: skip


def start_dist_run(cfg, steps_logged: int = 1) -> subprocess.Popen:
    """`ftc train` on `cfg` in a process group of its own (as a terminal's job), returned once
    `steps_logged` steps are logged."""
    path = Path(cfg.results).parent / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg.to_json()))
    command = [sys.executable, "-m", "ftc.cli", "train", str(path)]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)  # fmt: skip
    for line in launcher.stdout:
        steps_logged -= line.startswith("step")
        if not steps_logged:
            break
    return launcher


def assert_no_process_left(cfg) -> None:
    # torchrun and its workers carry the results path on their command lines
    running = subprocess.run(["pgrep", "-f", f"results={cfg.results}"], capture_output=True, text=True).stdout.split()
    assert running == [], f"processes of the stopped run still running: {running}"


def test_stopping_the_launcher_stops_every_rank_and_says_so(tiny):
    """SIGTERM to `ftc train` (as a job scheduler sends) reaches torchrun, which stops the ranks;
    the launcher names the signal and the step, exits with 128 + 15, and no process trains on
    unwatched."""
    root, _, folders = tiny
    cfg = config(root, folders[2], "stopped", mode="dist", steps=10**6, log_every=1)
    launcher = start_dist_run(cfg)
    launcher.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 128 + signal.SIGTERM, err
    assert err.startswith("ftc train: stopped by SIGTERM at step "), err
    assert "(the launcher passed SIGTERM on to torchrun, which stopped every rank)" in err, err
    assert "no checkpoint was complete in" in err
    assert_no_process_left(cfg)


def test_ctrl_c_while_checkpoints_are_written_exits_130_naming_a_complete_checkpoint(tiny):
    """Ctrl-C (SIGINT to the whole process group: launcher, torchrun and every rank) in mode dist
    exits with 130, as in mode local, and names the checkpoint to resume from. With a checkpoint
    every step, the ranks are often writing one when it comes: whatever step they were at, the
    step named is complete, no half-written one is left, merge-checkpoint takes that step, and a
    run resumes from it. The ranks stop quietly (no KeyboardInterrupt traceback)."""
    root, _, folders = tiny
    folder = root / "ctrl-c" / "checkpoints"
    cfg = config(root, folders[2], "ctrl-c", mode="dist", steps=10**6, log_every=1,
                 checkpoint={"dir": str(folder), "every": 1, "keep": 2})  # fmt: skip
    launcher = start_dist_run(cfg, steps_logged=3)  # after step 2's checkpoint, which comes before step 3
    os.killpg(launcher.pid, signal.SIGINT)
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 130, err
    named = re.fullmatch(r"ftc train: interrupted at step (\d+) \(the launcher passed SIGINT on to torchrun, which "
                         r"stopped every rank\); the latest complete checkpoint is (\S+): resume with --set "
                         r"checkpoint.resume=true\n", err)  # fmt: skip
    assert named, err
    step = checkpoint.manifest(Path(named[2]))["step"]
    assert Path(named[2]) == checkpoint.step_folder(folder, step) and step <= int(named[1])
    assert checkpoint.complete_steps(folder)[-1] == Path(named[2]) and checkpoint.damaged_steps(folder) == {}
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # nothing half-written is left
    assert cli_main(["merge-checkpoint", str(folder), "-o", str(root / "ctrl-c" / "merged.pt")]) == 0
    assert torch.load(root / "ctrl-c" / "merged.pt", weights_only=True).keys() == checkpoint.merge(folder)[1].keys()
    assert_no_process_left(cfg)
    resumed = train(config(root, folders[2], "ctrl-c", mode="local", steps=step + 1,
                           checkpoint={"dir": str(folder), "resume": True}))  # fmt: skip
    assert resumed.first_step == step and len(resumed.loss) == 1


def rank_pid(cfg, rank: int) -> int:
    """The process of rank `rank` of the run of `cfg` (torchrun sets RANK in its environment)."""
    for pid in subprocess.run(["pgrep", "-f", f"results={cfg.results}"], capture_output=True, text=True).stdout.split():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"ftc.runtime.worker" in command and f"RANK={rank}".encode() in environment:
            return int(pid)
    raise AssertionError(f"no process of rank {rank} is running")


def test_a_frozen_rank_ends_the_run_soon_after_the_others_time_out(tiny):
    """A rank frozen by SIGSTOP (a stalled machine) takes no SIGTERM: torchrun waited its 30 s
    before SIGKILL, so the run ended 30 s after the other rank's timeout instead of at once."""
    root, _, folders = tiny
    cfg = config(root, folders[2], "frozen", mode="dist", steps=10**6, log_every=1, timeout_s=5)
    launcher = start_dist_run(cfg)
    os.kill(rank_pid(cfg, 1), signal.SIGSTOP)
    frozen = time.monotonic()
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 2, err
    assert re.search(r"caused by rank 1:\n  rank 1: died or was stopped at step \d+", err), err
    assert re.search(r"rank 0: stopped at step \d+ because rank 1 failed: rank 0 got nothing from rank 1", err), err
    assert time.monotonic() - frozen < 5 + 15, err  # timeout_s, then torchrun's wait before SIGKILL
    assert_no_process_left(cfg)


TORCHRUN_ABORT_LOG = """terminate called without an active exception
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : -6 (pid: 4242)  (SIGABRT)
"""


def fake_torchrun(monkeypatch, states: list[str], results: dict | None):
    """Replace torchrun with a run whose ranks end in `states` and whose rank 1 then aborts,
    as a gloo process can while shutting down."""
    import ftc.runtime.worker as worker

    def run(command, env, stderr):  # runs torchrun to its end: (exit code, stopping signal)
        status_dir = Path(env["FTC_STATUS_DIR"])
        for rank, state in enumerate(states):
            checkpoint.write_json(
                status_dir / f"rank-{rank}.json", {"rank": rank, "state": state, "step": 3, "error": None}
            )
        if results is not None:
            checkpoint.write_json(Path(command[command.index("--set") + 1].partition("=")[2]), results)
        stderr.write(TORCHRUN_ABORT_LOG)
        return 1, None

    monkeypatch.setattr(worker, "_run_torchrun", run)


def test_a_rank_that_aborts_after_finishing_keeps_the_run_with_a_warning(tiny, monkeypatch, capsys):
    root, _, folders = tiny
    cfg = config(root, folders[2], "abort-at-exit", mode="dist", steps=3)
    written = {"config": cfg.to_json(), "mode": "dist", "world_size": 2, "first_step": 0, "loss": [5.0, 4.0, 3.0],
               "lr": [0.1] * 3, "samples_per_s": 10.0, "wall_time_s": 1.0, "checkpoint": None, "plot": None,
               "peak_memory_bytes": None}  # fmt: skip
    fake_torchrun(monkeypatch, ["done", "done"], written)
    results = launch(cfg)
    assert results.loss == [5.0, 4.0, 3.0]
    err = capsys.readouterr().err
    assert "warning: every rank finished" in err
    assert "rank 1: finished training, then its process failed while shutting down" in err, err


def test_a_lost_peers_reason_leaves_out_gloos_advice_in_either_wording():
    """gloo's error for a peer whose connection closed, as ranks of dist runs got it: the report
    kept the second wording's advice (a remote worker hanging or bugs ... GLHF!) whole."""
    reset = "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:4492: Connection reset by peer."
    for advice in (" This is typically caused by a remote worker crashing.",
                   " This is typically caused by a remote worker hanging or bugs in the application. Check the logs of "
                   "the remote worker before reporting an error. GLHF! \U0001f3d6\ufe0f"):  # fmt: skip
        assert peer_reason(RuntimeError(reset + advice)) == reset


def test_the_report_leads_with_the_rank_whose_own_error_stopped_the_run():
    """torchrun may see the rank that lost its peer fail first; the report still leads with the
    rank that raised, and keeps every line of its error."""
    log = TORCHRUN_ABORT_LOG.replace("rank      : 1 (local_rank: 1)", "rank      : 0 (local_rank: 0)")
    states = [
        {"rank": 0, "state": "failed", "step": 4, "error": "rank 0 got nothing from rank 1: that rank died",
         "caused_by_peer": True},
        {"rank": 1, "state": "failed", "step": 4, "error": "stage 1 raised ValueError: bad value\n    detail",
         "caused_by_peer": False},
    ]  # fmt: skip
    assert _failure_report(states, 1, log).splitlines() == [
        "training failed (torchrun exited with 1), caused by rank 1:",
        "  rank 1: failed at step 4: stage 1 raised ValueError: bad value",
        "      detail",
        "  rank 0: stopped at step 4 because rank 1 failed: rank 0 got nothing from rank 1: that rank died",
    ]


def test_of_several_ranks_without_an_error_the_one_torchrun_saw_fail_first_is_the_cause():
    """Rank 0 exited at step 3 (fuzz round 2, inject_fault kind exit); torchrun then stopped ranks
    2 and 3, which left the state of a dead rank too, and the report read "caused by ranks 0, 2,
    3", the peer's line "because ranks 0, 2, 3 failed"."""
    log = TORCHRUN_ABORT_LOG.replace("rank      : 1 (local_rank: 1)", "rank      : 0 (local_rank: 0)").replace(
        "exitcode  : -6 (pid: 4242)  (SIGABRT)", "exitcode  : 3 (pid: 4242)")
    states = [{"rank": r, "state": "running", "step": 3, "error": None} for r in range(4)]
    states[1] = {"rank": 1, "state": "failed", "step": 3, "error": "rank 1 got nothing from rank 0: that rank died",
                 "caused_by_peer": True}  # fmt: skip
    assert _failure_report(states, 1, log).splitlines() == [
        "training failed (torchrun exited with 1), caused by rank 0:",
        "  rank 0: died or was stopped at step 3 without an error of its own",
        "  rank 1: stopped at step 3 because rank 0 failed: rank 1 got nothing from rank 0: that rank died",
        "  rank 2: stopped at step 3, after rank 0 failed",
        "  rank 3: stopped at step 3, after rank 0 failed",
        "  torchrun saw rank 0 fail first (exit code 3)",
    ]
    # without torchrun's word, every silent rank stays a suspect
    assert _failure_report(states, 1, "").splitlines()[0].endswith("caused by ranks 0, 2, 3:")


def test_on_a_machine_whose_ranks_only_lost_a_peer_the_report_points_to_the_other_machine():
    """2 machines x 2 ranks, rank 2 died: the report of the machine with ranks 0 and 1 named no
    cause and read "rank 0 ... that rank died" for rank 1, which had only lost rank 2."""
    states = [
        {"rank": 0, "state": "failed", "step": 4, "error": "rank 0 got nothing from rank 1: that rank died",
         "caused_by_peer": True},
        {"rank": 1, "state": "failed", "step": 4, "error": "rank 1 got nothing from rank 2: that rank died",
         "caused_by_peer": True},
        None,
        None,
    ]  # fmt: skip
    assert _failure_report(states, 1, "", several_machines=True).splitlines() == [
        "training failed (torchrun exited with 1), caused by a rank of another machine (ranks 2, 3 ran elsewhere: "
        "`ftc train` there reports them):",
        "  rank 0: stopped at step 4 because a peer failed: rank 0 got nothing from rank 1: that rank died",
        "  rank 1: stopped at step 4 because a peer failed: rank 1 got nothing from rank 2: that rank died",
        "  rank 2: left no status here (it never started, or ran on another machine)",
        "  rank 3: left no status here (it never started, or ran on another machine)",
    ]


def test_a_rank_that_aborts_before_finishing_fails_the_run(tiny, monkeypatch):
    root, _, folders = tiny
    cfg = config(root, folders[2], "abort-midway", mode="dist", steps=3)
    fake_torchrun(monkeypatch, ["done", "running"], None)
    with pytest.raises(FtcError) as failure:
        launch(cfg)
    assert "torchrun saw rank 1 fail first (exit code -6)" in failure.value.message
    assert "rank 1: died or was stopped at step 3" in failure.value.message


def test_the_ranks_name_the_config_as_the_launcher_got_it(tiny, monkeypatch):
    """The ranks read the config from a copy in the run folder; their messages (a warning, an
    error naming a key) named that copy, /tmp/ftc-train-.../config.json, with the launcher's own
    --set, instead of the user's file and --set."""
    import ftc.runtime.worker as worker

    root, _, folders = tiny
    cfg = config(root, folders[2], "source", mode="dist", steps=3)
    commands = []
    monkeypatch.setattr(worker, "_run_torchrun", lambda command, env, stderr: (commands.append(command), (1, None))[1])
    with pytest.raises(FtcError):
        launch(cfg)
    ranks = worker.rank_config(worker.parse_arguments(commands[0][commands[0].index("ftc.runtime.worker") + 1 :]))
    assert ranks.source == cfg.source == "<dict>" and ranks.mode == "dist" and ranks.steps == 3
