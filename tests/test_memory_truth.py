"""The compiler's memory estimate (ftc/passes/partition/memory.py) against the memory each device
really holds while the engine trains (tests/memory_truth.py: every live storage, counted once,
charged to the device whose action made it), per device, schedule, micro-batch count and
optimizer, for the examples and for edge models: tied and frozen parameters and buffers
(tests/models/memory_lm.py), a loss whose saved tensors dominate the last stage, recomputation,
async's stashed weights, and devices that own several stages (mixed-pipe).

The tolerance: a device's measured peak must not exceed its estimate by more than SLACK bytes
(the estimate must not under-count what a memory limit is for), and must reach at least LOWEST
of it (an estimate off by a factor wastes devices). The estimate may over-count: it adds the
largest transients of a step (all micro-batches in flight, the gradients, the backward's working
set, the optimizer's temporaries) as if they met, which they do only in part; the cases here
measured 0.605-1.0 of it (README, Memory), 0.50 before both profiles counted what autograd saves.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from ftc.compiler import CompileOptions, compile_model
from tests.conftest import EXAMPLES, MODELS
from tests.memory_truth import measure

SLACK = 64 * 1024  # bytes: small tensors the estimate does not model (a loss scalar, Adam's step counters)
LOWEST = 0.6


pytestmark = pytest.mark.usefixtures("one_thread")


def compiled(tmp_path, model, stages, schedule, micro_batches, optimizer, **options):
    options = {"batch_size": 8, **options}
    return compile_model(model, tmp_path / "out", CompileOptions(
        stages=stages, schedule=schedule, micro_batches=micro_batches, optimizer=optimizer, **options))  # fmt: skip


def assert_within(result, measured, what: str) -> None:
    estimates = result.manifest["predicted"]["device_memory"]
    assert sorted(measured.state) == list(range(len(estimates)))
    for device, estimate in enumerate(estimates):
        peak = measured.total(device)
        assert peak <= estimate + SLACK, f"{what}: device {device} held {peak:,} bytes, estimated {estimate:,}"
        assert peak >= LOWEST * estimate, f"{what}: device {device} held {peak:,} bytes, estimated {estimate:,}"


@pytest.mark.parametrize("example", ["gpt", "resnet", "unet", "mlp", "two_tower"])
@pytest.mark.parametrize("schedule, micro_batches, optimizer", [("gpipe", 4, "sgd"), ("1f1b", 8, "adam"),
                                                                ("async", 4, "momentum")])  # fmt: skip
def test_examples_hold_what_the_estimate_says(tmp_path, example, schedule, micro_batches, optimizer):
    result = compiled(tmp_path, EXAMPLES / f"{example}.py", 4, schedule, micro_batches, optimizer, recompute="never")
    measured = measure(result.folder, schedule=schedule, micro_batches=micro_batches, optimizer=optimizer)
    assert_within(result, measured, f"{example} {schedule} M={micro_batches} {optimizer}")


@pytest.mark.parametrize(
    "schedule, micro_batches, optimizer, recompute",
    [
        # the loss's log_softmax and the logits it holds, per micro-batch in flight on the
        # recomputing last stage: measured 1.9x the estimate before the estimate counted them
        ("gpipe", 8, "sgd", "always"),
        ("gpipe", 4, "adamw", "never"),
        ("1f1b", 4, "momentum", "always"),
        # async: stashed weight versions and the stage's depth in flight (measured up to 2.7x the
        # 1f1b estimate on gpt before --schedule async was estimated)
        ("async", 1, "adam", "never"),
        ("async", 8, "sgd", "always"),
    ],
)
def test_tied_frozen_language_model(tmp_path, schedule, micro_batches, optimizer, recompute):
    result = compiled(tmp_path, MODELS / "memory_lm.py", 2, schedule, micro_batches, optimizer, recompute=recompute)
    assert result.manifest["tied"]  # the embedding and the head share a weight, on two devices
    measured = measure(result.folder, schedule=schedule, micro_batches=micro_batches, optimizer=optimizer)
    assert_within(result, measured, f"memory_lm {schedule} M={micro_batches} {optimizer} recompute {recompute}")


@pytest.mark.parametrize("model, stages, schedule, micro_batches", [("memory_lm", 2, "gpipe", 8),
                                                                    ("memory_stack", 3, "1f1b", 4)])  # fmt: skip
def test_a_measured_profile_counts_what_the_runtime_holds(tmp_path, model, stages, schedule, micro_batches):
    """A measured profile records what autograd saves, which leaves out a stage's outputs that no
    op saves (the logits: the loss holds them, not autograd); the runtime holds them until the
    micro-batch's backward, so the estimate counts them (memory_lm's last device held 1.08x its
    estimate before)."""
    result = compiled(tmp_path, MODELS / f"{model}.py", stages, schedule, micro_batches, "adam", method="uniform",
                      recompute="never", profile="measure", cache=False)  # fmt: skip
    measured = measure(result.folder, schedule=schedule, micro_batches=micro_batches, optimizer="adam")
    assert_within(result, measured, f"{model} measured profile {schedule} M={micro_batches}")


@pytest.mark.parametrize("example", ["gpt", "resnet"])
def test_what_nothing_saves_and_the_gradients_sent_back(tmp_path, example):
    """Counting only what autograd saves leaves out two things a device holds: what a forward
    makes that nothing saves (stage code names every value, so it lives until the forward
    returns) and the gradients a backward sends back, which the sender holds until the stage
    before receives them (under 1F1B, after its own next forward). Without them, gpt's devices
    1-3 held 1.02x their estimate under 1F1B at M = 4, resnet's device 2 1.04-1.07x."""
    result = compiled(tmp_path, EXAMPLES / f"{example}.py", 4, "1f1b", 4, "adam", recompute="never",
                      profile="measure", cache=False)  # fmt: skip
    measured = measure(result.folder, schedule="1f1b", micro_batches=4, optimizer="adam")
    assert_within(result, measured, f"{example} measured profile 1f1b M=4")


@pytest.mark.parametrize("schedule, micro_batches, optimizer", [("1f1b", 4, "adam"), ("gpipe", 8, "sgd")])
def test_a_weight_two_ops_of_a_stage_read(tmp_path, schedule, micro_batches, optimizer):
    """two_tower's projection head is called on both towers; mpipe puts both calls on device 1,
    whose backward holds a partial gradient of the head's weights from each call until they
    are summed, beside .grad: +26 kB over the estimate before it counted them."""
    result = compiled(tmp_path, EXAMPLES / "two_tower.py", 2, schedule, micro_batches, optimizer, method="mpipe",
                      recompute="never")  # fmt: skip
    stage = next(s for s in result.stages if s["device"] == 1)
    assert stage["cost"]["memory"]["activations"] >= 2 * stage["cost"]["memory"]["gradients"] > 0
    measured = measure(result.folder, schedule=schedule, micro_batches=micro_batches, optimizer=optimizer)
    assert_within(result, measured, f"two_tower mpipe {schedule} M={micro_batches} {optimizer}")


@pytest.mark.parametrize("schedule, micro_batches, optimizer", [("1f1b", 4, "adam"), ("gpipe", 8, "sgd"),
                                                                ("async", 8, "sgd")])  # fmt: skip
def test_devices_with_several_stages(tmp_path, schedule, micro_batches, optimizer):
    """mpipe puts resnet's 5 stages on 3 devices (interleaved 1F1B); a device's estimate counts
    the tensors its stages share once."""
    result = compiled(tmp_path, EXAMPLES / "resnet.py", 3, schedule, micro_batches, optimizer, method="mpipe",
                      recompute="never")  # fmt: skip
    devices = [stage["device"] for stage in result.stages]
    assert len(devices) > len(set(devices)), devices
    measured = measure(result.folder, schedule=schedule, micro_batches=micro_batches, optimizer=optimizer)
    assert_within(result, measured, f"resnet mpipe {schedule} M={micro_batches} {optimizer}")


def test_recompute_auto_recomputes_exactly_where_the_limit_requires(tmp_path):
    """A fixed split (method uniform) of a stack whose activations dominate, 3 devices under
    1F1B, so the first keeps the most micro-batches in flight. Brute force over all 8 choices
    of recomputing stages: by the estimate, the least one that fits a limit just above the other
    stages' plain memory recomputes stage 0 alone; `--recompute auto` chooses exactly that; the
    devices then measure within the limit; and in truth too stage 0 does not fit without
    recomputing."""
    model, settings = MODELS / "memory_stack.py", ("1f1b", 4, "sgd")
    plain = compiled(tmp_path / "never", model, 3, *settings, method="uniform", recompute="never")
    recomputed = compiled(tmp_path / "always", model, 3, *settings, method="uniform", recompute="always")
    estimate = {False: [s["cost"]["memory"]["total"] for s in plain.stages],
                True: [s["cost"]["memory"]["total"] for s in recomputed.stages]}  # fmt: skip
    assert [s["device"] for s in plain.stages] == [0, 1, 2]
    limit = max(estimate[True][0], estimate[False][1], estimate[False][2]) + 1
    assert estimate[False][0] > limit  # so stage 0 must recompute

    def fits(flags, memory) -> bool:
        return all(memory[flag][s] <= limit for s, flag in enumerate(flags))

    feasible = [flags for flags in itertools.product((False, True), repeat=3) if fits(flags, estimate)]
    # recomputing costs a forward again: the best choice recomputes the fewest stages
    least = min(feasible, key=sum)
    assert sum(least) == 1 and [flags for flags in feasible if sum(flags) == 1] == [least]

    auto = compiled(tmp_path / "auto", model, 3, *settings, method="uniform", recompute="auto", memory_limit=limit)
    assert [s["index"] for s in auto.stages] == [0, 1, 2]
    flags = tuple(s["recompute"] for s in auto.stages)
    assert flags == least == (True, False, False)
    measured = measure(auto.folder, schedule="1f1b", micro_batches=4, optimizer="sgd")
    assert all(measured.total(d) <= limit for d in range(3)), [measured.total(d) for d in range(3)]
    without = measure(auto.folder, schedule="1f1b", micro_batches=4, optimizer="sgd", recompute=set())
    assert without.total(0) > limit, (without.total(0), limit)


def test_the_tracker_counts_each_storage_once_and_frees_it():
    """The measurement itself: views and in-place results share their source's storage; a freed
    tensor's bytes leave the live count."""
    from tests.memory_truth import LiveStorages

    tracker = LiveStorages()
    with tracker, tracker.on(0):
        x = torch.ones(1000)  # 4000 bytes
        view = x[10:20]
        x.mul_(2)
        y = x + 1  # 4000 more
        assert tracker.live[0] == 8000 and tracker.peak[0] == 8000
        del y
        z = view * 2  # 40 bytes
        assert tracker.live[0] == 4040
        del x, view, z
    assert tracker.live[0] == 0 and tracker.peak[0] == 8000


def test_compile_and_explain_take_schedule_async(tmp_path, capsys):
    """`ftc compile --schedule async` sizes memory for async (stashed weights on every device but
    the ones without trainable parameters), and `ftc explain` names the plan."""
    from ftc.cli import main

    assert main(["compile", str(EXAMPLES / "mlp.py"), "--stages", "2", "-o", str(tmp_path), "--schedule", "async",
                 "--micro-batches", "4", "--optimizer", "sgd"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["explain", str(tmp_path / "mlp")]) == 0
    assert "memory: estimated at compile time for async with 4 micro-batches" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "mlp" / "pipeline.json").read_text())
    for stage in manifest["stages"]:
        memory = stage["cost"]["memory"]
        assert memory["stashed"] >= 2 * memory["gradients"] > 0, memory  # a version and its gradient at least
