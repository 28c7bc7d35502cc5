"""Training honours the model's own train(): the frozen-BatchNorm fine-tuning pattern.

The model overrides train() to keep its first BatchNorm in eval mode (frozen running statistics),
and one of its submodules' classes overrides train() to keep its own BatchNorm frozen too; a third
BatchNorm trains as usual. Compiled into 2 stages, it trains a few steps in modes single, local
and dist; the truth is a plain PyTorch loop on the original model (`model.train()`, the same data,
optimizer and seed): per-step losses and final weights and buffers agree, and the frozen layers'
statistics never move.
"""

from __future__ import annotations

import pytest
import torch

from ftc.ir import FtcError
from ftc.runtime import checkpoint
from ftc.runtime.config import load_config
from ftc.runtime.data import Sampler, load_batch
from ftc.runtime.datasets import build_dataset
from ftc.runtime.mode import train_model
from ftc.runtime.model_file import load_model_file
from ftc.runtime.train import train
from ftc.runtime.worker import launch

from .conftest import MODELS

STEPS, BATCH, MICRO_BATCHES, SEED = 4, 8, 2, 3
FROZEN = ("bn1", "block.bn")  # the root's override freezes bn1, Block's override its bn
FROZEN_BN = """
import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)

    def train(self, mode=True):
        super().train(mode)
        self.bn.eval()
        return self

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(8)
        self.block = Block()
        self.c2 = nn.Conv1d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm1d(8)
        self.head = nn.Linear(8 * 8, 2)

    def train(self, mode=True):
        super().train(mode)
        self.bn1.eval()

    def forward(self, x):
        h = F.relu(self.bn1(self.c1(x)))
        h = self.block(h)
        h = F.relu(self.bn2(self.c2(h)))
        return self.head(h.flatten(1))


def build_model():
    return M()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 3, 8) * 3 + 1,)


def example_targets(batch_size):
    return torch.randn(batch_size, 2)


def loss_fn(output, target):
    return F.mse_loss(output, target)
"""


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    from ftc.compiler import CompileOptions, compile_model

    root = tmp_path_factory.mktemp("frozen")
    model = root / "frozen_bn.py"
    model.write_text(FROZEN_BN)
    return root, model, compile_model(model, root / "out", CompileOptions(stages=2)).folder


def config(root, pipeline, name, **settings):
    data = {
        "pipeline": str(pipeline), "data": {"name": "synthetic", "size": 64},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "batch_size": BATCH,
        "micro_batches": MICRO_BATCHES, "steps": STEPS, "seed": SEED, "timeout_s": 30,
        "checkpoint": {"dir": str(root / name / "checkpoints")},
    }  # fmt: skip
    data.update(settings)
    return load_config(data=data)


@pytest.fixture(scope="module")
def truth(frozen):
    """A plain PyTorch loop: (per-step losses, final state_dict)."""
    root, model_path, pipeline = frozen
    cfg = config(root, pipeline, "truth")
    model_file = load_model_file(model_path)
    torch.manual_seed(SEED)
    model = model_file.build()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dataset = build_dataset(cfg.data, model_file)
    sampler = Sampler(len(dataset), BATCH, SEED)
    losses = []
    for step in range(STEPS):
        (inputs,), targets = load_batch(dataset, sampler.indices(step), True, True)
        total = 0.0
        for x, y in zip(inputs.chunk(MICRO_BATCHES), targets.chunk(MICRO_BATCHES)):
            loss = model_file.loss_fn(model(x), y)
            (loss / MICRO_BATCHES).backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total / MICRO_BATCHES)
    return losses, model.state_dict()


def assert_like_truth(losses, state, truth):
    truth_losses, truth_state = truth
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(truth_losses), rtol=1e-5, atol=0)
    assert set(state) == set(truth_state)
    for key, expected in truth_state.items():
        torch.testing.assert_close(state[key], expected, rtol=1e-5, atol=1e-6, msg=key)
    for name in FROZEN:
        assert state[f"{name}.num_batches_tracked"].item() == 0, f"{name}'s statistics moved, though train() freezes it"
        assert torch.equal(state[f"{name}.running_mean"], torch.zeros(8)), name
    assert state["bn2.num_batches_tracked"].item() == STEPS * MICRO_BATCHES


def test_the_truth_keeps_the_frozen_layers_frozen(truth):
    _, state = truth
    assert [state[f"{name}.num_batches_tracked"].item() for name in FROZEN] == [0, 0]


@pytest.mark.parametrize("mode", ["single", "local"])
def test_single_and_local_honour_the_models_train(frozen, truth, mode):
    root, _, pipeline = frozen
    results = train(config(root, pipeline, mode, mode=mode))
    assert_like_truth(results.loss, checkpoint.merge(root / mode / "checkpoints")[1], truth)


def test_dist_honours_the_models_train(frozen, truth):
    root, _, pipeline = frozen
    results = launch(config(root, pipeline, "dist", mode="dist"))
    assert results.world_size == 2
    assert_like_truth(results.loss, checkpoint.merge(root / "dist" / "checkpoints")[1], truth)


MC_DROPOUT = """
import torch
import torch.nn as nn
import torch.nn.functional as F


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(16, 2)

    def train(self, mode=True):
        super().train(mode)
        self.drop.train()  # Monte Carlo dropout: on in eval mode too
        return self

    def forward(self, x):
        return self.head(self.drop(F.relu(self.fc(x))))


def build_model():
    return M()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 6),)
"""


def test_check_compares_stages_and_model_in_the_modes_the_models_train_sets(tmp_path):
    """The model keeps its dropout on in eval mode; the stages must too, or eval mode differs."""
    from ftc.check import check_pipeline
    from ftc.compiler import CompileOptions, compile_model

    model = tmp_path / "mc_dropout.py"
    model.write_text(MC_DROPOUT)
    report = check_pipeline(compile_model(model, tmp_path / "out", CompileOptions(stages=2)).folder)
    assert report.eval_expected and report.eval_outputs <= report.tolerance, report.problems
    assert report.ok, report.problems


TRACED_DROPOUT = """
import torch
import torch.nn as nn
import torch.nn.functional as F


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 16)

    def forward(self, x):
        return F.dropout(F.relu(self.fc(x)), 0.5, self.training)


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.head = nn.Linear(16, 2)

    def train(self, mode=True):
        super().train(mode)
        self.inner.train()
        return self

    def forward(self, x):
        return self.head(self.inner(x))


def build_model():
    return M()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 6),)
"""


def test_compiling_warns_where_the_stages_cannot_follow_the_models_train(tmp_path):
    """Inner's functional dropout is traced into stage code that reads the stage's one flag, the
    model's; M.train() keeps Inner in train mode in eval mode, which that code cannot follow."""
    from ftc.check import check_pipeline
    from ftc.compiler import CompileOptions, compile_model

    model = tmp_path / "traced_dropout.py"
    model.write_text(TRACED_DROPOUT)
    compiled = compile_model(model, tmp_path / "out", CompileOptions(stages=2))
    warnings = [note for note in compiled.notes if note.startswith("warning:")]
    assert len(warnings) == 1
    assert "M.train() puts inner (Inner) in train mode while the model is in eval mode" in warnings[0]
    assert "traced_dropout.py:13" in warnings[0]
    assert not check_pipeline(compiled.folder).ok  # what the warning foretold


def test_compiling_a_frozen_batch_norm_model_warns_of_nothing(frozen):
    root, model, _ = frozen
    from ftc.compiler import CompileOptions, compile_model

    for frontend in ("fx", "export"):
        compiled = compile_model(model, root / frontend, CompileOptions(stages=2, frontend=frontend))
        assert not [note for note in compiled.notes if note.startswith("warning:")], compiled.notes


NORMALIZED_MLP = """
import torch
import torch.nn as nn
import torch.nn.functional as F


def build_model():
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def example_inputs(batch_size):
    return (torch.randn(batch_size, 6),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
"""


def test_a_micro_batch_of_one_sample_that_a_batch_norm_refuses_is_blamed_on_the_config(tmp_path, compile_to):
    """micro_batches = batch_size: the fix said to check the data against example_inputs."""
    (tmp_path / "normalized.py").write_text(NORMALIZED_MLP)
    folder = compile_to(tmp_path / "normalized.py", 2)
    for mode in ("single", "local"):
        with pytest.raises(FtcError, match="Expected more than 1 value per channel when training") as error:
            train(load_config(data={"pipeline": str(folder), "mode": mode, "batch_size": 4, "micro_batches": 4}))
        assert "a micro-batch of 1 sample (batch_size / micro_batches)" in error.value.hint
        assert "lower micro_batches" in error.value.hint


def test_a_train_override_that_raises_is_named():
    class Reads(torch.nn.Module):
        def train(self, mode=True):
            raise RuntimeError("Tensor.item() on a meta tensor")

    with pytest.raises(FtcError, match=r"Reads.train\(True\) raised RuntimeError: Tensor.item\(\) on a meta tensor"):
        train_model(Reads(), True)


def test_a_held_out_evaluation_leaves_the_buffers_as_training_left_them(compile_to):
    """The stages (export) keep `if self.training:` as traced, so evaluating them updated the
    running mean, and training went on from other statistics than mode single's (losses parted
    by 3e-3 after one evaluation). The held-out losses themselves may differ (ftc compile says
    so); the training losses must not."""
    folder = compile_to(MODELS / "eval_buffer.py", 2, batch_size=8)
    losses = {}
    for mode in ("single", "local"):
        config = load_config(data={
            "pipeline": str(folder), "data": {"name": "synthetic", "size": 32}, "mode": mode, "steps": 3,
            "batch_size": 8, "micro_batches": 2, "optimizer": {"name": "adam", "lr": 0.01}, "log_every": 10,
            "eval": {"every": 1, "batches": 1, "fraction": 0.25},
        })  # fmt: skip
        losses[mode] = train(config).loss
    torch.testing.assert_close(torch.tensor(losses["local"]), torch.tensor(losses["single"]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_hand_written_norm_with_running_statistics_evaluates_as_the_model_does(frontend, compile_to):
    """A batch norm written in the model file (its own weight and bias, running statistics,
    `if self.training:` batch statistics) holds no other layer, so the stages call it whole and
    use the running statistics in eval mode, as the model does: `ftc check` judges the eval
    outputs, and mode local's held-out losses, which follow the running statistics that
    training updated, equal mode single's. Traced op by op, the stages normalized held-out
    batches by their own statistics."""
    folder = compile_to(MODELS / "running_norm.py", 2, frontend=frontend)
    code = "".join(path.read_text() for path in sorted(folder.glob("stage*.py")))
    assert "lerp_" not in code and "rsqrt" not in code
    from ftc.check import check_pipeline

    report = check_pipeline(folder)
    assert report.ok and report.eval_expected, report
    results = {}
    for mode in ("single", "local"):
        config = load_config(data={
            "pipeline": str(folder), "data": {"name": "synthetic", "size": 48}, "mode": mode, "steps": 4,
            "batch_size": 8, "micro_batches": 2, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
            "log_every": 10, "eval": {"every": 2, "batches": 2},
        })  # fmt: skip
        results[mode] = train(config)
    assert results["local"].loss == pytest.approx(results["single"].loss, rel=1e-5)
    assert [step for step, _ in results["local"].eval_loss] == [2, 4]
    assert [loss for _, loss in results["local"].eval_loss] == pytest.approx(
        [loss for _, loss in results["single"].eval_loss], rel=1e-5
    )
