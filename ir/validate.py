"""Structural checks of an IR graph. Each problem names the node it is about."""

from __future__ import annotations

import networkx as nx

from .errors import FtcError
from .graph import OPS, Graph


def dataflow(graph: Graph) -> nx.DiGraph:
    """The value graph: an edge producer -> consumer for every reference."""
    dag = nx.DiGraph()
    dag.add_nodes_from(node.name for node in graph.nodes)
    for node in graph.nodes:
        dag.add_edges_from((name, node.name) for name in node.refs())
    return dag


def validate(graph: Graph) -> None:
    """Raise FtcError on the first problem: duplicate producers, unknown ops, references that do
    not resolve or point forward, cycles, stage assignments out of range, bad outputs."""
    seen: set[str] = set()
    for node in graph.nodes:
        if node.name in seen:
            raise FtcError(f"IR node {node.name!r}: more than one node produces value {node.name!r}")
        if node.op not in OPS:
            raise FtcError(f"IR node {node.name!r}: unknown op {node.op!r} (expected one of {OPS})")
        if node.op == "get_attr" and node.target not in graph.state and node.target not in graph.constants:
            raise FtcError(f"IR node {node.name!r}: get_attr target {node.target!r} is not a model tensor")
        if node.op == "call_module" and node.target not in graph.modules:
            raise FtcError(f"IR node {node.name!r}: module {node.target!r} is not in graph.modules")
        unknown = [name for name in node.updates if name not in graph.state]
        if unknown:
            raise FtcError(f"IR node {node.name!r}: updates {unknown}, which are no parameters or buffers of the model")
        seen.add(node.name)
    names = seen
    for node in graph.nodes:
        for ref in node.refs():
            if ref not in names:
                raise FtcError(f"IR node {node.name!r}: argument refers to unknown value {ref!r}")
    dag = dataflow(graph)
    if not nx.is_directed_acyclic_graph(dag):
        cycle = " -> ".join(u for u, _ in nx.find_cycle(dag))
        raise FtcError(f"IR graph has a cycle through nodes {cycle}")
    position = {node.name: i for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        for ref in node.refs():
            if position[ref] > position[node.name]:
                raise FtcError(
                    f"IR node {node.name!r}: reads {ref!r}, which comes later; nodes must be in program order"
                )
    for ref in graph.outputs.values:
        if ref.name not in names:
            raise FtcError(f"IR outputs: refers to unknown value {ref.name!r}")
    if graph.outputs.kind == "dict" and len(graph.outputs.keys) != len(graph.outputs.values):
        raise FtcError(
            f"IR outputs: a dict output has {len(graph.outputs.keys)} keys for "
            f"{len(graph.outputs.values)} values ({[ref.name for ref in graph.outputs.values]})"
        )
    if graph.num_stages:
        for node in graph.nodes:
            if node.is_compute and not (node.stage is not None and 0 <= node.stage < graph.num_stages):
                raise FtcError(
                    f"IR node {node.name!r}: stage {node.stage!r} is not in 0..{graph.num_stages - 1}"
                )
        if len(graph.stage_devices) != graph.num_stages:
            raise FtcError(
                f"IR graph: {len(graph.stage_devices)} stage devices for {graph.num_stages} stages"
            )
