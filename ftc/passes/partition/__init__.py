"""Partitioners: assign every compute node of the IR to a pipeline stage.

Each method maps a `Problem` (problem.py) and a stage count to the first op of each stage;
`assign` writes them into the graph. Model inputs belong to the first stage; a get_attr node
takes the stage of its first reader (every stage that reads a parameter adopts it, so it is
never sent).
"""

from __future__ import annotations

from dataclasses import replace

from ftc.ir import Graph

from .pipedream import partition_pipedream
from .problem import Problem, build_problem

METHODS = {"pipedream": partition_pipedream}


def assign(graph: Graph, problem: Problem, starts: list[int]) -> Graph:
    """Write the stage of every node from the first op of each stage."""
    bounds = list(starts) + [problem.size]
    stage_of = {}
    for stage, (start, end) in enumerate(zip(bounds, bounds[1:])):
        for name in problem.ops[start:end]:
            stage_of[name] = stage
    first_reader: dict[str, int] = {}
    for node in graph.nodes:
        if node.name in stage_of:
            for name in node.refs():
                first_reader.setdefault(name, stage_of[node.name])
    nodes = []
    for node in graph.nodes:
        if node.op == "input":
            stage = 0
        elif node.op == "get_attr":
            stage = first_reader.get(node.name, 0)
        else:
            stage = stage_of[node.name]
        nodes.append(replace(node, stage=stage))
    return replace(graph, nodes=nodes, num_stages=len(starts), stage_devices=list(range(len(starts))))


__all__ = ["METHODS", "Problem", "assign", "build_problem"]
