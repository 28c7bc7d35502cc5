"""The fixed costs a measured profile subtracts from its times (what timing a node adds, a
backward hook, an engine start) or adds once per stage (a stage call).

Node times are medians over the repeats, which resist the odd slow run, less what timing a
node adds (the clock's stamps, the interpreter's dispatch), which stage code does not pay;
the calibrations (that overhead, a hook, an engine start, a stage call) take the fastest try,
as they want a fixed cost, not the noise. The engine start is taken anew right before each
timed backward it is subtracted from: a machine's speed drifts (on a shared one, 2x within
seconds), and an engine start taken once, in a slow moment, would swallow a fast backward."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ftc.interpreter import Interpreter
from ftc.ir import Node

from .clock import Clock
from .measurement import NodeProfile

if TYPE_CHECKING:
    from .in_context import InContext
    from .save_memory import SaveMemory

# Tries of each calibration (hook cost, engine start), whatever the settings: they are cheap,
# and their fastest try must be a warm one.
CALIBRATION_TRIES = 8
RUN_TRIES = 3  # tries of the engine-start calibration taken before each timed backward


def engine_start(clock: Clock, device: str, tries: int = CALIBRATION_TRIES) -> float:
    """What one autograd call costs with nothing to compute: a backward through a view, the
    fastest of `tries`. Taken right before each backward it is subtracted from, so that both
    run at the machine's speed of the moment (which drifts, on a shared machine by 2x within
    seconds: an engine start taken once, in a slow moment, made fast backwards come out at 0)."""
    leaf = torch.zeros(1, device=device, requires_grad=True)
    grad = torch.ones(1, device=device)
    fastest = float("inf")
    for _ in range(tries):
        out = leaf.view(1)
        start = clock.stamp()
        torch.autograd.grad(out, leaf, grad)
        end = clock.stamp()
        clock.sync()
        fastest = min(fastest, clock.seconds(start, end))
    return fastest


class _ViewStage(torch.nn.Module):
    """The least a stage can be: its forward returns a view of its input."""

    def forward(self, value: torch.Tensor) -> tuple[torch.Tensor]:
        return (value.view_as(value),)


def stage_call(clock: Clock, device: str) -> NodeProfile:
    """What calling a stage costs beyond its nodes, forward (the module call) and backward (the
    engine's start, the gradient of its input): a _ViewStage run the way a pipeline runs a
    stage, on a received leaf, the fastest of a few tries each."""
    stage = _ViewStage()
    grad = torch.ones(16, device=device)
    fastest = [float("inf"), float("inf")]
    for _ in range(CALIBRATION_TRIES):
        received = torch.zeros(16, device=device, requires_grad=True)
        clock.sync()
        start = clock.stamp()
        (out,) = stage(received)
        middle = clock.stamp()
        torch.autograd.backward([out], [grad])
        end = clock.stamp()
        clock.sync()
        fastest = [min(fastest[0], clock.seconds(start, middle)), min(fastest[1], clock.seconds(middle, end))]
    return NodeProfile(fastest[0], fastest[1])


def hook_cost(clock: Clock, device: str) -> float:
    """Seconds one backward hook adds: a chain of cheap ops backpropagated with and without
    hooks, the fastest of a few tries each (the calibration wants the cost, not the noise)."""
    chain = 64
    leaf = torch.zeros(16, device=device, requires_grad=True)
    fastest = {True: float("inf"), False: float("inf")}
    for _ in range(CALIBRATION_TRIES):
        for hooked in (False, True):
            value = leaf
            grad_fns = []
            for _ in range(chain):
                value = value * 1.0
                grad_fns.append(value.grad_fn)
            if hooked:
                stamps = []
                for grad_fn in grad_fns:
                    grad_fn.register_hook(lambda *_: stamps.append(clock.stamp()))
            clock.sync()
            start = clock.stamp()
            value.backward(torch.ones_like(value))
            end = clock.stamp()
            clock.sync()
            fastest[hooked] = min(fastest[hooked], clock.seconds(start, end))
    return max(fastest[True] - fastest[False], 0.0) / chain


def timing_overhead(interpreter: InContext | SaveMemory) -> float:
    """Seconds that timing a node adds to its op, which stage code calling the op directly does
    not pay: the clock's stamps and the interpreter's dispatch (converting arguments, finding
    the callable). It is the time of a node whose op costs next to nothing (operator.pos on an
    int), the fastest of a few tries of many calls each."""
    node = Node("calibration", "call_function", "operator.pos", (1,))
    clock = interpreter.clock
    calls = 100
    fastest = float("inf")
    for _ in range(CALIBRATION_TRIES):
        stamps = []
        for _ in range(calls):
            start = clock.stamp()
            Interpreter.run_node(interpreter, node, (1,), {})  # what a timed node runs
            stamps.append((start, clock.stamp()))
        clock.sync()
        fastest = min(fastest, sum(clock.seconds(start, end) for start, end in stamps))
    return fastest / calls
