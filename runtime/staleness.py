"""Asynchronous PipeDream-style training (schedule "async"): stage weights that move while
micro-batches are in flight, and what mitigates their staleness.

How a run goes (runtime/train.py drives it): steps are grouped into segments of
`staleness.flush_every` steps (cut short at checkpoints and at the end, so that a checkpoint
holds weights no micro-batch is in flight for, and a resumed run flushes where an uninterrupted
one does). A segment of K steps is one engine run over K * Mt micro-batches (Mt = micro_batches *
step_every, the micro-batches of one optimizer step) in textbook 1F1B order: a stage of depth d
(P - i for stage i of a chain) forwards micro-batch g right after its backward of g - d. So the
pipeline fills and drains once per segment, not once per step as under gpipe and 1f1b.

Each stage updates its own parameters right after its backward of a step's last micro-batch,
with the step's learning rate; the forwards after it see the new weights while the step's last
micro-batches are still on their way back. Micro-batch g of a segment starting at step t0 belongs
to step t0 + g // Mt, and stage i forwards it with the weights after max(0, (g - d + 1) // Mt)
of the segment's updates: the first d - 1 micro-batches of a step use weights one update behind
(for Mt >= d; PipeDream's case, Mt = 1, is up to d - 1 behind). The last stage (d = 1) is never
stale. Staleness mitigation:

- Weight stashing (always): a backward uses the weights its forward used, so every gradient is
  the exact gradient of the loss at some weights (PipeDream). Autograd needs it anyway: the
  update writes the parameters in place while earlier forwards' graphs hold them. A stage keeps
  one copy of its trainable parameters per version in flight (two, when Mt >= its depth).
- Weight prediction (`staleness.predict`; SpecTrain, FTPipe): a forward whose gradient will be
  applied k updates after the weights it sees (k = its step minus the stage's version) uses
  w - (lr_v + ... + lr_{v+k-1}) * u, where u is the direction of the optimizer's next update as
  its state says now: SGD's momentum buffer; Adam's m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps)
  (plus weight_decay * w for AdamW). The backward differentiates at those predicted weights.
- Gap-aware (`staleness.gap_aware`; Barkai, Hakimi and Schuster, ICLR 2020): at the backward, the
  gradient is divided elementwise by G = 1 + |w_now - w_used| / C, C being how far one update
  moves a weight, so G - 1 counts the updates the gradient missed. For SGD, C = lr * sqrt(v),
  v a running mean of squared step gradients (decay GAP_DECAY, bias-corrected) kept in the
  optimizer's state, so checkpoints carry it; for Adam and AdamW, whose steps are normalized,
  C = lr. A gradient taken at the current weights gets G = 1.

Parameters several stages hold (a tied embedding and LM head, a module used at two places) are
updated once per step with the sum of all their holders' gradients, so the copies stay equal:
after the last of the holders' backwards of the step's last micro-batch in the global order,
every holder applies the update before its next action (in mode dist after an all-reduce over
the holders' ranks, which reach that point of the order in that same order, so it cannot
deadlock). Every parameter thus changes at a fixed point of the simulated order, which is what
makes local and dist runs, and a resumed one, train alike. In a chain, the embedding's stage
finishes each step last, so it sees the shared update together with its own; the head's stage
sees it a few micro-batches after its own update. (Where a device holds several stages, the
simulation interleaves them and the versions follow from that order in the same way.)

The engine calls forward_weights before a stage forward (the weights to run it with, by name,
for torch.func.functional_call), after_backward after the backward, and apply_due before
each action, with the action's position in the global order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ftc.ir import FtcError

from .comm import PeerFailure, peer_reason, sum_over_holders
from .config import StalenessConfig
from .pipeline import Pipeline

GAP_DECAY = 0.999  # of SGD's running mean of squared gradients (as Adam's default beta2)
GAP_SQUARES = "gap_aware_sq"  # SGD's per-parameter state: that running mean, not bias-corrected
GAP_UPDATES = "gap_aware_updates"  # and how many updates it has seen


@dataclass
class SharedSet:
    """Parameters that the same stages hold (tied weights, a module used at two places), by
    their first names (pipeline.json's "tied"); `group`: the process group of their devices'
    ranks in mode dist when they span several, else None."""

    keys: list[str]
    stages: list[int]
    group: Any = None
    ranks: list[int] | None = None  # the group's ranks


def shared_sets(pipeline: Pipeline) -> list[SharedSet]:
    """The state keys (first names) held by several stages, grouped by the stages holding them;
    buffers too (StaleWeights keeps the trainable parameters)."""
    holders: dict[str, set[int]] = {}
    for stage in pipeline.stages:
        for key in stage.state:
            holders.setdefault(pipeline.tied.get(key, key), set()).add(stage.index)
    by_stages: dict[tuple[int, ...], list[str]] = {}
    for key, stages in sorted(holders.items()):
        if len(stages) > 1:
            by_stages.setdefault(tuple(sorted(stages)), []).append(key)
    return [SharedSet(keys, list(stages)) for stages, keys in sorted(by_stages.items())]


class StaleWeights:
    """The weight versions of one process's stages during async segments, and their updates."""

    def __init__(
        self,
        modules: dict[int, torch.nn.Module],
        optimizer: torch.optim.Optimizer | None,
        lr_at: Callable[[int], float],
        settings: StalenessConfig,
        step_micro_batches: int,
        first_name: dict[str, str] | None = None,
        shared: list[SharedSet] = (),
    ):
        """`modules`: this process's stages; `optimizer`: one optimizer over all their
        parameters, stepped for one stage (or one shared set) at a time; `lr_at(step)`: the
        learning rate of optimizer step `step`; `first_name`: pipeline.json's tied aliases ->
        their first names; `shared`: every set of parameters several stages hold."""
        first_name = first_name or {}
        self.params = {
            stage: [(name, p) for name, p in module.named_parameters() if p.requires_grad]
            for stage, module in modules.items()
        }
        self.optimizer = optimizer
        self.group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]} if optimizer else {}
        self.lr_at = lr_at
        self.settings = settings
        self.step_micro_batches = step_micro_batches
        # The shared sets with a stage here, their trainable parameters by first name.
        trainable = {first_name.get(name, name): p for params in self.params.values() for name, p in params}
        self.shared: list[SharedSet] = []
        self.shared_params: dict[str, torch.nn.Parameter] = {}
        for entry in shared:
            keys = [key for key in entry.keys if key in trainable]
            if keys and not set(entry.stages).isdisjoint(modules):
                self.shared.append(SharedSet(keys, entry.stages, entry.group, entry.ranks))
                self.shared_params.update((key, trainable[key]) for key in keys)
        self.set_of = {key: k for k, entry in enumerate(self.shared) for key in entry.keys}
        self.key_of = {(stage, name): first_name.get(name, name) for stage, params in self.params.items() for name, _ in params}
        self.first_step = 0
        self.updates = {stage: 0 for stage in modules}  # of the stage's own parameters, this segment
        self.shared_updates = [0] * len(self.shared)
        self.changes = {stage: 0 for stage in modules}  # updates of any of the stage's parameters
        # stage -> (key, the weights made for it): the latest made
        self.current: dict[int, tuple[tuple, dict[str, torch.Tensor]]] = {}
        self.in_flight: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (stage, micro-batch) -> weights used
        self.gradients: dict[int, dict[str, torch.Tensor]] = {}  # stage -> this step's summed gradients
        self.shared_gradients: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (set, step) -> sums by key
        self.due: list[tuple[int, int, int]] = []  # (position, set, step offset) of the run's shared updates

    def begin(self, first_step: int) -> None:
        """A new segment, starting at optimizer step `first_step` (the pipeline is empty)."""
        if self.in_flight or self.gradients or self.shared_gradients or self.due:
            raise AssertionError(f"a segment began with micro-batches in flight: {sorted(self.in_flight)}")
        self.first_step = first_step
        self.updates = dict.fromkeys(self.updates, 0)
        self.shared_updates = [0] * len(self.shared)
        self.current = {}

    def start(self, due: list[tuple[int, int, int]]) -> None:
        """The engine's run of the segment begins: when each shared set's step updates fall due,
        (position in the run's global order after which it applies, set, step offset)."""
        self.due = sorted(due)

    def apply_due(self, position: float) -> None:
        """Apply the shared updates due before the action at `position` of the global order (all
        of them at the run's end): every holder of a set applies them at the same point of the
        order, in mode dist after summing the holders' gradients over their ranks."""
        while self.due and self.due[0][0] < position:
            _, index, offset = self.due.pop(0)
            self._update_shared(index, self.first_step + offset)

    def step_of(self, micro_batch: int) -> int:
        return self.first_step + micro_batch // self.step_micro_batches

    def forward_weights(self, stage: int, micro_batch: int) -> dict[str, torch.Tensor]:
        """The weights stage `stage` runs micro-batch `micro_batch` with: its current ones, or
        predicted ones; the same tensors again for its backward (and a recomputed forward)."""
        weights = self.in_flight.get((stage, micro_batch))
        if weights is not None:
            return weights
        step = self.step_of(micro_batch)
        key = (self.changes[stage], step if self.settings.predict else None)
        if stage not in self.current or self.current[stage][0] != key:
            self.current[stage] = (key, self._weights(stage, step))
        weights = self.current[stage][1]
        self.in_flight[(stage, micro_batch)] = weights
        return weights

    def check_unwritten(self, stage: int, micro_batch: int) -> None:
        """A forward that writes a parameter in place (an nn.Embedding's max_norm, a clamp_ under
        no_grad) would write the stashed copy, and the change would be lost: refuse it."""
        for name, weight in self.in_flight[(stage, micro_batch)].items():
            if weight._version != 0:
                raise FtcError(f"stage {stage} changes parameter {name} in place in its forward (e.g. an embedding's "
                               "max_norm, a clamp_ under no_grad); schedule async runs forwards on stashed copies of "
                               "the weights, so the change would be lost", "train with schedule 1f1b or gpipe")  # fmt: skip

    def after_backward(self, stage: int, micro_batch: int) -> None:
        """Take the micro-batch's gradients off its weights into the step's sums; after a step's
        last micro-batch, update the stage's own parameters."""
        weights = self.in_flight.pop((stage, micro_batch))
        step = self.step_of(micro_batch)
        own = self.gradients.setdefault(stage, {})
        for name, param in self.params[stage]:
            leaf = weights[name]
            grad, leaf.grad = leaf.grad, None
            if grad is None:
                continue
            if self.settings.gap_aware and grad.is_sparse:
                raise FtcError(f"stage {stage}: staleness.gap_aware cannot scale the sparse gradient of {name}",
                               "set staleness.gap_aware=false, or build the embedding with sparse=False")  # fmt: skip
            if self.settings.gap_aware:
                grad = grad / self._gap(param, leaf, step)
            key = self.key_of[(stage, name)]
            summed = self.shared_gradients.setdefault((self.set_of[key], step), {}) if key in self.set_of else own
            summed[key] = grad if key not in summed else summed[key] + grad
        if micro_batch % self.step_micro_batches == self.step_micro_batches - 1:
            self._update(stage, step)

    def _weights(self, stage: int, step: int) -> dict[str, torch.Tensor]:
        """Fresh leaves holding the stage's weights (copies: the updates write the parameters
        in place); when predicting, each moved ahead over the updates it will miss before the
        gradient taken at it is applied (in `step`'s update)."""
        weights = {}
        with torch.no_grad():
            for name, param in self.params[stage]:
                key = self.key_of[(stage, name)]
                updates = self.shared_updates[self.set_of[key]] if key in self.set_of else self.updates[stage]
                version = self.first_step + updates
                weight = param.detach().clone()
                if self.settings.predict and step > version:
                    direction = self._direction(param)
                    if direction is not None:
                        weight = weight - sum(self.lr_at(u) for u in range(version, step)) * direction
                weights[name] = weight.requires_grad_()
        return weights

    def _direction(self, param: torch.nn.Parameter) -> torch.Tensor | None:
        """The direction of the optimizer's next update of `param` (the update is -lr times it),
        as far as its state tells; None before its first update."""
        state = self.optimizer.state.get(param, {})
        group = self.group_of[id(param)]
        if "momentum_buffer" in state and state["momentum_buffer"] is not None:
            return state["momentum_buffer"]
        if "exp_avg" in state:
            beta1, beta2 = group["betas"]
            step = float(state["step"])
            first = state["exp_avg"] / (1 - beta1**step)
            second = state["exp_avg_sq"] / (1 - beta2**step)
            direction = first / (second.sqrt() + group["eps"])
            if isinstance(self.optimizer, torch.optim.AdamW):
                direction = direction + group["weight_decay"] * param.detach()
            return direction
        return None

    def _gap(self, param: torch.nn.Parameter, used: torch.Tensor, step: int) -> torch.Tensor | float:
        """Barkai et al.'s G = 1 + |w_now - w_used| / C, elementwise; 1 where SGD has no
        measure of C yet."""
        gap = (param.detach() - used.detach()).abs()
        if not isinstance(self.optimizer, torch.optim.SGD):
            return 1 + gap / self.lr_at(step)
        state = self.optimizer.state.get(param, {})
        if GAP_SQUARES not in state:
            return 1.0
        distance = self.lr_at(step) * (state[GAP_SQUARES] / (1 - GAP_DECAY ** state[GAP_UPDATES])).sqrt()
        return torch.where(distance > 0, 1 + gap / distance.clamp(min=torch.finfo(distance.dtype).tiny), 1.0)

    def _update(self, stage: int, step: int) -> None:
        summed = self.gradients.pop(stage, {})
        self.updates[stage] += 1
        self.changes[stage] += 1
        own = [(param, summed.get(self.key_of[(stage, name)])) for name, param in self.params[stage]
               if self.key_of[(stage, name)] not in self.set_of]  # fmt: skip
        self._step(own, step)

    def _update_shared(self, index: int, step: int) -> None:
        entry = self.shared[index]
        summed = self.shared_gradients.pop((index, step), {})
        params = [(key, self.shared_params[key]) for key in entry.keys]
        if entry.group is not None:
            try:
                grads = sum_over_holders([summed.get(key) for key, _ in params], [p for _, p in params], entry.group)
            except RuntimeError as exc:
                raise PeerFailure(f"summing the gradients of {', '.join(entry.keys)} over ranks {entry.ranks} at step "
                               f"{step + 1} failed: one of those ranks died or hangs ({peer_reason(exc)})",
                               "check that rank's log; raise timeout_s if its stages are that slow") from exc  # fmt: skip
            summed = {key: grad for (key, _), grad in zip(params, grads) if grad is not None}
        self.shared_updates[index] += 1
        for stage in entry.stages:
            if stage in self.changes:
                self.changes[stage] += 1
        self._step([(param, summed.get(key)) for key, param in params], step)

    def _step(self, params: list[tuple[torch.nn.Parameter, torch.Tensor | None]], step: int) -> None:
        """One optimizer step of these parameters alone (the others hold no gradient)."""
        if self.optimizer is None or all(grad is None for _, grad in params):
            return
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        for param, grad in params:
            param.grad = grad
            if grad is not None and self.settings.gap_aware and isinstance(self.optimizer, torch.optim.SGD):
                self._track_squares(param, grad)
        self.optimizer.step()
        for param, _ in params:
            param.grad = None

    def _track_squares(self, param: torch.nn.Parameter, grad: torch.Tensor) -> None:
        state = self.optimizer.state[param]
        squares = state.get(GAP_SQUARES)
        squares = torch.zeros_like(param) if squares is None else squares
        state[GAP_SQUARES] = squares.mul_(GAP_DECAY).addcmul_(grad, grad, value=1 - GAP_DECAY)
        state[GAP_UPDATES] = state.get(GAP_UPDATES, 0) + 1
