"""Analytic profile on the meta device: FLOPs, bytes and a roofline time per node, no weights.

Forward and backward FLOPs are counted by torch.utils.flop_counter while each node runs on meta
tensors; the backward is the real autograd graph of that one node (gradients of its floating
inputs that require grad and of its module's parameters), so it is counted, not estimated.
FlopCounter counts matmul-like ops only; elementwise ops, norms and embeddings cost memory
traffic instead, so a node's time is the roofline max(FLOPs / peak, bytes / memory bandwidth).
Memory traffic is the bytes of the tensors a node reads and writes (views move nothing); its
backward is taken as twice that (read the output gradient and the saved inputs, write the input
gradients), which is an estimate.

Transformer blocks repeat: the same op on arguments of the same shapes costs the same, so one
profile counts each distinct (op, module settings, argument metadata) once and reuses the counts
for its repeats, which stand-in outputs (ftc/repeats.py) spare from running at all.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ftc.interpreter import Interpreter
from ftc.ir import Cost, Graph, Node
from ftc.repeats import Repeats, repeat_key, tensors_in


@dataclass(frozen=True)
class DeviceModel:
    """The device the analytic times assume. Defaults are one CPU core of a current server."""

    tflops: float = 0.1  # peak floating-point throughput, TFLOP/s
    memory_gbps: float = 10.0  # memory bandwidth, GB/s

    def time(self, flops: int, nbytes: int) -> float:
        return max(flops / (self.tflops * 1e12), nbytes / (self.memory_gbps * 1e9))


def _traffic(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> int:
    written = [t for t in outputs if not t._is_view() and all(t is not i for i in inputs)]
    if not written:
        return 0
    return sum(t.numel() * t.element_size() for t in (*inputs, *written))


def _cut(value: Any, leaves: list[torch.Tensor]) -> Any:
    """A copy of the arguments cut from the autograd graph, so that a backward covers one node.
    Inputs that require grad become new leaves (collected in `leaves`), cloned so that in-place
    ops may still write to them."""
    if isinstance(value, torch.Tensor):
        if not value.requires_grad:
            return value.detach()
        leaf = value.detach().requires_grad_()
        leaves.append(leaf)
        return leaf.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_cut(item, leaves) for item in value)
    if isinstance(value, dict):
        return {key: _cut(item, leaves) for key, item in value.items()}
    return value


class _Counter(Interpreter):
    def __init__(self, graph: Graph, model: torch.nn.Module):
        super().__init__(graph, model, device="meta")
        self.costs: dict[str, tuple[int, int, int]] = {}
        self.counted: dict[Hashable, tuple[int, int, int]] = {}  # repeat_key -> costs
        self.repeats = Repeats(model)

    def run_node(self, node: Node, args: tuple, kwargs: dict) -> Any:
        if not node.is_compute:
            return super().run_node(node, args, kwargs)
        key = repeat_key(node, self.model, args, kwargs)
        if key in self.counted:
            self.costs[node.name] = self.counted[key]
            replayed, out = self.repeats.replay(key)
            if replayed:
                return out
            # views and other outputs that need the real op: run it, uncounted
            return super().run_node(node, _cut(args, []), _cut(kwargs, []))
        # One run on inputs cut from the graph gives the forward's FLOPs and bytes and a
        # backward that covers this node alone. On the meta device the cut copies carry all
        # the later nodes need (shapes, dtypes, requires_grad).
        leaves: list[torch.Tensor] = []
        args, kwargs = _cut(args, leaves), _cut(kwargs, leaves)
        with FlopCounterMode(display=False) as counter:
            out = super().run_node(node, args, kwargs)
        fwd_flops = counter.get_total_flops()
        nbytes = _traffic(tensors_in((args, kwargs)), tensors_in(out))
        bwd_flops = self._backward_flops(node, out, leaves)
        if bwd_flops is None:
            # A module that only runs for real (interpreter.run_on_cpu) has no autograd graph
            # on the meta device to count; its backward is taken as twice its forward, as for
            # a linear layer. It may read tensor values, so its repeats are counted anew.
            bwd_flops, key = 2 * fwd_flops, None
        self.costs[node.name] = (fwd_flops, bwd_flops, nbytes)
        if key is not None:
            self.counted[key] = self.costs[node.name]
            self.repeats.record(key, node, (args, kwargs), out)
        return out

    def _backward_flops(self, node: Node, out: Any, leaves: list[torch.Tensor]) -> int | None:
        params = []
        if node.op == "call_module":
            params = [p for p in self.model.get_submodule(node.target).parameters() if p.requires_grad]
        outputs = [t for t in tensors_in(out) if t.requires_grad]
        if any(t.grad_fn is None for t in outputs):
            return None
        targets = leaves + params
        if not outputs or not targets:
            return 0
        with FlopCounterMode(display=False) as counter:
            torch.autograd.grad(outputs, targets, [torch.ones_like(t) for t in outputs], allow_unused=True)
        return counter.get_total_flops()


def profile_analytic(graph: Graph, model: torch.nn.Module, batch: tuple | dict, device: DeviceModel) -> Graph:
    """Annotate every compute node's Cost. `model` and `batch` live on the meta device."""
    counter = _Counter(graph, model)
    counter.run(batch)
    state_bytes = {name: t.meta.nbytes for name, t in graph.state.items()}
    nodes = []
    for node in graph.nodes:
        cost = Cost()
        if node.op == "get_attr":
            cost.param_bytes = state_bytes.get(node.target, 0)
        elif node.is_compute:
            fwd_flops, bwd_flops, nbytes = counter.costs[node.name]
            cost.fwd_flops, cost.bwd_flops = fwd_flops, bwd_flops
            cost.fwd_time = device.time(fwd_flops, nbytes)
            cost.bwd_time = device.time(bwd_flops, 2 * nbytes) if bwd_flops or _needs_grad(node) else 0.0
            if node.op == "call_module":
                prefix = node.target + "."
                cost.param_bytes = sum(b for name, b in state_bytes.items() if name.startswith(prefix))
        nodes.append(replace(node, cost=cost))
    return replace(graph, nodes=nodes)


def _needs_grad(node: Node) -> bool:
    return bool(getattr(node.meta, "requires_grad", False))
