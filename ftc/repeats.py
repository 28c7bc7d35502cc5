"""Repeated ops on the meta device: the blocks of a transformer run the same ops, with the same
settings, on arguments of the same shapes, thousands of times in a large model. Passes that run
the IR on the meta device (value metadata, the analytic profile) work each distinct op out once
and stand in fresh tensors of the same metadata for its repeats.

A Repeats lives for one run of one pass; nothing is kept between calls.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from ftc.ir import Node


class _Unkeyable(Exception):
    """An argument or module attribute that a repeat key cannot describe."""


def frozen(value: Any) -> Hashable:
    """A hashable description of an argument or module attribute: tensors by their metadata,
    containers item by item, other hashable objects (numbers, dtypes, functions) as themselves.
    Raises _Unkeyable for anything else."""
    if isinstance(value, torch.Tensor):
        layout = (tuple(value.shape), value.stride(), value.storage_offset())
        return (type(value), value.device, value.dtype, value.requires_grad, *layout)
    if isinstance(value, (tuple, list)):
        return (type(value), *(frozen(item) for item in value))
    if isinstance(value, dict):
        return (dict, *((key, frozen(item)) for key, item in value.items()))
    if isinstance(value, slice):
        return (slice, frozen(value.start), frozen(value.stop), frozen(value.step))
    if isinstance(value, (set, frozenset)):
        return (set, frozenset(frozen(item) for item in value))
    try:
        hash(value)
    except TypeError:
        raise _Unkeyable from None
    return (type(value), value)  # typed, since 1 == 1.0 == True


def module_key(module: torch.nn.Module) -> Hashable:
    """Everything a module's forward may read: its class, attributes, tensors and submodules."""
    items = []
    for name, value in vars(module).items():
        if name == "_modules":
            items.append((name, tuple((key, module_key(child)) for key, child in value.items())))
        else:
            items.append((name, frozen(value)))
    return (type(module), tuple(items))


def repeat_key(node: Node, model: torch.nn.Module, args: tuple, kwargs: dict) -> Hashable | None:
    """Equal keys mean the same op, module settings, grad mode and argument metadata, hence the
    same outputs' metadata and the same costs. None for a node that must be run on its own: one
    that updates an argument in place, or takes an argument a key cannot describe."""
    if node.mutates is not None or not node.is_compute:
        return None
    try:
        target = module_key(model.get_submodule(node.target)) if node.op == "call_module" else node.target
        return (node.op, target, node.grad_enabled, frozen(args), frozen(kwargs))
    except _Unkeyable:
        return None


@dataclass(frozen=True)
class _TensorSpec:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool

    def make(self) -> torch.Tensor:
        tensor = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device="meta")
        # a clone is computed from a leaf, as an op's output is: in-place ops may write to it
        return tensor.requires_grad_().clone() if self.requires_grad else tensor


@dataclass(frozen=True)
class _SequenceSpec:
    kind: type  # tuple or list
    items: tuple


_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device, torch.Size)


def _template(value: Any, inputs: list[torch.Tensor], state: list[torch.Tensor]) -> Any:
    """What `_build` needs to make a value like `value`; _Unkeyable where a stand-in could differ:
    a view or an alias of an input or of the model's state (later in-place updates would reach
    it), a leaf that requires grad (a module's own parameter, or the output of a module run for
    real by interpreter.run_on_cpu, which may read values), a value of an unusual type."""
    if isinstance(value, torch.Tensor):
        aliased = any(value is t for t in inputs) or any(value is t for t in state)
        leaf = value.requires_grad and value.grad_fn is None
        if aliased or leaf or value._is_view() or type(value) is not torch.Tensor or value.device.type != "meta":
            raise _Unkeyable
        spec = _TensorSpec(tuple(value.shape), value.stride(), value.dtype, value.requires_grad)
        made = spec.make()
        if made.stride() != spec.stride or value.storage_offset() != 0:
            raise _Unkeyable
        return spec
    if type(value) in (tuple, list):
        return _SequenceSpec(type(value), tuple(_template(item, inputs, state) for item in value))
    if isinstance(value, _PLAIN):
        return value
    raise _Unkeyable


def _build(template: Any) -> Any:
    if isinstance(template, _TensorSpec):
        return template.make()
    if isinstance(template, _SequenceSpec):
        return template.kind(_build(item) for item in template.items)
    return template


def tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors inside a value (nested tuples, lists and dicts), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in tensors_in(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in tensors_in(item)]
    return []


def module_state(model: torch.nn.Module, node: Node) -> list[torch.Tensor]:
    """The parameters and buffers of the module a call_module node calls ([] for other ops)."""
    if node.op != "call_module":
        return []
    module = model.get_submodule(node.target)
    return [*module.parameters(), *module.buffers()]


class Repeats:
    """Outputs of the ops run so far, by repeat_key, as templates for their repeats."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.templates: dict[Hashable, Any] = {}  # key -> template, or None: run every time

    def replay(self, key: Hashable | None) -> tuple[bool, Any]:
        """(True, fresh outputs) for a repeat of an op recorded before; (False, None) otherwise."""
        if key is None or self.templates.get(key) is None:
            return False, None
        return True, _build(self.templates[key])

    def record(self, key: Hashable | None, node: Node, args: Any, out: Any) -> None:
        """Remember `out`, which the node made from `args`, for the node's repeats."""
        if key is None or key in self.templates:
            return
        try:
            self.templates[key] = _template(out, tensors_in(args), module_state(self.model, node))
        except _Unkeyable:
            self.templates[key] = None
