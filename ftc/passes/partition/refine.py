"""Refinement by measurement (`ftc compile --refine ROUNDS`): partition, time the generated
stages on the device, scale the profile's node times so that each measured stage's predicted
compute equals its measurement, partition again; after ROUNDS measured splits (or when a split
comes back), time all of them again together and keep the one whose busiest device measured
least. The second timing is joint because a machine's speed drifts: on this project's shared
CPU the same stages timed up to 2x apart a few seconds apart, so splits timed in different
rounds cannot be ranked by those timings; timed in the same rounds, drift falls on all alike.

Every profile misses something that real stages pay. The analytic one prices ops by FLOPs,
bytes and a fixed cost per ATen op, however different ops' fixed costs are; the measured one
times nodes inside the whole model, where the first node of the forward and of the backward
carry costs that each stage pays in its own way. On large stages these are a few percent; on
stages of a few hundred microseconds they decide the split. Timing the stages themselves, as
ftc/profiling/stages.py does, sees all of it.

A stage's measurement corrects the nodes it holds, all by the same factor: which of them was
mispriced is not known, only their sum. The next split then moves boundaries through corrected
costs; a boundary that moves into a region measured as part of another stage uses that
stage's factor, which is why more than one round can help. The split kept is one that was
measured, so refinement never returns a split it has not seen beat the others; its predicted
stage times are then its own (joint) measurements, plus the communication the cost model adds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from ftc.ir import Graph

from .problem import Partition, Problem

# A measured stage corrects its nodes' times by at most this factor either way, so that one
# disturbed timing cannot make a node look free or enormous.
MAX_CORRECTION = 8.0


@dataclass(frozen=True)
class RefineRound:
    """One measured split: its busiest device's time (seconds per batch, communication as the
    cost model has it) as predicted before its timing, as timed in its round, and as timed
    again with the other rounds' splits; and the largest relative error of the predicted stage
    times after one factor fitted over the split's stages (a profile's absolute speed may be off,
    the analytic one's is a guess: what matters to a split is their proportions)."""

    predicted: float
    measured: float
    remeasured: float
    worst_stage_error: float


Candidate = tuple[Graph, Problem, Partition]  # a split and the profile that made it
Measure = Callable[[list[Candidate]], list[list[float]]]


def refine(
    graph: Graph,
    build: Callable[[Graph], Problem],
    split: Callable[[Problem], Partition],
    measure: Measure,
    rounds: int,
) -> tuple[Graph, Problem, Partition, list[RefineRound]]:
    """The best of up to `rounds` measured splits, with the graph and problem corrected by its
    timing, and a record of each round. `build` makes the partition problem of a graph, `split`
    partitions a problem, and `measure` gives, for each of several splits, the compute seconds
    (forward + backward, the stage call and the loss; nothing sent) of each of its stages,
    timed in the same rounds."""
    problem = build(graph)
    result = split(problem)
    seen: set[tuple] = set()
    candidates: list[Candidate] = []
    timings: list[list[float]] = []
    for round_ in range(rounds):
        key = (tuple(result.stage_of.tolist()), tuple(result.devices), tuple(result.recompute))
        if key in seen:
            break
        seen.add(key)
        candidates.append((graph, problem, result))
        timings.append(measure([(graph, problem, result)])[0])
        if round_ + 1 < rounds:
            graph = scale_stage_times(graph, problem, result, timings[-1])
            problem = build(graph)
            result = split(problem)
    if not candidates:  # rounds == 0
        return graph, problem, result, []
    joint = measure(candidates) if len(candidates) > 1 else timings
    history, corrected = [], []
    for (graph, problem, result), alone, together in zip(candidates, timings, joint):
        scaled = [scale_stage_times(graph, problem, result, seconds) for seconds in (alone, together)]
        problems = [build(g) for g in scaled]
        busiest = [float(p.device_times(result).max()) for p in (problem, *problems)]
        history.append(RefineRound(*busiest, _shape_error(stage_compute(problem, result), alone)))
        corrected.append((scaled[1], problems[1], result))
    return (*corrected[kept_round(history)], history)


def kept_round(history: list[RefineRound]) -> int:
    """The round whose split refine keeps: the least busiest device timed together."""
    return min(range(len(history)), key=lambda k: history[k].remeasured)


def _shape_error(predicted: list[float], measured: list[float]) -> float:
    """max |k * predicted - measured| / measured, k the least-squares factor."""
    p, m = np.array(predicted), np.array(measured)
    if not (p @ p > 0 and (m > 0).all()):
        return 0.0
    return float((np.abs(p * (p @ m) / (p @ p) - m) / m).max())


def stage_compute(problem: Problem, result: Partition) -> list[float]:
    """Each stage's compute seconds as the problem predicts them: its ops' forward and backward
    and its fixed costs (the stage call, the loss), without communication or recomputation,
    which a stage timed on its own does not pay."""
    return [
        float(problem.time[result.members(s)].sum()) + problem.fixed(result.members(s)).total
        for s in range(result.num_stages)
    ]


def scale_stage_times(graph: Graph, problem: Problem, result: Partition, measured: list[float]) -> Graph:
    """The graph with every node's forward and backward time scaled by its stage's factor:
    (measured - fixed costs) / the nodes' predicted time, within MAX_CORRECTION either way."""
    factor_of: dict[str, float] = {}
    for s, seconds in enumerate(measured):
        members = result.members(s)
        nodes = float(problem.time[members].sum())
        if nodes <= 0:
            continue  # nothing to scale: the stage is all fixed cost
        wanted = max(seconds - problem.fixed(members).total, 0.0) / nodes
        factor = float(np.clip(wanted, 1 / MAX_CORRECTION, MAX_CORRECTION))
        for k in np.flatnonzero(members):
            factor_of[problem.ops[k]] = factor
    nodes = []
    for node in graph.nodes:
        factor = factor_of.get(node.name)
        if factor is not None:
            cost = replace(node.cost, fwd_time=node.cost.fwd_time * factor, bwd_time=node.cost.bwd_time * factor)
            node = replace(node, cost=cost)
        nodes.append(node)
    return replace(graph, nodes=nodes)
