"""The training loss as the profiles see it.

The runtime computes loss_fn(outputs, target) on the device of the stage that holds the model's
outputs (runtime/device_runner.py) and starts the backward from it, so that stage pays the loss's
forward and backward. To price it, a profile runs the model file's loss_fn on the model's
outputs with a target made the way the runtime's data sets make one (runtime/data.py):

1. the model file's `example_targets(batch_size)`, when it defines one;
2. else the synthetic data set's candidates (runtime/data.py target_candidates): uniform
   numbers in [0, 1) shaped like all the outputs, then, for each output tensor, one tensor shaped
   like it and its class indices (without the class dimension: dim 1, torch's losses, or the
   last, a language model's logits, which its loss flattens).

Of these, choose_target picks the target as the synthetic data set does: class indices where
loss_fn takes them and refuses numbers of their shape, else the first on which loss_fn returns a
one-element tensor with a gradient. A model file without a loss_fn, or whose loss_fn accepts
none of these (it wants a dict of labels, say), gets no loss cost, and no error: the loss is
then left out of the stage costs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_map

from ftc.repeats import tensors_in
from ftc.runtime.comm import differentiable
from ftc.runtime.data import OutputSpec, choose_target, drawn, map_with_dims, target_candidates
from ftc.runtime.model_file import ModelFile


def as_leaves(outputs: Any) -> Any:
    """The outputs cut from the model's graph, as the loss stage receives them: floating tensors
    that require grad become leaves."""

    def leaf(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        cut = value.detach()
        return cut.requires_grad_() if value.requires_grad and differentiable(value) else cut

    return tree_map(leaf, outputs)


def _spec(output: torch.Tensor, batch_size: int) -> OutputSpec:
    """An output as the synthetic data set describes it, at the profile's full batch size: its
    batch dimension is taken to be the first, when that has the batch's size."""
    batch_dim = 0 if output.dim() and output.shape[0] == batch_size else None
    return OutputSpec(tuple(output.shape), str(output.dtype).removeprefix("torch."), batch_dim)


def loss_target(model_file: ModelFile, outputs: Any, batch_size: int, device: str) -> Any | None:
    """The target (see the module doc) on which loss_fn gives a scalar with a gradient; None when
    the model file has no loss_fn or none works. `outputs` are leaves (as_leaves)."""
    if model_file.loss_fn is None or not any(t.requires_grad for t in tensors_in(outputs)):
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        example_targets = getattr(model_file.module, "example_targets", None)
        if callable(example_targets):
            try:
                targets = example_targets(batch_size)
            except Exception:  # the runtime's data set reports it; here it only means no target
                return None
            targets = tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, targets)
            return targets if _takes(model_file, outputs, targets) else None
        drawn_targets: dict[int, Any] = {}

        def takes(candidate: Any) -> bool:
            try:
                target = map_with_dims(lambda spec, _: drawn(spec, list(spec.shape), device), candidate, 0)
            except RuntimeError:  # uniform numbers for an integer output: not a target
                return False
            drawn_targets[id(candidate)] = target
            return _takes(model_file, outputs, target)

        specs = tree_map(lambda t: _spec(t, batch_size) if isinstance(t, torch.Tensor) else t, outputs)
        chosen = choose_target(target_candidates(specs), takes)
    return None if chosen is None else drawn_targets[id(chosen)]


def _takes(model_file: ModelFile, outputs: Any, target: Any) -> bool:
    try:
        loss = model_file.loss_fn(outputs, target)
    except Exception:  # a target of the wrong kind
        return False
    return isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad
