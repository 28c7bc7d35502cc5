"""The save-memory mode of a measured profile (measure.py), for models larger than the device:
the model stays on the meta device, each node runs alone with only its own parameters on the
device, and activations live on the host."""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import replace
from typing import Any, Iterator

import torch
from torch.utils._pytree import tree_map

from ftc.interpreter import Interpreter, copy_module, tensor_constant
from ftc.ir import FtcError, Graph, Node
from ftc.passes.partition.problem import is_view_op
from ftc.runtime.comm import differentiable

from . import calibration
from .clock import Clock
from .measurement import MeasureSettings, Measurement, NodeProfile, to_host
from .saved_bytes import SavedBytes
from .time_alone import time_alone

# Training holds parameters, gradients and optimizer state (two more copies for Adam) plus
# activations, so a model whose parameters take a quarter of the device is profiled in
# save-memory mode.
SAVE_MEMORY_FRACTION = 0.25


def device_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def wants_save_memory(graph: Graph, settings: MeasureSettings) -> bool:
    if settings.save_memory is not None:
        return settings.save_memory
    parameter_bytes = sum(t.meta.nbytes for t in graph.state.values())
    return parameter_bytes > SAVE_MEMORY_FRACTION * device_memory(settings.device)


def initial_state(name: str, like: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A value for the parameter or buffer `name` shaped like `like` (any device, meta too):
    random for floating parameters (seeded by the name, so a tensor read by several nodes gets
    the same value each time), ones for floating buffers, True for masks, zero for counters."""
    if like.dtype == torch.bool:
        return torch.ones(like.shape, dtype=torch.bool, device=device)
    if not like.is_floating_point():
        return torch.zeros(like.shape, dtype=like.dtype, device=device)
    if not isinstance(like, torch.nn.Parameter):
        return torch.ones(like.shape, dtype=like.dtype, device=device)
    generator = torch.Generator().manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:15], 16))
    return (torch.randn(like.shape, generator=generator) * 0.02).to(device=device, dtype=like.dtype)


class SaveMemory(Interpreter):
    """Node by node with only that node's state on the device; activations on the host."""

    def __init__(self, graph: Graph, meta_model: torch.nn.Module, settings: MeasureSettings):
        super().__init__(graph, meta_model, device=settings.device)
        self.settings = settings
        self.clock = Clock(settings)
        self.nodes: dict[str, NodeProfile] = {}
        self.overhead = 0.0
        # A tensor reachable under several names (tied weights) gets its value from the first,
        # as state_dict() and named_parameters() name it.
        state = (*meta_model.named_parameters(), *meta_model.named_buffers())
        self.names = {id(tensor): name for name, tensor in reversed(state)}

    def measure(self, batch: tuple | dict) -> Measurement:
        self.overhead = calibration.timing_overhead(self)
        output = self.run(batch)
        return Measurement(self.nodes, save_memory=True, outputs=output)

    def run_node(self, node: Node, args: tuple, kwargs: dict) -> Any:
        if node.op == "get_attr":
            if node.target in self.graph.constants:
                constant = self.graph.constants[node.target]
                return tensor_constant(constant.data, constant.dtype)
            like = self._state(node.target)
            value = initial_state(self.names.get(id(like), node.target), like, "cpu")
            return value.requires_grad_(like.requires_grad) if differentiable(value) else value
        if not node.is_compute:
            return super().run_node(node, args, kwargs)
        with self._materialized(node) as state:
            saved = SavedBytes(state)
            times, out, cut_args = time_alone(self, node, args, kwargs, state, self.overhead,
                                               lambda: saved.counting(node.name))  # fmt: skip
            self.nodes[node.name] = replace(times, peak_memory=saved.bytes.get(node.name, 0))
        return self._host_value(node, args, kwargs, out, cut_args)

    def _host_value(self, node: Node, args: tuple, kwargs: dict, out: Any, cut_args: tuple) -> Any:
        """The node's value for the host-side environment, sharing memory the way the model's
        does: an in-place write reaches the host tensor it was made to (and so every view of
        it), and views are taken of the host tensors again, which is cheap."""
        if node.mutates is not None and node.mutates < len(args) and isinstance(args[node.mutates], torch.Tensor):
            with torch.no_grad():
                args[node.mutates].copy_(cut_args[node.mutates])
            if out is cut_args[node.mutates]:
                return args[node.mutates]
        elif node.op != "call_module" and is_view_op(node.target):
            return super().run_node(node, args, kwargs)
        return tree_map(to_host, out)

    def _state(self, target: str) -> torch.Tensor:
        module_path, _, attr = target.rpartition(".")
        return getattr(self.model.get_submodule(module_path), attr)

    @contextlib.contextmanager
    def _materialized(self, node: Node) -> Iterator[list[torch.Tensor]]:
        """The node's module with its own parameters and buffers on the device, swapped into the
        meta model while the node runs, then swapped out and freed."""
        if node.op != "call_module":
            yield []
            return
        parent_path, _, child = node.target.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        meta_module = getattr(parent, child)
        if isinstance(meta_module, torch.jit.ScriptModule):
            raise FtcError(
                f"save-memory mode cannot measure {node.target} alone: it is a TorchScript module, whose "
                "weights cannot be moved off the meta device one module at a time (to_empty)",
                "measure without --save-memory (the whole model on the device), or use --profile analytic",
            )
        real = copy_module(meta_module).to_empty(device=self.settings.device)
        with torch.no_grad():
            for name, tensor in (*real.named_parameters(), *real.named_buffers()):
                like = (
                    meta_module.get_parameter(name)
                    if isinstance(tensor, torch.nn.Parameter)
                    else meta_module.get_buffer(name)
                )
                qualified = self.names.get(id(like), f"{node.target}.{name}")
                tensor.copy_(initial_state(qualified, like, self.settings.device))
        setattr(parent, child, real)
        try:
            yield [*real.parameters(), *real.buffers()]
        finally:
            setattr(parent, child, meta_module)
            del real
            if self.settings.device == "cuda":
                torch.cuda.empty_cache()
