"""Frozen parameters (requires_grad=False) in training.

A model with some frozen layers trains as usual, though its stages 0 and 2 hold only frozen
parameters (their optimizers have nothing to update): in modes local and dist its per-step losses
and final weights (the merged checkpoint) must equal mode single's to a relative 1e-5, the frozen
weights must stay as built, schedule async must match the plain-PyTorch async reference
(tests/async_reference.py), and a run stopped at a checkpoint and resumed on another layout of
ranks must continue the uninterrupted single-process run. A model whose every parameter is
frozen is refused before training, in every mode, naming its model file.

Parameters behind an output that the loss ignores (a second head, a pooler) get no gradient in a
plain loop (.grad stays None), so AdamW's weight decay passes them by: a pipeline that sends that
output's gradient back from the loss's device must leave them alone too, not decay them as
though their gradient were zero; so must one that sends a gate's output to a stage that only
compares it (`h * (gate > 0)`), and one tied across ranks whose every use the loss ignores: the
ranks' sum of its gradients is then none, not zeros.
"""

from __future__ import annotations

import json

import pytest
import torch

from ftc.compiler import CompileOptions, compile_model
from ftc.ir import FtcError
from ftc.runtime import checkpoint
from ftc.runtime.config import load_config
from ftc.runtime.model_file import load_model_file
from ftc.runtime.reference import build_single
from ftc.runtime.train import train
from ftc.runtime.worker import launch

from .async_reference import async_reference

STEPS = 6
MODEL = """
import torch
import torch.nn as nn
import torch.nn.functional as F

FROZEN = {FROZEN}


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(16, 16) for _ in range(4)])
        for k in FROZEN:
            self.layers[k].requires_grad_(False)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def build_model():
    return Stack()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 16),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
"""


IGNORED_HEAD = """
import torch
import torch.nn as nn
import torch.nn.functional as F


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(16, 16)
        self.side = nn.Linear(16, 4)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 16)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        side = self.side(h)
        return self.head(torch.tanh(self.body(h))), side


def build_model():
    return TwoHeads()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 16),)


def example_targets(batch_size):
    return torch.randn(batch_size, 16)


def loss_fn(output, target):
    return F.mse_loss(output[0], target)
"""

COMPARED_GATE = IGNORED_HEAD.replace(
    "return self.head(torch.tanh(self.body(h))), side",
    "return self.head(torch.tanh(self.body(h)) * (side.sum(1, keepdim=True) > 0)), h",
)
TIED_IGNORED = IGNORED_HEAD.replace(
    "return self.head(torch.tanh(self.body(h))), side",
    "h = torch.tanh(self.body(h))\n        return self.head(h), side, self.side(h)",
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    """Layers 0 and 2 frozen, compiled into 4 stages of one layer each (method uniform); and everything frozen."""
    root = tmp_path_factory.mktemp("frozen")
    (root / "part.py").write_text(MODEL.replace("{FROZEN}", "(0, 2)"))
    (root / "all.py").write_text(MODEL.replace("{FROZEN}", "(0, 1, 2, 3)"))
    part = compile_model(root / "part.py", root / "generated", CompileOptions(stages=4, method="uniform")).folder
    every = compile_model(root / "all.py", root / "generated", CompileOptions(stages=2)).folder
    return root, part, every


def config(root, pipeline, name, **settings):
    data = {
        "pipeline": str(pipeline), "data": {"name": "synthetic"},
        "optimizer": {"name": "adamw", "lr": 0.05, "weight_decay": 0.01}, "lr_schedule": {"name": "constant"},
        "batch_size": 8, "micro_batches": 4, "steps": STEPS, "seed": 3, "log_every": 10, "timeout_s": 30,
        "results": str(root / name / "results.json"),
        "checkpoint": {"dir": str(root / name / "checkpoints"), "every": 3},
    }  # fmt: skip
    data.update(settings)
    return load_config(data=data)


@pytest.fixture(scope="module")
def single(frozen):
    root, part, _ = frozen
    results = train(config(root, part, "single", mode="single"))
    return results.loss, checkpoint.merge(root / "single" / "checkpoints")[1]


def assert_same(losses, state, truth_losses, truth_state):
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(truth_losses), rtol=1e-5, atol=0)
    assert set(state) == set(truth_state)
    for key, expected in truth_state.items():
        error = (state[key] - expected).norm() / expected.norm().clamp(min=1e-12)
        assert error <= 1e-5, f"{key}: relative difference {error:.2e}"


def test_stages_of_frozen_layers_only_exist(frozen):
    _, part, _ = frozen
    stages = json.loads((part / "pipeline.json").read_text())["stages"]
    layers = [sorted({name.split(".")[1] for name in stage["state"]}) for stage in stages]
    assert layers == [["0"], ["1"], ["2"], ["3"]]


def test_single_trains_only_the_unfrozen_layers(frozen, single):
    root, part, _ = frozen
    losses, state = single
    cfg = config(root, part, "initial", mode="single")
    initial = build_single(cfg, load_model_file(root / "part.py"), torch.device("cpu"))
    for key, value in initial.state_dict().items():
        frozen_layer = key.split(".")[1] in ("0", "2")
        assert torch.equal(state[key], value) == frozen_layer, key
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("mode, schedule", [("local", "1f1b"), ("local", "gpipe"), ("dist", "1f1b")])
def test_a_partly_frozen_model_trains_as_in_mode_single(frozen, single, mode, schedule):
    root, part, _ = frozen
    name = f"{mode}-{schedule}"
    cfg = config(root, part, name, mode=mode, schedule=schedule)
    results = launch(cfg) if mode == "dist" else train(cfg)
    assert_same(results.loss, checkpoint.merge(root / name / "checkpoints")[1], *single)


@pytest.mark.parametrize("mode", ["local", "dist"])
def test_a_partly_frozen_model_trains_async_as_the_reference(frozen, mode):
    root, part, _ = frozen
    name = f"async-{mode}"
    cfg = config(root, part, name, mode=mode, schedule="async", micro_batches=2, staleness={"flush_every": 3})
    truth = async_reference(cfg, root / "part.py")
    assert truth.stale_forwards > 0
    results = launch(cfg) if mode == "dist" else train(cfg)
    assert_same(results.loss, checkpoint.merge(root / name / "checkpoints")[1], truth.losses, truth.state)


def test_a_partly_frozen_run_resumes_on_other_ranks(frozen, single):
    """Stopped after the checkpoint of step 3 in mode local (one optimizer for every stage),
    resumed in dist, where the ranks of the frozen stages have no optimizer."""
    root, part, _ = frozen
    name = "resume"
    with pytest.raises(FtcError, match="the loss is nan at step 5"):
        train(config(root, part, name, mode="local", inject_fault={"step": 5, "kind": "nan"}))
    assert checkpoint.merge(root / name / "checkpoints")[0] == 3
    cfg = config(root, part, name, mode="dist", checkpoint={"dir": str(root / name / "checkpoints"), "every": 3,
                                                             "resume": True})  # fmt: skip
    results = launch(cfg)
    assert results.first_step == 3
    assert_same(results.loss, checkpoint.merge(root / name / "checkpoints")[1], single[0][3:], single[1])


@pytest.mark.parametrize("mode", ["single", "local", "dist"])
def test_a_model_with_every_parameter_frozen_is_refused_before_training(frozen, mode):
    root, _, every = frozen
    cfg = config(root, every, f"all-{mode}", mode=mode)
    with pytest.raises(FtcError) as refused:
        launch(cfg) if mode == "dist" else train(cfg)
    assert f"{root / 'all.py'}: no output of the model depends on a trainable parameter" in refused.value.message
    assert "requires_grad=True" in refused.value.hint
    assert not (root / f"all-{mode}" / "checkpoints").exists()


@pytest.fixture(scope="module", params=["ignored", "compared", "tied"])
def ignored_head(request, tmp_path_factory):
    """The side head on stage 0, its output sent to stage 1, where the loss ignores it or the
    stage only compares it: either way no gradient comes back. Tied: the head is called again in
    stage 1, whose output the loss ignores too, so neither of its holders has a gradient."""
    root = tmp_path_factory.mktemp(request.param)
    source = {"ignored": IGNORED_HEAD, "compared": COMPARED_GATE, "tied": TIED_IGNORED}[request.param]
    (root / "model.py").write_text(source)
    pipeline = compile_model(root / "model.py", root / "generated", CompileOptions(stages=2, method="uniform")).folder
    stages = json.loads((pipeline / "pipeline.json").read_text())["stages"]
    assert "side" in stages[0]["outputs"] and "side.weight" in stages[0]["state"]
    return root, pipeline


IGNORED_SETTINGS = {"optimizer": {"name": "adamw", "lr": 0.05, "weight_decay": 0.1}, "steps": 4}


@pytest.fixture(scope="module")
def ignored_single(ignored_head):
    root, pipeline = ignored_head
    results = train(config(root, pipeline, "single", mode="single", **IGNORED_SETTINGS))
    return results.loss, checkpoint.merge(root / "single" / "checkpoints")[1]


def test_mode_single_leaves_the_head_no_gradient_reaches_as_built(ignored_head, ignored_single):
    root, pipeline = ignored_head
    initial = build_single(config(root, pipeline, "initial", mode="single"), load_model_file(root / "model.py"),
                           torch.device("cpu")).state_dict()  # fmt: skip
    for key in ("side.weight", "side.bias"):
        assert torch.equal(ignored_single[1][key], initial[key]), key


def test_a_head_no_gradient_reaches_stays_undecayed_as_in_mode_single(ignored_head, ignored_single):
    root, pipeline = ignored_head
    results = train(config(root, pipeline, "local", mode="local", **IGNORED_SETTINGS))
    assert_same(results.loss, checkpoint.merge(root / "local" / "checkpoints")[1], *ignored_single)


@pytest.mark.parametrize("ignored_head", ["ignored", "tied"], indirect=True)
def test_a_head_no_gradient_reaches_stays_undecayed_in_dist(ignored_head, ignored_single):
    root, pipeline = ignored_head
    if root.name.startswith("tied"):  # held on both ranks, whose gradients dist sums
        assert "side.weight" in json.loads((pipeline / "pipeline.json").read_text())["stages"][1]["state"]
    results = launch(config(root, pipeline, "dist", mode="dist", **IGNORED_SETTINGS))
    assert_same(results.loss, checkpoint.merge(root / "dist" / "checkpoints")[1], *ignored_single)


@pytest.mark.parametrize("ignored_head", ["tied"], indirect=True)
def test_a_tied_head_no_gradient_reaches_stays_as_built_async_in_dist(ignored_head):
    """Schedule async sums a tied weight's gradients over its holders' ranks at each update; where
    neither holder had one, the sum was zeros, which AdamW's weight decay then applied. Local mode
    holds one Parameter (nothing to sum): dist must train as it does, the head left as built."""
    root, pipeline = ignored_head
    settings = {"schedule": "async", "micro_batches": 2, "staleness": {"flush_every": 3}, **IGNORED_SETTINGS}
    local = train(config(root, pipeline, "async-local", mode="local", **settings))
    results = launch(config(root, pipeline, "async-dist", mode="dist", **settings))
    trained = checkpoint.merge(root / "async-dist" / "checkpoints")[1]
    assert_same(results.loss, trained, local.loss, checkpoint.merge(root / "async-local" / "checkpoints")[1])
    initial = build_single(config(root, pipeline, "initial", mode="single"), load_model_file(root / "model.py"),
                           torch.device("cpu")).state_dict()  # fmt: skip
    for key in ("side.weight", "side.bias"):
        assert torch.equal(trained[key], initial[key]), key
