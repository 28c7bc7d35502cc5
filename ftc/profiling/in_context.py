"""The in-context mode of a measured profile (measure.py): the real model on the device, every
node timed inside the whole model's run, forward and backward.

In context, a node's time is what it costs inside the whole model's run, where the code and
data of its kind of op (its module class, its function) are warm from the kind's earlier ops.
A stage runs between other work (the rest of its device's schedule), so its first op of each
kind finds them cold: on this project's CPU a stage of one Linear (8 x 256 features) took 41 us
beyond the Linear's time in a chain of them, where a stage of one ReLU took what the stage call
predicts. For every kind the model runs more than once, a few of its ops are also timed alone,
called again and again as a one-op stage is; what they take beyond their in-context time is
the kind's cost to a stage (Graph.kind_costs), which the partitioner charges once to each stage
holding the kind (ftc/passes/partition/problem.py). The ops the whole model's run meets first
of their kind, forward and backward, meet it cold there, and the forward's first op also finds
what the backward before it left in the caches (an Embedding at the model's start took twice
its time alone): those ops are timed alone too and take that time, less the kind's cost."""

from __future__ import annotations

import contextlib
import statistics
from typing import Any

import torch
from torch.utils._pytree import tree_map

from ftc.interpreter import Interpreter
from ftc.ir import Graph, Node, map_refs
from ftc.repeats import tensors_in

from . import calibration
from .clock import Clock
from .measurement import MeasureSettings, Measurement, NodeProfile, to_host
from .saved_bytes import SavedBytes
from .time_alone import floating_outputs, time_alone

KIND_SAMPLES = 3  # ops of a kind timed alone, for its cost to a stage (InContext._kind_costs)


class InContext(Interpreter):
    def __init__(self, graph: Graph, model: torch.nn.Module, settings: MeasureSettings):
        super().__init__(graph, model, device=settings.device)
        self.settings = settings
        self.clock = Clock(settings)
        self.stamps: dict[str, tuple[Any, Any]] = {}  # node -> forward (start, end) of this run
        self.owner: dict[Any, str] = {}  # autograd node -> the IR node whose forward made it
        self.saved: SavedBytes | None = None

    def measure(self, batch: tuple | dict) -> Measurement:
        state = [*self.model.parameters(), *self.model.buffers()]
        per_hook = calibration.hook_cost(self.clock, self.settings.device)
        overhead = calibration.timing_overhead(self)
        fwd: dict[str, list[float]] = {}
        bwd: dict[str, list[float]] = {}
        # Run 0 counts saved tensors (its pack hooks would slow it), then warm-up, then timing.
        for run in range(1 + self.settings.warmup + self.settings.repeats):
            self.saved = SavedBytes(state) if run == 0 else None
            for param in self.model.parameters():
                param.grad = None  # as after zero_grad(): each backward allocates the gradients
            self.stamps, self.owner = {}, {}
            output = self.run(batch)
            events: list[tuple[str, Any]] = []
            for grad_fn, name in self.owner.items():
                grad_fn.register_hook(lambda *_, name=name: events.append((name, self.clock.stamp())))
            outputs = floating_outputs(output)
            grads = [torch.ones_like(t) for t in outputs]
            engine_start = calibration.engine_start(self.clock, self.settings.device, calibration.RUN_TRIES)
            self.clock.sync()
            start = self.clock.stamp()
            if outputs:
                torch.autograd.backward(outputs, grads)
            self.clock.sync()
            if run == 0:
                saved_bytes, transient = self.saved.bytes, self.saved.transient()
            if run <= self.settings.warmup:
                continue
            for name, (begin, finish) in self.stamps.items():
                fwd.setdefault(name, []).append(max(self.clock.seconds(begin, finish) - overhead, 0.0))
            spent: dict[str, float] = {}
            previous, engine = start, engine_start  # the first interval holds the engine's start
            for name, stamp in events:
                seconds = self.clock.seconds(previous, stamp) - per_hook - engine
                spent[name] = spent.get(name, 0.0) + max(seconds, 0.0)
                previous, engine = stamp, 0.0
            for name in self.stamps:
                bwd.setdefault(name, []).append(spent.get(name, 0.0))
        nodes = {
            name: NodeProfile(statistics.median(times), statistics.median(bwd[name]), saved_bytes.get(name, 0),
                              transient.get(name, 0))
            for name, times in fwd.items()
        }
        kinds = self._kind_costs(nodes, overhead)
        return Measurement(nodes, save_memory=False, outputs=tree_map(to_host, output), kinds=kinds)

    def _kind_costs(self, nodes: dict[str, NodeProfile], overhead: float) -> dict[str, NodeProfile]:
        """Graph.kind_costs, and `nodes` made warm. Ops are also timed alone, called again and
        again as a stage of their own is (on their inputs of the last run, cut from the graph).
        Where the whole model's run finds a kind warm (forward: any op of the kind but the
        first; backward: any but the last, which backward reaches first), what such an op takes
        alone beyond its in-context time is what a stage pays for its first op of the kind: the
        kind's cost, the median over up to KIND_SAMPLES ops (kinds the model runs once have
        none). The op that meets its kind first in the whole model's forward, and the one its
        backward meets first, meet it cold there, and maybe more (the forward's first op finds
        what the last backward left in the caches): their times become their times alone less
        the kind's cost."""
        by_kind: dict[str, list[str]] = {}
        for node in self.graph.nodes:
            if node.is_compute and node.name in nodes:
                by_kind.setdefault(self.graph.kind(node), []).append(node.name)
        kinds = {}
        for kind, names in by_kind.items():
            warm_forward, warm_backward = names[1 : 1 + KIND_SAMPLES], names[-1 - KIND_SAMPLES : -1]
            first, last = names[0], names[-1]
            try:
                alone = {name: self._alone(name, overhead) for name in dict.fromkeys([first, last, *warm_forward, *warm_backward])}
            except Exception:  # an op that cannot run on copies of its inputs: it keeps its in-context time
                continue
            cost = NodeProfile(
                statistics.median(max(alone[n].fwd_time - nodes[n].fwd_time, 0.0) for n in warm_forward) if warm_forward else 0.0,
                statistics.median(max(alone[n].bwd_time - nodes[n].bwd_time, 0.0) for n in warm_backward) if warm_backward else 0.0,
            )  # fmt: skip
            if cost.fwd_time or cost.bwd_time:
                kinds[kind] = cost
            nodes[first].fwd_time = max(alone[first].fwd_time - cost.fwd_time, 0.0)
            nodes[last].bwd_time = max(alone[last].bwd_time - cost.bwd_time, 0.0)
        return kinds

    def _alone(self, name: str, overhead: float) -> NodeProfile:
        """Node `name` timed alone (time_alone) on its inputs of the last run."""
        node = self.graph.node(name)
        read = lambda ref: self.env[ref.name]  # noqa: E731
        state = [*self.model.get_submodule(node.target).parameters()] if node.op == "call_module" else []
        return time_alone(self, node, map_refs(node.args, read), map_refs(node.kwargs, read), state, overhead)[0]

    def run_node(self, node: Node, args: tuple, kwargs: dict) -> Any:
        if not node.is_compute:
            return super().run_node(node, args, kwargs)
        counting = self.saved.counting(node.name) if self.saved else contextlib.nullcontext()
        with counting:
            start = self.clock.stamp()
            out = super().run_node(node, args, kwargs)
            end = self.clock.stamp()
        if self.saved:
            self.saved.record_made(node.name, tensors_in((args, kwargs)), tensors_in(out))
        self.stamps[node.name] = (start, end)
        mutated = args[node.mutates] if node.mutates is not None and node.mutates < len(args) else None
        self._own(node.name, (out, mutated))
        return out

    def _own(self, name: str, values: Any) -> None:
        """Attribute the autograd nodes `values` reach that no earlier node made to `name`."""
        pending = [t.grad_fn for t in tensors_in(values) if t.grad_fn is not None]
        while pending:
            grad_fn = pending.pop()
            if grad_fn in self.owner:
                continue
            self.owner[grad_fn] = name
            pending.extend(next_fn for next_fn, _ in grad_fn.next_functions if next_fn is not None)
