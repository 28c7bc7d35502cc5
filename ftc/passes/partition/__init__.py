"""Partitioners: assign every compute node of the IR to a pipeline stage and every stage to a
device.

Each method maps a `Problem` (problem.py) and a stage (device) count to a `Partition`:

  pipedream   exact DP over contiguous splits: least bottleneck within the memory limit
  metis       METIS k-way partition of the op graph, repaired into an acyclic stage graph
  mpipe       FTPipe's mixed pipe: balanced blocks bin-packed onto devices, so a device may run
              several stages; then refined
  uniform     equal numbers of the model's repeated blocks per stage (the hand split)
  parameters  equal parameter counts per stage (DeepSpeed's partition_method="parameters")

`assign` writes the result into the graph. Model inputs belong to the first stage; a get_attr
node takes the stage of its first reader (every stage that reads a parameter adopts it, so it is
never sent).
"""

from __future__ import annotations

from dataclasses import replace

from ftc.ir import FtcError, Graph

from .baselines import partition_parameters, partition_uniform
from .coarsen import coarsened, cut_candidates, expanded
from .metis import partition_metis
from .mpipe import partition_mpipe
from .pipedream import partition_pipedream
from .problem import Partition, Problem, build_problem

METHODS = {
    "pipedream": partition_pipedream,
    "metis": partition_metis,
    "mpipe": partition_mpipe,
    "uniform": partition_uniform,
    "parameters": partition_parameters,
}


def partition(problem: Problem, method: str, stages: int, blocks: int | None = None) -> Partition:
    """Run a method; `stages` is the device count (mpipe may make more stages than devices). A
    problem with many places to cut is solved coarsened (coarsen.py)."""
    if blocks is not None and method != "mpipe":
        raise FtcError(f"--blocks applies to --method mpipe, not {method}", "drop --blocks or use --method mpipe")
    starts = cut_candidates(problem, stages)
    solved = problem if starts is None else coarsened(problem, starts)
    if method == "mpipe":
        result = partition_mpipe(solved, stages, blocks)
    else:
        result = METHODS[method](solved, stages)
    return result if starts is None else expanded(result, starts, problem.size)


def assign(graph: Graph, problem: Problem, result: Partition) -> Graph:
    """Write the stage of every node and the device of every stage."""
    stage_of = {name: int(result.stage_of[k]) for k, name in enumerate(problem.ops)}
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
    return replace(graph, nodes=nodes, num_stages=result.num_stages, stage_devices=list(result.devices))


__all__ = ["METHODS", "Partition", "Problem", "assign", "build_problem", "partition"]
