"""Schedule "async" (PipeDream-style, weight stashing, flushes every staleness.flush_every steps)
against an independent reference.

The truth is tests/async_reference.py: the async semantics written out in plain PyTorch on the
ORIGINAL model (torch.func.functional_call with each parameter name taken from the weight version
its stage sees for each micro-batch, in the global 1F1B order), sharing no code with ftc's
engine, stages or staleness module. The models are dropout-free, BatchNorm-free tiny language
models compiled into 2 and 4 stages: one with no parameter shared between stages, and the same
with its LM head tied to its embedding (`self.head.weight = self.wte.weight`), whose two names
sit in the first and the last stage, also placed mixed-pipe (stages on devices [0, 1, 1, 0]).

What is checked against what:
- the reference itself: with flush_every 1 nothing is stale, so it must train exactly as mode
  single (losses and final weights to a relative 1e-5), tied or not; the weight version it gives
  each (stage, micro-batch) must be the one a stage running micro-batches in 1F1B order (a stage
  of depth d forwards g right after its backward of g - d, and updates after the backward of a
  step's last micro-batch) has at that forward, simulated op by op; for the tied weight, the
  version each holder sees must count the updates applied before its forward in the global
  order (after the last holder's backward of the step's last micro-batch), which puts the head's
  stage between the embedding's stage and its own other weights; and with flush_every > 1 it
  must differ from mode single (it is stale).
- mode local (2 and 4 stages) and mode dist (4 processes, torchrun, gloo) against the reference:
  per-step losses (results.loss) and the merged final checkpoint, to a relative 1e-5; adamw and
  SGD with nesterov momentum, cosine lr with warmup, step_every 1 and 2, micro-batches per step
  below and above the pipeline depth, segments of unequal length (12 steps, flush_every 5); and
  each run's losses must differ from mode single's by more than 1e-4 (staleness happened). The
  same for the tied model (local 2 and 4 stages and mixed-pipe, dist 4 stages and mixed-pipe),
  whose merged checkpoint must also hold wte.weight == head.weight exactly.
- checkpoint.every 6 of 12 steps: the run flushes there (the reference's segments end there
  too), the checkpoint at step 6 holds the reference's weights after step 6, and a run stopped
  at step 8 (injected NaN) and resumed (in dist) continues the uninterrupted reference exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ftc.ir import FtcError
from ftc.runtime import checkpoint
from ftc.runtime.config import load_config
from ftc.runtime.pipeline import load_pipeline
from ftc.runtime.schedule import BACKWARD, FORWARD, Action
from ftc.runtime.train import train
from ftc.runtime.worker import launch

from .async_reference import async_reference, global_order, segment_ends, stage_parameters
from .conftest import ROOT

GENERATED = ROOT / "generated"

STEPS = 12
OPTIMIZERS = {
    "adamw": {"name": "adamw", "lr": 0.01, "weight_decay": 0.01},
    "sgd": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
}
UNTIED_LM = """
import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, CONTEXT, WIDTH, LAYERS = 256, 8, 16, 4


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(WIDTH)
        self.fc = nn.Linear(WIDTH, 2 * WIDTH)
        self.proj = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x):
        return x + self.proj(F.gelu(self.fc(self.ln(x))))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, WIDTH)
        nn.init.normal_(self.wte.weight, std=0.1)
        self.wpe = nn.Parameter(0.02 * torch.randn(1, CONTEXT, WIDTH))
        self.blocks = nn.ModuleList([Block() for _ in range(LAYERS)])
        self.ln = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def build_model():
    return TinyLM()


def example_inputs(batch_size):
    return (torch.randint(0, VOCAB, (batch_size, CONTEXT)),)


def loss_fn(output, target):
    return F.cross_entropy(output.reshape(-1, VOCAB), target.reshape(-1))
"""
TIE = "        self.head.weight = self.wte.weight\n"
TIED_LM = UNTIED_LM.replace("bias=False)\n", "bias=False)\n" + TIE, 1)
assert TIE in TIED_LM


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """The model compiled into 2 and 4 stages -> (root, model path, {stages: folder})."""
    from ftc.compiler import CompileOptions, compile_model

    root = tmp_path_factory.mktemp("async")
    model = root / "untied_lm.py"
    model.write_text(UNTIED_LM)
    folders = {p: compile_model(model, root / f"p{p}", CompileOptions(stages=p)).folder for p in (2, 4)}
    return root, model, folders


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """The tied model compiled into 2 and 4 stages, and a mixed-pipe copy of the 4-stage
    pipeline (stages on devices [0, 1, 1, 0]: the embedding's and the head's stages share device
    0) -> (root, model path, {2, 4, "mixed": folder})."""
    from ftc.compiler import CompileOptions, compile_model

    root = tmp_path_factory.mktemp("async-tied")
    model = root / "tied_lm.py"
    model.write_text(TIED_LM)
    folders = {p: compile_model(model, root / f"p{p}", CompileOptions(stages=p)).folder for p in (2, 4)}
    mixed = root / "mixed" / folders[4].name
    shutil.copytree(folders[4], mixed)
    manifest = json.loads((mixed / "pipeline.json").read_text())
    for stage, device in zip(manifest["stages"], [0, 1, 1, 0]):
        stage["device"] = device
    manifest["num_devices"] = 2
    (mixed / "pipeline.json").write_text(json.dumps(manifest))
    folders["mixed"] = mixed
    return root, model, folders


def config(root: Path, pipeline: Path, name: str, **settings):
    data = {
        "pipeline": str(pipeline), "data": {"name": "bytes", "max_bytes": 20000}, "optimizer": OPTIMIZERS["adamw"],
        "lr_schedule": {"name": "cosine", "warmup_steps": 3}, "batch_size": 8, "micro_batches": 4,
        "steps": STEPS, "seed": 1, "log_every": 10, "timeout_s": 30,
        "results": str(root / name / "results.json"), "checkpoint": {"dir": str(root / name / "checkpoints")},
    }  # fmt: skip
    data.update(settings)
    return load_config(data=data)


def single_run(root: Path, pipeline: Path, name: str, **settings) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Mode single (synchronous, no pipeline) with these settings -> (losses, final state_dict)."""
    settings = {k: v for k, v in settings.items() if k not in ("schedule", "staleness", "mode")}
    results = train(config(root, pipeline, name, mode="single", **settings))
    return results.loss, checkpoint.merge(root / name / "checkpoints")[1]


def assert_same_run(losses, state, truth_losses, truth_state, first_step=0):
    """As tests/test_train.py's: losses and weights to a relative 1e-5 (weights per tensor, in
    norm: Adam turns the rounding noise of near-zero gradients into large elementwise
    differences)."""
    assert len(losses) == STEPS - first_step
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(truth_losses[first_step:]), rtol=1e-5, atol=0)
    assert set(state) == set(truth_state)
    for key, expected in truth_state.items():
        if expected.is_floating_point():
            error = (state[key] - expected).norm() / expected.norm().clamp(min=1e-12)
            assert error <= 1e-5, f"{key}: relative difference {error:.2e}"
        else:
            assert torch.equal(state[key], expected), key


def max_relative_difference(losses, others) -> float:
    a, b = torch.tensor(losses, dtype=torch.float64), torch.tensor(others, dtype=torch.float64)
    return ((a - b).abs() / b.abs()).max().item()


def test_the_model_shares_no_parameter_between_stages(untied):
    _, _, folders = untied
    for stages, folder in folders.items():
        manifest = json.loads((folder / "pipeline.json").read_text())
        assert len(manifest["stages"]) == stages and manifest["tied"] in ([], {})
        keys = [key for stage in manifest["stages"] for key in stage["state"]]
        assert len(keys) == len(set(keys)), f"{stages} stages: a key is in two stages"
        assert {stage["device"] for stage in manifest["stages"]} == set(range(stages))


@pytest.mark.parametrize("step_every, optimizer", [(1, "adamw"), (2, "sgd")])
def test_reference_without_staleness_is_mode_single(untied, step_every, optimizer):
    """flush_every 1: every segment is one step, so no forward sees weights behind its step."""
    root, model, folders = untied
    settings = dict(step_every=step_every, optimizer=OPTIMIZERS[optimizer])
    truth = single_run(root, folders[4], f"ref-single-{step_every}", **settings)
    cfg = config(root, folders[4], "unused", mode="local", schedule="async", staleness={"flush_every": 1}, **settings)
    run = async_reference(cfg, model)
    assert run.stale_forwards == 0
    assert_same_run(run.losses, run.state, *truth)
    # and the same settings with flushes every 4 steps are stale: 3 of every 4 steps, stages of
    # depth 4, 3, 2, 1 run 3 + 2 + 1 + 0 of the step's forwards on the previous weights
    stale = async_reference(config(root, folders[4], "unused", mode="local", schedule="async",
                                   staleness={"flush_every": 4}, **settings), model)  # fmt: skip
    assert stale.stale_forwards == 3 * 3 * 6
    assert max_relative_difference(stale.losses, truth[0]) > 1e-4


def test_reference_draws_the_synthetic_targets_training_draws(tmp_path):
    """The mlp example has no example_targets: its synthetic targets are class indices, as
    training makes them for cross-entropy, so the reference trains on the same data as mode
    single (it once drew uniform numbers shaped like the logits, losses 5x apart)."""
    settings = dict(data={"name": "synthetic", "size": 64}, step_every=1)
    truth = single_run(tmp_path, GENERATED / "mlp", "mlp-single", **settings)
    cfg = config(tmp_path, GENERATED / "mlp", "unused", mode="local", schedule="async", staleness={"flush_every": 1},
                 **settings)  # fmt: skip
    run = async_reference(cfg)
    assert_same_run(run.losses, run.state, *truth)


def one_f_one_b_versions(depth: int, micro_batches: int, per_step: int, first_step: int) -> list[int]:
    """A stage of depth `depth` running a segment's micro-batches in 1F1B order (`depth`
    forwards, then each backward followed by the next forward), updating after the backward of
    each step's last micro-batch: the version (updates done) at each forward, by micro-batch."""
    versions, updates = {}, first_step
    for g in range(min(depth, micro_batches)):
        versions[g] = updates
    for k in range(micro_batches):
        if k % per_step == per_step - 1:  # backward of a step's last micro-batch, then the update
            updates += 1
        if k + depth < micro_batches:
            versions[k + depth] = updates
    return [versions[g] for g in range(micro_batches)]


@pytest.mark.parametrize("micro_batches, step_every, flush_every, lag", [(2, 1, 3, 2), (4, 2, 5, 1), (1, 1, 4, 3)])
def test_reference_versions_follow_1f1b_order(untied, micro_batches, step_every, flush_every, lag):
    """The reference's closed form max(0, (g - d + 1) // Mt) against the 1F1B op order, with Mt
    below the depth (up to 2 and 3 updates behind) and above it."""
    root, model, folders = untied
    cfg = config(root, folders[4], "unused", mode="local", schedule="async", steps=7, micro_batches=micro_batches,
                 step_every=step_every, staleness={"flush_every": flush_every})  # fmt: skip
    run = async_reference(cfg, model)
    per_step = micro_batches * step_every
    expected, lags, first = [], [], 0
    for end in segment_ends(cfg):
        n = (end - first) * per_step
        by_stage = {stage: one_f_one_b_versions(4 - stage, n, per_step, first) for stage in range(4)}
        for g in range(n):
            expected.append({stage: by_stage[stage][g] for stage in range(4)})
            lags.append([first + g // per_step - by_stage[stage][g] for stage in range(4)])
        first = end
    assert run.versions_used == expected
    # the first stage (depth 4) falls `lag` updates behind at most; the last (depth 1) never
    assert max(lag_ for lags_ in lags for lag_ in lags_) == max(row[0] for row in lags) == lag
    assert all(row[3] == 0 for row in lags)


def test_segments_end_at_flushes_checkpoints_and_the_end(untied):
    root, _, folders = untied
    cfg = config(root, folders[2], "unused", mode="local", schedule="async", staleness={"flush_every": 4},
                 checkpoint={"dir": str(root / "unused"), "every": 6})  # fmt: skip
    assert segment_ends(cfg) == [4, 6, 8, 12]
    assert segment_ends(cfg, first_step=6) == [8, 12]
    uneven = config(root, folders[2], "unused", schedule="async", staleness={"flush_every": 5})
    assert segment_ends(uneven) == [5, 10, 12]
    assert stage_parameters(folders[2], ["wte.weight", "head.weight"]) == [["wte.weight"], ["head.weight"]]


# mode, stages, step_every, micro_batches, optimizer, flush_every
CASES = [
    ("local", 2, 1, 4, "adamw", 4),
    ("local", 2, 2, 4, "sgd", 5),  # segments of 5, 5 and 2 steps
    ("local", 4, 1, 2, "adamw", 4),  # 2 micro-batches a step, depth 4: up to 2 updates behind
    ("dist", 4, 2, 4, "adamw", 4),
    ("dist", 4, 1, 2, "sgd", 5),
]


@pytest.mark.parametrize("mode, stages, step_every, micro_batches, optimizer, flush_every", CASES)
def test_async_matches_the_reference(untied, mode, stages, step_every, micro_batches, optimizer, flush_every):
    root, model, folders = untied
    name = f"async-{mode}-{stages}-{step_every}-{micro_batches}-{optimizer}-{flush_every}"
    settings = dict(step_every=step_every, micro_batches=micro_batches, optimizer=OPTIMIZERS[optimizer])
    cfg = config(root, folders[stages], name, mode=mode, schedule="async", staleness={"flush_every": flush_every},
                 **settings)  # fmt: skip
    truth = async_reference(cfg, model)
    assert truth.stale_forwards > 0
    results = launch(cfg) if mode == "dist" else train(cfg)
    if mode == "dist":
        assert results.world_size == stages
    assert_same_run(results.loss, checkpoint.merge(root / name / "checkpoints")[1], truth.losses, truth.state)
    synchronous, _ = single_run(root, folders[stages], f"{name}-single", **settings)
    difference = max_relative_difference(results.loss, synchronous)
    assert difference > 1e-4, f"the async run's losses are within {difference:.1e} of mode single's: nothing was stale"


def test_a_checkpoint_flushes_and_resuming_continues_the_reference(untied):
    """Checkpoints every 6 of 12 steps, flushes every 4: segments [0, 4), [4, 6), [6, 8), [8, 12).
    A local run gets NaN weights at step 8, inside the segment [6, 8), and must stop naming step
    8 (an injected fault starts a segment), after the checkpoint at step 6; resumed in dist, it
    must continue the uninterrupted reference exactly."""
    root, model, folders = untied
    folder = root / "async-resume" / "checkpoints"
    settings = dict(schedule="async", staleness={"flush_every": 4}, checkpoint={"dir": str(folder), "every": 6})
    truth = async_reference(config(root, folders[4], "async-resume", mode="local", **settings), model)
    assert sorted(truth.segment_states) == [4, 6, 8, 12]
    with pytest.raises(FtcError, match="the loss is nan at step 8"):
        train(config(root, folders[4], "async-resume", mode="local", inject_fault={"step": 8, "kind": "nan"},
                     **settings))  # fmt: skip
    step, saved = checkpoint.merge(folder)
    assert step == 6
    for key, expected in truth.segment_states[6].items():
        error = (saved[key] - expected).norm() / expected.norm().clamp(min=1e-12)
        assert error <= 1e-5, f"the checkpoint at step 6, {key}: relative difference {error:.2e}"

    settings["checkpoint"] = {**settings["checkpoint"], "resume": True}
    results = launch(config(root, folders[4], "async-resume", mode="dist", **settings))
    assert results.first_step == 6
    assert_same_run(results.loss, checkpoint.merge(folder)[1], truth.losses, truth.state, first_step=6)
    assert [p.name for p in sorted(folder.glob("step-*"))] == ["step-00000006", "step-00000012"]


# The tied model: wte.weight (the first stage) and head.weight (the last) are one parameter.
TIED_NAMES = ("wte.weight", "head.weight")


def test_the_tied_model_shares_its_embedding_between_the_first_and_last_stage(tied):
    _, _, folders = tied
    for key, folder in folders.items():
        manifest = json.loads((folder / "pipeline.json").read_text())
        assert manifest["tied"] in ([list(TIED_NAMES)], [list(reversed(TIED_NAMES))]), key
        stages = sorted(manifest["stages"], key=lambda stage: stage["index"])
        assert "wte.weight" in stages[0]["state"] and "head.weight" in stages[-1]["state"], key
        names = [name for stage in stages for name in stage["state"]]
        assert len(names) == len(set(names)), f"{key}: a name is in two stages"
        held = stage_parameters(folder, list(TIED_NAMES))
        assert held[0] == ["wte.weight"] and held[-1] == ["head.weight"], key
    assert [stage.device for stage in load_pipeline(folders["mixed"]).stages] == [0, 1, 1, 0]
    assert load_pipeline(folders["mixed"]).num_devices == 2


def tied_key(folder: Path) -> str:
    """The tied weight's canonical key: the first name of its pipeline.json "tied" group."""
    return json.loads((folder / "pipeline.json").read_text())["tied"][0][0]


def holders_agree(run) -> bool:
    """Whether the stages holding the tied weight ran every micro-batch on the same version of it."""
    return all(len(set(used.values())) == 1 for used in run.shared_versions_used)


@pytest.mark.parametrize("step_every, optimizer", [(1, "adamw"), (2, "sgd")])
def test_tied_reference_without_staleness_is_mode_single(tied, step_every, optimizer):
    """flush_every 1: the tied weight too is at its step's version in both its stages, so the
    run is mode single's (which sums the gradients of both uses of one tensor)."""
    root, model, folders = tied
    settings = dict(step_every=step_every, optimizer=OPTIMIZERS[optimizer])
    truth = single_run(root, folders[4], f"tied-ref-single-{step_every}", **settings)
    run = async_reference(config(root, folders[4], "unused", mode="local", schedule="async",
                                 staleness={"flush_every": 1}, **settings), model)  # fmt: skip
    assert run.stale_forwards == 0 and holders_agree(run)
    key = tied_key(folders[4])
    assert all(used.keys() == {(0, key), (3, key)} for used in run.shared_versions_used)
    assert_same_run(run.losses, run.state, *truth)
    assert torch.equal(run.state["wte.weight"], run.state["head.weight"])
    stale = async_reference(config(root, folders[4], "unused", mode="local", schedule="async",
                                   staleness={"flush_every": 4}, **settings), model)  # fmt: skip
    assert stale.stale_forwards > 0 and not holders_agree(stale)
    assert torch.equal(stale.state["wte.weight"], stale.state["head.weight"])
    assert max_relative_difference(stale.losses, truth[0]) > 1e-4


@pytest.mark.parametrize(
    "folder, micro_batches, step_every, flush_every", [(4, 2, 1, 3), (4, 4, 2, 5), ("mixed", 2, 1, 3), (2, 1, 1, 4)]
)
def test_tied_reference_versions_follow_the_global_order(tied, folder, micro_batches, step_every, flush_every):
    """Each stage's version at each forward, counted from the segment's global order: its own
    parameters have the updates applied after its backwards of the steps' last micro-batches
    before that forward; the tied weight those applied after the LATER of the two holders'
    backwards (the embedding's stage's). So the embedding's stage sees the tied weight as its own
    other weights, and the head's stage sees it no older than the embedding's stage does for the
    same micro-batch (it forwards it later) and no newer than its own other weights: strictly
    between, for some micro-batches."""
    root, model, folders = tied
    cfg = config(root, folders[folder], "unused", mode="local", schedule="async", steps=7, micro_batches=micro_batches,
                 step_every=step_every, staleness={"flush_every": flush_every})  # fmt: skip
    run = async_reference(cfg, model)
    pipeline = load_pipeline(folders[folder])
    last_stage = pipeline.stages[-1].index
    key = tied_key(folders[folder])
    per_step = micro_batches * step_every
    own, shared, first = [], [], 0
    for end in segment_ends(cfg):
        n = (end - first) * per_step
        order = global_order(pipeline, cfg, n)
        assert len(order) == len(set(order)) == 2 * n * len(pipeline.stages)
        at = {action: q for q, action in enumerate(order)}
        # the position of each step's update of the parameters held by these stages
        due = lambda stages: [max(at[Action(BACKWARD, s, (k + 1) * per_step - 1)] for s in stages)  # noqa: E731
                              for k in range(end - first)]  # fmt: skip
        own_due = {s.index: due([s.index]) for s in pipeline.stages}
        shared_due = due([0, last_stage])
        for g in range(n):
            forward = {s.index: at[Action(FORWARD, s.index, g)] for s in pipeline.stages}
            own.append({s: first + sum(p < q for p in own_due[s]) for s, q in forward.items()})
            shared.append({(s, key): first + sum(p < forward[s] for p in shared_due) for s in (0, last_stage)})
        first = end
    assert run.versions_used == own
    assert run.shared_versions_used == shared
    embedding = [used[(0, key)] for used in shared]
    head = [used[(last_stage, key)] for used in shared]
    head_own = [used[last_stage] for used in own]
    assert embedding == [used[0] for used in own]
    assert all(e <= h <= o for e, h, o in zip(embedding, head, head_own))
    assert any(e < h for e, h in zip(embedding, head)) and any(h < o for h, o in zip(head, head_own))
    # a (stage, micro-batch) forward is stale when any weight it used is behind the micro-batch's step
    steps_of = [t0 + k // per_step for t0, t1 in zip([0, *segment_ends(cfg)], segment_ends(cfg))
                for k in range((t1 - t0) * per_step)]  # fmt: skip
    behind = {(g, s) for g, (used, step) in enumerate(zip(own, steps_of)) for s, v in used.items() if v < step}
    behind |= {(g, s) for g, (used, step) in enumerate(zip(shared, steps_of)) for (s, _), v in used.items() if v < step}
    assert run.stale_forwards == len(behind)


# mode, stages ("mixed": 4 stages on devices [0, 1, 1, 0]), step_every, micro_batches, optimizer, flush_every
TIED_CASES = [
    ("local", 2, 1, 4, "adamw", 4),
    ("local", 4, 1, 2, "sgd", 5),  # the head's stage up to 2 updates of the tied weight behind its own
    ("local", "mixed", 1, 4, "adamw", 4),  # the tied weight's two stages on one device
    ("dist", 4, 2, 4, "sgd", 5),  # the tied weight's update all-reduced between ranks 0 and 3
    ("dist", "mixed", 1, 2, "adamw", 4),  # 2 ranks; the tied weight's two stages on rank 0
]


@pytest.mark.parametrize("mode, stages, step_every, micro_batches, optimizer, flush_every", TIED_CASES)
def test_async_with_a_tied_weight_matches_the_reference(tied, mode, stages, step_every, micro_batches, optimizer,
                                                       flush_every):  # fmt: skip
    root, model, folders = tied
    name = f"tied-async-{mode}-{stages}-{step_every}-{micro_batches}-{optimizer}-{flush_every}"
    settings = dict(step_every=step_every, micro_batches=micro_batches, optimizer=OPTIMIZERS[optimizer])
    cfg = config(root, folders[stages], name, mode=mode, schedule="async", staleness={"flush_every": flush_every},
                 **settings)  # fmt: skip
    truth = async_reference(cfg, model)
    assert truth.stale_forwards > 0 and not holders_agree(truth)
    results = launch(cfg) if mode == "dist" else train(cfg)
    if mode == "dist":
        assert results.world_size == load_pipeline(folders[stages]).num_devices
    state = checkpoint.merge(root / name / "checkpoints")[1]
    assert_same_run(results.loss, state, truth.losses, truth.state)
    assert torch.equal(state["wte.weight"], state["head.weight"]), "the tied copies drifted apart"
    synchronous, _ = single_run(root, folders[stages], f"{name}-single", **settings)
    difference = max_relative_difference(results.loss, synchronous)
    assert difference > 1e-4, f"the async run's losses are within {difference:.1e} of mode single's: nothing was stale"


def test_async_with_recomputation_matches_the_reference(tied):
    """Every stage recomputes its forward before its backward: on the weights its first forward
    used (stashed), so the run is the reference's; recomputing changes the simulated stage costs,
    hence the global order, which the reference takes the same way."""
    root, model, folders = tied
    cfg = config(root, folders[4], "tied-async-recompute", mode="local", schedule="async", recompute="always",
                 micro_batches=2, staleness={"flush_every": 4})  # fmt: skip
    truth = async_reference(cfg, model)
    results = train(cfg)
    assert_same_run(results.loss, checkpoint.merge(root / "tied-async-recompute" / "checkpoints")[1], truth.losses,
                    truth.state)  # fmt: skip


TWO_INPUTS = """
import torch
import torch.nn as nn
import torch.nn.functional as F


class Ranker(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Linear(12, 16)
        self.ids = nn.Embedding(50, 16)
        self.body = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32))
        self.classes = nn.Linear(32, 5)
        self.score = nn.Linear(32, 2)

    def forward(self, x, ids):
        h = self.body(torch.cat([self.features(x), self.ids(ids).mean(1)], dim=-1))
        return self.classes(h), self.score(h)


def build_model():
    return Ranker()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 12), torch.randint(0, 50, (batch_size, 6)))


def loss_fn(output, target):
    (logits, score), (label, value) = output, target
    return F.cross_entropy(logits, label) + F.mse_loss(score, value)


def dataset(size):
    x, ids = torch.randn(size, 12), torch.randint(0, 50, (size, 6))
    label, value = torch.randint(0, 5, (size,)), torch.randn(size, 2)
    return [((x[i], ids[i]), (label[i], value[i])) for i in range(size)]
"""


def test_async_with_two_inputs_and_two_targets_matches_the_reference(tmp_path):
    """A float and an int64 input, two outputs, a tuple of targets from the model file's data
    set: the reference took one input and one target tensor, so such models went unchecked."""
    from ftc.compiler import CompileOptions, compile_model

    model = tmp_path / "ranker.py"
    model.write_text(TWO_INPUTS)
    folder = compile_model(model, tmp_path / "p3", CompileOptions(stages=3)).folder
    cfg = config(tmp_path, folder, "ranker", mode="local", schedule="async", data={"name": "module", "size": 64},
                 optimizer=OPTIMIZERS["sgd"], step_every=2, micro_batches=2, staleness={"flush_every": 5})  # fmt: skip
    truth = async_reference(cfg, model)
    assert truth.stale_forwards > 0
    results = train(cfg)
    assert_same_run(results.loss, checkpoint.merge(tmp_path / "ranker" / "checkpoints")[1], truth.losses, truth.state)
