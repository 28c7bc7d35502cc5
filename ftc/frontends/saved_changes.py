"""In-place changes of values that autograd saved for the backward: found while forward runs.

`a.relu_()` saves its result for the backward; a later `a[:, 0] = v` changes it in place, and the
model's backward then fails, in plain PyTorch as in the stages ("one of the variables needed for
gradient computation has been modified by an inplace operation"), once training starts. This
watches the single-batch meta run that finds value metadata instead: the tensors each op saves
(saved_tensors_hooks) with their version counters, checked after each op against the tensors
it was given, so the compile names both lines. Only a value saved by an op that the model's
outputs depend on counts: the backward never reaches an op whose value forward drops (a probe
layer called for nothing), so changing what it saved is harmless, in plain PyTorch as in the
stages.
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import torch

from ftc.ir import FtcError, Graph, Node, dataflow
from ftc.repeats import tensors_in

from .state_writes import storage_key


class SavedChanges:
    """Records what each node saves for the backward (`hooks()`, active around the run), and
    `check(node, args, kwargs)` after a node ran raises where it changed such a value."""

    def __init__(self, graph: Graph):
        self.node: Node | None = None  # the node running
        self.saved: dict[int, list[tuple[torch.Tensor, int, Node]]] = {}  # storage -> (tensor, version, saver)
        self.backward_reaches = _output_ancestors(graph)

    def hooks(self) -> Any:
        def pack(tensor: torch.Tensor) -> torch.Tensor:
            if self.node is not None and not tensor.is_sparse and self.node.name in self.backward_reaches:
                self.saved.setdefault(storage_key(tensor), []).append((tensor, tensor._version, self.node))
            return tensor

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)

    def check(self, node: Node, args: tuple, kwargs: dict) -> None:
        for tensor in tensors_in((args, kwargs)):
            if tensor.is_sparse:
                continue
            for saved, version, saver in self.saved.get(storage_key(tensor), []):
                if saver is not node and saved._version != version:
                    raise FtcError(
                        f"node {node.name!r} ({_where(node)}) changes in place a value that node {saver.name!r} "
                        f"({_where(saver)}) saved for its backward: the model's backward would fail, in plain "
                        "PyTorch as in the stages (autograd: 'one of the variables needed for gradient computation "
                        "has been modified by an inplace operation')",
                        "change the value out of place (`a = a.relu()` for `a.relu_()`, `a = a.masked_fill(m, 0)` "
                        "for `a.masked_fill_(m, 0)`, torch.where for an index assignment), or clone it before the "
                        "change",
                    )


def _output_ancestors(graph: Graph) -> set[str]:
    """The nodes whose values the model's outputs are computed from, the outputs included, taking
    every op that changes a tensor in place as one (`a.relu_()`: later ops read `a`, not its
    value)."""
    dag = dataflow(graph)
    roots = [ref.name for ref in graph.outputs.values]
    roots += [node.name for node in graph.nodes if node.mutates is not None or node.updates]
    sink = object()  # one node every root feeds, so that one search finds them all
    dag.add_edges_from((root, sink) for root in roots)
    return nx.ancestors(dag, sink)


def _where(node: Node) -> str:
    return node.source or node.module_path or "forward"
