"""One node timed by itself, on copies of its inputs cut from any graph, as a one-op stage is
called: save-memory mode times every node so, in context the ops that give a kind's cost."""

from __future__ import annotations

import contextlib
import statistics
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils._pytree import tree_map

from ftc.ir import Node
from ftc.repeats import tensors_in

from . import calibration
from .measurement import NodeProfile

if TYPE_CHECKING:
    from .in_context import InContext
    from .save_memory import SaveMemory


def time_alone(
    interpreter: InContext | SaveMemory, node: Node, args: tuple, kwargs: dict, state: list[torch.Tensor],
    overhead: float, first_run: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[NodeProfile, Any, tuple]:
    """`node` run by itself on copies of `args` and `kwargs` cut from any graph, forward and
    backward to its inputs and `state` (gradients returned, not accumulated),
    `warmup + repeats` times in a row, as a one-op stage is called: medians, the forward less
    `overhead` (what timing adds), the backward less an engine start (the stage call has it).
    Also the last run's output and cut positional arguments; `first_run` wraps the first
    forward (save-memory mode counts the bytes it saves)."""
    clock, settings = interpreter.clock, interpreter.settings
    fwd, bwd = [], []
    for run in range(settings.warmup + settings.repeats):
        leaves: list[torch.Tensor] = []
        cut_args, cut_kwargs = _cut((args, kwargs), leaves, node.mutates is not None, settings.device)
        targets = leaves + [t for t in state if t.requires_grad]
        with first_run() if run == 0 else contextlib.nullcontext():
            clock.sync()
            start = clock.stamp()
            out = interpreter.execute(node, cut_args, cut_kwargs)
            end = clock.stamp()
        outputs = floating_outputs(out)
        backward = bool(outputs and targets)
        engine_start = calibration.engine_start(clock, settings.device, calibration.RUN_TRIES) if backward else 0.0
        back_start = clock.stamp()
        if backward:
            torch.autograd.grad(outputs, targets, [torch.ones_like(t) for t in outputs], allow_unused=True)
        back_end = clock.stamp()
        clock.sync()
        if run >= settings.warmup:
            fwd.append(max(clock.seconds(start, end) - overhead, 0.0))
            bwd.append(max(clock.seconds(back_start, back_end) - engine_start, 0.0) if backward else 0.0)
    return NodeProfile(statistics.median(fwd), statistics.median(bwd)), out, cut_args


def _cut(value: Any, leaves: list[torch.Tensor], mutating: bool, device: str) -> Any:
    """Copies of the values on the device, cut from any graph: those that require grad become
    leaves (collected in `leaves`), cloned when the node writes in place, as autograd forbids
    in-place writes to leaves."""

    def move(tensor: Any) -> Any:
        if not isinstance(tensor, torch.Tensor):
            return tensor
        moved = tensor.detach().to(device, copy=True)
        if not tensor.requires_grad:
            return moved
        leaves.append(moved.requires_grad_())
        return moved.clone() if mutating else moved

    return tree_map(move, value)


def floating_outputs(output: Any) -> list[torch.Tensor]:
    return [t for t in tensors_in(output) if t.requires_grad and t.grad_fn is not None]
