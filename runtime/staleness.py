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

The engine calls forward_weights before a stage forward (the weights to run it with, by name,
for torch.func.functional_call) and after_backward after the backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ftc.ir import FtcError

from .config import StalenessConfig

GAP_DECAY = 0.999  # of SGD's running mean of squared gradients (as Adam's default beta2)
GAP_SQUARES = "gap_aware_sq"  # SGD's per-parameter state: that running mean, not bias-corrected
GAP_UPDATES = "gap_aware_updates"  # and how many updates it has seen


class StaleWeights:
    """The weight versions of one process's stages during async segments, and their updates."""

    def __init__(
        self,
        modules: dict[int, torch.nn.Module],
        optimizer: torch.optim.Optimizer | None,
        lr_at: Callable[[int], float],
        settings: StalenessConfig,
        step_micro_batches: int,
    ):
        """`modules`: this process's stages (no parameter in two of them: runtime/train.py
        refuses that); `optimizer`: one optimizer over all their parameters, stepped for one stage
        at a time; `lr_at(step)`: the learning rate of optimizer step `step`."""
        self.params = {
            stage: [(name, p) for name, p in module.named_parameters() if p.requires_grad]
            for stage, module in modules.items()
        }
        self.optimizer = optimizer
        self.group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]} if optimizer else {}
        self.lr_at = lr_at
        self.settings = settings
        self.step_micro_batches = step_micro_batches
        self.first_step = 0
        self.updates = {stage: 0 for stage in modules}
        # stage -> ((version, lookahead), the weights of that version): the latest one made
        self.current: dict[int, tuple[tuple[int, int], dict[str, torch.Tensor]]] = {}
        self.in_flight: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (stage, micro-batch) -> weights used
        self.gradients: dict[int, dict[str, torch.Tensor]] = {}  # stage -> this step's summed gradients

    def begin(self, first_step: int) -> None:
        """A new segment, starting at optimizer step `first_step` (the pipeline is empty)."""
        if self.in_flight or self.gradients:
            raise AssertionError(f"a segment began with micro-batches in flight: {sorted(self.in_flight)}")
        self.first_step = first_step
        self.updates = dict.fromkeys(self.updates, 0)
        self.current = {}

    def step_of(self, micro_batch: int) -> int:
        return self.first_step + micro_batch // self.step_micro_batches

    def forward_weights(self, stage: int, micro_batch: int) -> dict[str, torch.Tensor]:
        """The weights stage `stage` runs micro-batch `micro_batch` with: its current ones, or
        predicted ones; the same tensors again for its backward (and a recomputed forward)."""
        weights = self.in_flight.get((stage, micro_batch))
        if weights is not None:
            return weights
        version = self.first_step + self.updates[stage]
        lookahead = self.step_of(micro_batch) - version if self.settings.predict else 0
        key = (version, lookahead)
        if stage not in self.current or self.current[stage][0] != key:
            self.current[stage] = (key, self._weights(stage, version, lookahead))
        weights = self.current[stage][1]
        self.in_flight[(stage, micro_batch)] = weights
        return weights

    def after_backward(self, stage: int, micro_batch: int) -> None:
        """Take the micro-batch's gradients off its weights into the step's sum; after a step's
        last micro-batch, update the stage."""
        weights = self.in_flight.pop((stage, micro_batch))
        step = self.step_of(micro_batch)
        summed = self.gradients.setdefault(stage, {})
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
            summed[name] = grad if name not in summed else summed[name] + grad
        if micro_batch % self.step_micro_batches == self.step_micro_batches - 1:
            self._update(stage, step)

    def _weights(self, stage: int, version: int, lookahead: int) -> dict[str, torch.Tensor]:
        """Fresh leaves holding the stage's weights (copies: the update writes the parameters in
        place), moved `lookahead` updates ahead when predicting."""
        learning_rate = sum(self.lr_at(step) for step in range(version, version + lookahead))
        weights = {}
        with torch.no_grad():
            for name, param in self.params[stage]:
                weight = param.detach().clone()
                if lookahead:
                    direction = self._direction(param)
                    if direction is not None:
                        weight -= learning_rate * direction
                weights[name] = weight.requires_grad_()
        return weights

    def _direction(self, param: torch.nn.Parameter) -> torch.Tensor | None:
        """The direction of the optimizer's next update of `param` (the update is -lr times it),
        as far as its state tells; None before its first update."""
        state = self.optimizer.state.get(param, {})
        group = self._group(param)
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
        if self.optimizer is None or not summed:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        params = [(param, summed.get(name)) for name, param in self.params[stage]]
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

    def _group(self, param: torch.nn.Parameter) -> dict:
        return self.group_of[id(param)]
