"""Which parameters and buffers an op writes inside itself, where no argument of the IR says so.

A leaf module's call (a BatchNorm updating its running statistics, an Embedding with max_norm
renormalizing rows of its weight) and some functions (F.batch_norm in training mode) write the
model's state although the IR node mutates none of its arguments. Each device holds its own
copy of the state, so the partitioner must keep such a write with every reader of what it
writes (Node.updates); this module finds the writes by running the op on the meta device under
a dispatch mode that watches every aten op's written arguments.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ftc.ir import Graph, Node
from ftc.repeats import module_state, tensors_in

# native_batch_norm's schema declares no write of the running statistics it updates in
# training mode (its functional successor _native_batch_norm_legit does): positions of
# running_mean, running_var and the training flag.
_UNDECLARED_WRITES = {torch.ops.aten.native_batch_norm.default: ((3, 4), 5)}


class _Writes(TorchDispatchMode):
    """Collects the storages of the tensors that aten ops write in place."""

    def __init__(self):
        super().__init__()
        self.storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for position, argument in enumerate(func._schema.arguments):
            if argument.alias_info is not None and argument.alias_info.is_write:
                value = kwargs[argument.name] if argument.name in kwargs else args[position] if position < len(args) else None
                self.storages.update(storage_key(t) for t in tensors_in(value))
        if func in _UNDECLARED_WRITES:
            written, training = _UNDECLARED_WRITES[func]
            if len(args) > training and args[training]:
                self.storages.update(storage_key(args[k]) for k in written if isinstance(args[k], torch.Tensor))
        return func(*args, **kwargs)


def storage_key(tensor: torch.Tensor) -> int:
    """What tells a tensor's storage: views and in-place results share it."""
    return tensor.untyped_storage()._cdata


class StateWrites:
    """Finds Node.updates while an interpreter runs a graph on the meta device: `run` wraps one
    node's execution. Repeats of an op (same key, ftc/repeats.py) write the same positions among
    their arguments' and module's tensors, so a replayed node takes its writes from the first."""

    def __init__(self, graph: Graph, model: torch.nn.Module):
        self.model = model
        self.state_names: dict[int, str] = {}
        for name, tensor in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
            self.state_names.setdefault(storage_key(tensor), graph.canonical(name))
        self.state_reads = {node.name for node in graph.nodes if node.op == "get_attr" and node.target in graph.state}
        self.positions: dict[Hashable, list[int]] = {}  # repeat key -> written positions
        self.updates: dict[str, list[str]] = {}
        self.watching: _Writes | None = None  # the watch over the node being run
        self.ran_as: torch.nn.Module | None = None  # its CPU copy, where it runs as one

    def runs_as(self, real: torch.nn.Module) -> None:
        """The node being run runs as `real`, a CPU copy of its module, as the meta device could
        not run it (interpreter.run_on_cpu): its writes land in the copy's state, in the same
        order. What was written before (the copy's random initialization, the failed meta run)
        is not the node's or is run again."""
        self.ran_as = real
        if self.watching is not None:
            self.watching.storages.clear()

    def watches(self, node: Node) -> bool:
        """Whether the node may write state no argument names: a leaf module's call, or an op that
        takes a parameter or buffer and mutates none of its arguments."""
        if node.mutates is not None or not node.is_compute:
            return False
        return node.op == "call_module" or any(name in self.state_reads for name in node.refs())

    def run(self, node: Node, key: Hashable | None, args: tuple, kwargs: dict, execute) -> Any:
        """execute() under watch where the node may write state; its writes go to `updates`, and
        their positions under the node's repeat key, for its repeats."""
        if not self.watches(node):
            return execute()
        writes = self.watching = _Writes()
        self.ran_as = None
        try:
            with writes:
                out = execute()
        finally:
            self.watching = None
        ran = tensors_in((args, kwargs)) + ([*self.ran_as.parameters(), *self.ran_as.buffers()]
                                            if self.ran_as is not None else module_state(self.model, node))  # fmt: skip
        positions = [k for k, t in enumerate(ran) if storage_key(t) in writes.storages]
        tensors = self._tensors(node, args, kwargs)
        if key is not None:
            self.positions.setdefault(key, positions)
        self._record(node, positions, tensors)
        return out

    def replayed(self, node: Node, key: Hashable, args: tuple, kwargs: dict) -> None:
        """A repeat of the op recorded under `key` stood in for running `node`."""
        if self.watches(node) and key in self.positions:
            self._record(node, self.positions[key], self._tensors(node, args, kwargs))

    def _tensors(self, node: Node, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        return tensors_in((args, kwargs)) + module_state(self.model, node)

    def _record(self, node: Node, positions: list[int], tensors: list[torch.Tensor]) -> None:
        names = (self.state_names.get(storage_key(tensors[k])) for k in positions)
        written = sorted({name for name in names if name is not None})
        if written:
            self.updates[node.name] = written
