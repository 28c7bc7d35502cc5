"""Overflow guards: a branch on whether a tensor holds non-finite values.

transformers' DETR family (DETR, Conditional and Deformable DETR, Table Transformer, RT-DETR,
D-FINE, Grounding DINO, OmDet-Turbo, OneFormer) repairs an encoder layer's output while training
where it overflowed:

    if not torch.isfinite(hidden_states).all():
        clamp_value = torch.finfo(hidden_states.dtype).max - 1000
        hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)

The check is Python branching on a tensor's value, which torch.export cannot trace. While
export traces, such a check (`torch.isfinite(x).all()`, `torch.isinf(x).any()`,
`torch.isnan(x).any()`, `x.isnan().sum() == 0`) reads as "all finite", the value it has at every step of a training that
has not diverged, so the stages compute what forward does wherever the values are finite and
leave the repair out. Taking the branch instead would write the float32 bound as a constant,
which a bfloat16 tensor under `"precision": "bf16"` cannot be clamped to.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from .common import CodeFiles, user_frames

# the masks of finite values, and of non-finite ones
_FINITE = {torch.isfinite, torch.Tensor.isfinite}
_NOT_FINITE = {torch.isinf, torch.Tensor.isinf, torch.isnan, torch.Tensor.isnan}
# the checks over a whole mask: all() of a finite mask, any() of a non-finite one; where every
# value is finite, each says what its mask's kind is (all finite: True; any not finite: False)
_WHOLE_CHECKS = {(True, torch.all), (True, torch.Tensor.all), (False, torch.any), (False, torch.Tensor.any)}
# the count of a non-finite mask's values (`x.isnan().sum()`), 0 where every value is finite, and
# what comparing it with 0 says then: I-BERT's `assert x_max.isnan().sum() == 0` while training
_COUNTS = {torch.sum, torch.Tensor.sum}
_COUNT_COMPARISONS = {torch.Tensor.__eq__: True, torch.eq: True, torch.Tensor.__ne__: False, torch.ne: False,
                      torch.Tensor.__gt__: False, torch.gt: False}  # fmt: skip


class OverflowGuards(TorchFunctionMode):
    """While export traces forward, a whole-tensor check for non-finite values says that there
    are none, and the lines of the branches it decided are kept (`lines`)."""

    def __init__(self, code: CodeFiles):
        super().__init__()
        self.code = code
        self.lines: list[str] = []
        self.masks: dict[int, tuple[bool, torch.Tensor]] = {}  # by id: finite?, the mask (kept alive)
        self.checks: dict[int, tuple[bool, torch.Tensor]] = {}  # by id: what it says, the check
        self.counts: dict[int, torch.Tensor] = {}  # by id: a non-finite mask's count (kept alive)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__bool__ and id(args[0]) in self.checks:
            line = next(reversed(user_frames(self.code)), "")
            if line and line not in self.lines:
                self.lines.append(line)
            return self.checks[id(args[0])][0]
        result = func(*args, **kwargs)
        if func in _FINITE or func in _NOT_FINITE:
            self.masks[id(result)] = (func in _FINITE, result)
        elif args and not kwargs and len(args) == 1 and id(args[0]) in self.masks:
            finite, mask = self.masks[id(args[0])]
            if mask is args[0] and (finite, func) in _WHOLE_CHECKS:
                self.checks[id(result)] = (finite, result)
            elif mask is args[0] and not finite and func in _COUNTS:
                self.counts[id(result)] = result
        elif len(args) == 2 and func in _COUNT_COMPARISONS and id(args[0]) in self.counts:
            if self.counts[id(args[0])] is args[0] and type(args[1]) is int and args[1] == 0:
                self.checks[id(result)] = (_COUNT_COMPARISONS[func], result)
        return result


def overflow_note(lines: list[str]) -> list[str]:
    if not lines:
        return []
    return [
        f"forward checks a tensor for non-finite values at {', '.join(lines)} (an overflow guard); torch.export "
        "cannot branch on a value, so the stages compute what forward does where all values are finite and leave "
        "out what it does with overflowed ones (transformers' clamp, I-BERT's assert), which only a diverged "
        "training needs"
    ]
