"""Schedule async (runtime/staleness.py): the weight version each stage forward sees in a run,
weight stashing, weight prediction and gap-aware against their formulas worked out by hand, the
segment boundaries, and what async refuses. The losses and weights of whole async runs are
checked against a plain-PyTorch reference in test_async.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ftc.ir import FtcError
from ftc.runtime.config import StalenessConfig, load_config
from ftc.runtime.pipeline import load_pipeline
from ftc.runtime.staleness import StaleWeights, shared_sets
from ftc.runtime.train import segment_end, train

ROOT = Path(__file__).resolve().parents[1]
INPUTS = [torch.randn(4, 3, generator=torch.Generator().manual_seed(g)) for g in range(6)]


def micro_batch(stale: StaleWeights, module: torch.nn.Module, g: int) -> torch.Tensor:
    """Forward of micro-batch g with the weights stale gives; returns its loss, not yet backwarded."""
    weights = stale.forward_weights(0, g)
    return (torch.func.functional_call(module, weights, (INPUTS[g],)) ** 2).sum()


def gradients_at(module: torch.nn.Module, weights: dict[str, torch.Tensor], g: int) -> dict[str, torch.Tensor]:
    leaves = {name: w.detach().clone().requires_grad_() for name, w in weights.items()}
    (torch.func.functional_call(module, leaves, (INPUTS[g],)) ** 2).sum().backward()
    return {name: leaf.grad for name, leaf in leaves.items()}


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_a_stashed_backward_differentiates_at_its_forward_weights_and_prediction_follows_momentum():
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    lr_at = lambda step: 0.1 * (step + 1)  # noqa: E731
    stale = StaleWeights({0: module}, optimizer, lr_at, StalenessConfig(predict=True), step_micro_batches=2)
    stale.begin(0)
    w0 = snapshot(module)
    # A stage of depth 3: micro-batches 0, 1 (step 0) and 2 (step 1) go forward before any backward.
    losses = {g: micro_batch(stale, module, g) for g in (0, 1, 2)}
    for name, weight in stale.forward_weights(0, 2).items():
        assert torch.equal(weight, w0[name])  # nothing to predict with before the first update
    expected = {name: a + b for (name, a), b in zip(gradients_at(module, w0, 0).items(), gradients_at(module, w0, 1).values())}
    for g in (0, 1):
        losses.pop(g).backward()
        stale.after_backward(0, g)
    # Step 0's update: SGD with momentum from the summed gradient, at lr_at(0).
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.detach(), w0[name] - 0.1 * expected[name])
    # Micro-batch 2 was forwarded at version 0: its backward still differentiates there.
    w1 = snapshot(module)
    losses.pop(2).backward()
    stale.after_backward(0, 2)
    for name, grad in gradients_at(module, w0, 2).items():
        torch.testing.assert_close(stale.gradients[0][name], grad)
    # Micro-batch 4 (step 2) forwarded at version 1 misses one update: w - lr_at(1) * momentum buffer.
    micro_batch(stale, module, 3)
    micro_batch(stale, module, 4)
    predicted = stale.forward_weights(0, 4)
    for name, p in module.named_parameters():
        buffer = optimizer.state[p]["momentum_buffer"]
        torch.testing.assert_close(predicted[name], w1[name] - 0.2 * buffer)
        assert torch.equal(stale.forward_weights(0, 3)[name], w1[name])  # step 1 at version 1: not stale


def test_gap_aware_divides_a_stale_gradient_by_one_plus_the_updates_it_missed_under_adam():
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
    stale = StaleWeights({0: module}, optimizer, lambda step: 0.05, StalenessConfig(gap_aware=True), step_micro_batches=2)
    stale.begin(0)
    w0 = snapshot(module)
    losses = {g: micro_batch(stale, module, g) for g in (0, 1, 2)}
    for g in (0, 1):
        losses.pop(g).backward()
        stale.after_backward(0, g)
    losses.pop(2).backward()
    stale.after_backward(0, 2)
    for (name, p), grad in zip(module.named_parameters(), gradients_at(module, w0, 2).values()):
        gap = 1 + (p.detach() - w0[name]).abs() / 0.05
        assert gap.min() > 1.99  # Adam's first step moves every weight by about lr: a gap of one update
        torch.testing.assert_close(stale.gradients[0][name], grad / gap)


def test_gap_aware_sgd_keeps_its_running_mean_of_squares_in_the_optimizer_state():
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    stale = StaleWeights({0: module}, optimizer, lambda step: 0.1, StalenessConfig(gap_aware=True), step_micro_batches=1)
    stale.begin(0)
    w0 = snapshot(module)
    loss = micro_batch(stale, module, 0)
    loss.backward()
    stale.after_backward(0, 0)
    for name, p in module.named_parameters():
        grad = (w0[name] - p.detach()) / 0.1
        state = optimizer.state[p]
        torch.testing.assert_close(state["gap_aware_sq"], 0.001 * grad**2)
        assert state["gap_aware_updates"] == 1
    # A checkpoint carries it: the optimizer's state_dict holds it.
    assert "gap_aware_sq" in optimizer.state_dict()["state"][0]


def test_each_stage_forward_sees_the_versions_the_textbook_1f1b_order_gives(monkeypatch):
    """Stage i (depth d = P - i) forwards micro-batch g of a segment with the weights after
    max(0, (g - d + 1) // Mt) of the segment's updates, Mt micro-batches per step."""
    seen: dict[tuple[int, int, int], int] = {}
    forward_weights = StaleWeights.forward_weights

    def recording(self, stage, g):
        if (stage, g) not in self.in_flight:
            seen[(self.first_step, stage, g)] = self.updates[stage]
        return forward_weights(self, stage, g)

    monkeypatch.setattr(StaleWeights, "forward_weights", recording)
    pipeline = load_pipeline(ROOT / "generated" / "mlp")
    stages = [s.index for s in pipeline.stages]
    assert [s.inputs for s in pipeline.stages[1:]] == [p.outputs for p in pipeline.stages[:-1]]  # a chain
    config = load_config(data={
        "pipeline": str(pipeline.folder), "data": {"name": "digits"}, "schedule": "async", "mode": "local",
        "staleness": {"flush_every": 3}, "steps": 5, "batch_size": 16, "micro_batches": 2, "step_every": 2,
        "optimizer": {"name": "sgd", "lr": 0.01}, "log_every": 100,
    })  # fmt: skip
    results = train(config)
    assert len(results.loss) == 5
    per_step = 4
    expected = {
        (first, stage, g): max(0, (g - (len(stages) - position) + 1) // per_step)
        for first, steps in ((0, 3), (3, 2))
        for position, stage in enumerate(stages)
        for g in range(steps * per_step)
    }
    assert seen == expected
    assert any(version < g // per_step for (_, _, g), version in seen.items())  # some forwards were stale


def test_segments_end_at_flushes_checkpoints_and_the_last_step():
    config = load_config(data={"pipeline": "p", "schedule": "async", "steps": 20, "staleness": {"flush_every": 8},
                               "checkpoint": {"dir": "c", "every": 5}})  # fmt: skip
    ends, step = [], 0
    while step < config.steps:
        step = segment_end(config, step)
        ends.append(step)
    assert ends == [5, 8, 10, 15, 16, 20]
    assert segment_end(config, 10) == 15  # a run resumed at step 10 flushes where this one does


def test_shared_sets_group_the_weights_several_stages_hold_by_their_first_names():
    gpt = load_pipeline(ROOT / "generated" / "gpt")  # its LM head reads the embedding's weight
    assert [(entry.keys, entry.stages) for entry in shared_sets(gpt)] == [(["wte.weight"], [0, 3])]
    assert shared_sets(load_pipeline(ROOT / "generated" / "mlp")) == []


def test_async_with_a_flush_every_step_trains_exactly_as_1f1b(tmp_path):
    settings = {
        "pipeline": str(ROOT / "generated" / "mlp"), "data": {"name": "digits"}, "mode": "local", "steps": 4,
        "batch_size": 16, "micro_batches": 4, "optimizer": {"name": "adamw", "lr": 0.01}, "log_every": 100,
    }  # fmt: skip
    synchronous = train(load_config(data=settings))
    flushed = train(load_config(data={**settings, "schedule": "async", "staleness": {"flush_every": 1}}))
    stale = train(load_config(data={**settings, "schedule": "async", "staleness": {"flush_every": 4}}))
    assert flushed.loss == synchronous.loss
    assert stale.loss[0] == synchronous.loss[0] and stale.loss[1:] != synchronous.loss[1:]


def mlp_config(tmp_path: Path, name: str, **settings):
    data = {
        "pipeline": str(ROOT / "generated" / "mlp"), "data": {"name": "digits"}, "mode": "local", "steps": 6,
        "batch_size": 16, "micro_batches": 2, "schedule": "async", "log_every": 100, "timeout_s": 30,
        "results": str(tmp_path / name / "results.json"), "checkpoint": {"dir": str(tmp_path / name / "checkpoints")},
    }  # fmt: skip
    data.update(settings)
    return load_config(data=data)


def test_prediction_and_gap_aware_train_alike_in_one_process_and_across_processes(tmp_path):
    from ftc.runtime.worker import launch

    settings = dict(staleness={"flush_every": 3, "predict": True, "gap_aware": True},
                    optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9})  # fmt: skip
    local = train(mlp_config(tmp_path, "local", **settings))
    plain = train(mlp_config(tmp_path, "plain", staleness={"flush_every": 3}, optimizer=settings["optimizer"]))
    distributed = launch(mlp_config(tmp_path, "dist", mode="dist", **settings))
    assert distributed.world_size == 4
    torch.testing.assert_close(torch.tensor(distributed.loss), torch.tensor(local.loss), rtol=1e-6, atol=0)
    assert local.loss[0] == plain.loss[0] and local.loss[1:] != plain.loss[1:]  # the mitigations did something


def test_resuming_gap_aware_sgd_carries_its_running_mean_and_continues_exactly(tmp_path):
    # Segments [0, 3), [3, 4), [4, 6), [6, 8): stale gradients in step 6 are penalized with the
    # running mean of all updates before, which steps 7 and 8's losses see.
    settings = dict(staleness={"flush_every": 4, "gap_aware": True}, optimizer={"name": "sgd", "lr": 0.05}, steps=8)
    whole = train(mlp_config(tmp_path, "whole", checkpoint={"dir": str(tmp_path / "whole"), "every": 3}, **settings))
    folder = str(tmp_path / "parts" / "checkpoints")
    with pytest.raises(FtcError, match="the loss is nan at step 5"):
        train(mlp_config(tmp_path, "parts", checkpoint={"dir": folder, "every": 3}, inject_fault={"step": 5, "kind": "nan"},
                         **settings))  # fmt: skip
    resumed = train(mlp_config(tmp_path, "parts", checkpoint={"dir": folder, "every": 3, "resume": True}, **settings))
    assert resumed.first_step == 3
    assert resumed.loss == whole.loss[3:]


def test_async_refuses_a_forward_that_writes_a_parameter_in_place(tmp_path):
    """An embedding's max_norm renormalizes its weight in forward: under async that write would
    land on the stashed copy and be lost."""
    from ftc.compiler import CompileOptions, compile_model

    folder = compile_model(ROOT / "tests" / "models" / "max_norm.py", tmp_path / "gen", CompileOptions(stages=2)).folder
    config = load_config(data={"pipeline": str(folder), "schedule": "async", "mode": "local", "steps": 2,
                               "batch_size": 8, "micro_batches": 4, "log_every": 100})  # fmt: skip
    with pytest.raises(FtcError, match="stage 0 changes parameter emb.weight in place in its forward"):
        train(config)
