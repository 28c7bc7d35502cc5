"""METIS partitioning: a balanced k-way cut of the op graph that moves few bytes, made into a
pipeline.

1. Atoms: ops joined by forbidden cuts (problem.py: an in-place op and what it mutates, a tuple
   and its readers, a buffer forward updates and its readers) stay together; each maximal run of
   them is one vertex, weighted by its time. Edges carry the bytes of the values between atoms.
2. pymetis.part_graph cuts that graph into P parts of balanced weight and least cut bytes.
3. Repair: the parts need not form a pipeline (part A may feed part B and B feed A). Parts are
   ranked by their mean position in program order, and atoms, visited in a topological order,
   take the rank of their part or the largest stage of their predecessors, whichever is larger;
   every edge then goes to the same or a later stage, so the stage graph is acyclic and stage
   numbers are a topological order. Ops that draw random numbers are chained in program order
   in this graph, so the stages, run one after the other, draw what the model draws. Stages the
   repair emptied are refilled by splitting the costliest stage in two along the order.
4. Rebalance: move single atoms to a neighbouring stage (when their predecessors and successors
   allow) while the bottleneck stage cost (then the sum of squared stage costs) falls.
5. Cut exactly: the stages in order, each a run, are a topological order of the ops that keeps
   related ops together; the exact DP of pipedream.py places the P - 1 cuts along that order,
   within the memory limit. The labelling of step 4 is one of the splits it considers, so this
   only improves on it, and on chains (where single-atom moves get stuck) it is what balances.

Stages are then sets of ops that need not be contiguous in program order; the cost model prices
any set (Problem.member_cost), and the backend writes each stage's ops in program order.
"""

from __future__ import annotations

from dataclasses import replace

import networkx as nx
import numpy as np
import pymetis

from ftc.passes.recompute import choose_recompute

from .pipedream import check_stage_count, split_pipedream
from .problem import Partition, Problem, improves

# METIS takes integer weights; times and bytes are scaled to this range.
WEIGHT_SCALE = 10**6
MAX_PASSES = 50


def atoms_of(problem: Problem) -> np.ndarray:
    """The atom of each op: ops with a forbidden cut between them share one."""
    cuts = np.concatenate([[0], (~problem.no_cut[: problem.size - 1]).astype(int)])
    return np.cumsum(cuts)


def atom_dag(problem: Problem, atom: np.ndarray) -> nx.DiGraph:
    """Atoms with an edge producer -> consumer for every value between them ("bytes"), and one
    between consecutive atoms that draw random numbers."""
    dag = nx.DiGraph()
    dag.add_nodes_from(range(int(atom[-1]) + 1))
    for t in problem.transfers:
        for c in t.consumers:
            u, v = int(atom[t.producer]), int(atom[c])
            if u != v:
                previous = dag.get_edge_data(u, v, {"bytes": 0})["bytes"]
                dag.add_edge(u, v, bytes=previous + t.nbytes)
    if problem.random is not None:
        drawing = sorted({int(atom[k]) for k in np.flatnonzero(problem.random)})
        for u, v in zip(drawing, drawing[1:]):
            if not dag.has_edge(u, v):
                dag.add_edge(u, v, bytes=0)
    return dag


def _metis_parts(dag: nx.DiGraph, weights: np.ndarray, parts: int) -> list[int]:
    undirected = nx.Graph()
    undirected.add_nodes_from(dag.nodes)
    for u, v, data in dag.edges(data=True):
        previous = undirected.get_edge_data(u, v, {"bytes": 0})["bytes"]
        undirected.add_edge(u, v, bytes=previous + data["bytes"])
    largest_edge = max((d["bytes"] for _, _, d in undirected.edges(data=True)), default=0) or 1
    xadj, adjncy, eweights = [0], [], []
    for u in range(len(weights)):
        for v in sorted(undirected.neighbors(u)):
            adjncy.append(v)
            eweights.append(max(1, round(undirected[u][v]["bytes"] / largest_edge * WEIGHT_SCALE)))
        xadj.append(len(adjncy))
    total = weights.sum() or 1.0
    vweights = [max(1, round(w / total * WEIGHT_SCALE)) for w in weights]
    if not adjncy:  # METIS needs at least one edge; a graph without any splits by weight alone
        order = np.cumsum(weights) / total
        return [min(parts - 1, int(x * parts)) for x in order - weights / total / 2]
    return list(
        pymetis.part_graph(parts, pymetis.CSRAdjacency(xadj, adjncy), vweights=vweights, eweights=eweights).vertex_part
    )


def repair(dag: nx.DiGraph, parts: list[int], weights: np.ndarray) -> list[int]:
    """Stage labels (0..k-1, k <= number of parts) such that every edge goes to the same or a
    later stage, following the parts where the edges allow."""
    order = list(nx.topological_sort(dag))
    index = {a: k for k, a in enumerate(order)}
    mean = {}
    for part in set(parts):
        members = [a for a in dag.nodes if parts[a] == part]
        mass = weights[members] + 1e-12
        mean[part] = float(np.average([index[a] for a in members], weights=mass))
    rank = {part: r for r, part in enumerate(sorted(mean, key=lambda p: (mean[p], p)))}
    label = {}
    for a in order:
        label[a] = max([rank[parts[a]], *(label[p] for p in dag.predecessors(a))])
    used = sorted(set(label.values()))
    compact = {old: new for new, old in enumerate(used)}
    return [compact[label[a]] for a in range(len(parts))]


def split_until(dag: nx.DiGraph, labels: list[int], weights: np.ndarray, stages: int) -> list[int]:
    """Split the costliest splittable stage in two along a topological order until there are
    `stages` stages; edges inside a stage go forward in that order, so labels stay monotone."""
    order = list(nx.topological_sort(dag))
    labels = list(labels)
    while max(labels) + 1 < stages:
        loads = np.bincount(labels, weights=weights, minlength=max(labels) + 1)
        sizes = np.bincount(labels, minlength=max(labels) + 1)
        stage = max((s for s in range(len(loads)) if sizes[s] > 1), key=lambda s: (loads[s], -s))
        members = [a for a in order if labels[a] == stage]
        running = np.cumsum(weights[members])
        cut = int(np.clip(np.searchsorted(running, running[-1] / 2), 0, len(members) - 2)) + 1
        later = set(members[cut:])
        labels = [label + 1 if label > stage or a in later else label for a, label in enumerate(labels)]
    return labels


class _Balancer:
    """Stage costs of an atom labelling, updated move by move."""

    def __init__(self, problem: Problem, atom: np.ndarray, labels: list[int], stages: int):
        self.problem = problem
        self.labels = list(labels)
        # The ops of each atom, in program order, grouped in one pass (not one scan per atom).
        sizes = np.bincount(atom, minlength=len(labels))
        self.atom_ops = np.split(np.argsort(atom, kind="stable"), np.cumsum(sizes)[:-1])
        self.stage_of = np.array([labels[a] for a in atom])
        self.consumers = [np.array(t.consumers) for t in problem.transfers]
        self.touching: list[list[int]] = [[] for _ in labels]
        for k, t in enumerate(problem.transfers):
            for a in {int(atom[t.producer]), *(int(atom[c]) for c in t.consumers)}:
                self.touching[a].append(k)
        self.atom_time = np.bincount(atom, weights=problem.time, minlength=len(labels))
        # The fixed costs a move carries: each kind of op the source no longer holds or the
        # target newly holds, and the loss with the last op's atom.
        self.kind_ops = np.zeros((len(labels), len(problem.kinds)))  # per atom, its ops of each kind
        for k, kind in enumerate(problem.kinds):
            np.add.at(self.kind_ops[:, k], atom[kind.positions], 1)
        self.stage_kind_ops = np.zeros((stages, len(problem.kinds)))
        np.add.at(self.stage_kind_ops, np.array(labels), self.kind_ops)
        self.kind_cost = np.array([kind.cost.total for kind in problem.kinds])
        self.loss_atom = int(atom[-1])
        self.cost = np.array([problem.member_cost(self.stage_of == s) for s in range(stages)])

    def _comm(self, transfers: list[int], stage: int) -> float:
        moved = 0
        for k in transfers:
            t = self.problem.transfers[k]
            readers = self.stage_of[self.consumers[k]]
            if self.stage_of[t.producer] == stage:
                moved += t.nbytes if (readers != stage).any() else 0
            elif (readers == stage).any():
                moved += t.nbytes
        return moved / self.problem.bandwidth

    def try_move(self, a: int, target: int) -> bool:
        """Move atom a to `target` if that lowers (bottleneck, sum of squares); say whether it
        did. Only the two stages' costs change: a value's other readers and sender keep their
        roles. Memory is left to the exact cut that follows (step 5)."""
        ops, transfers = self.atom_ops[a], self.touching[a]
        source = int(self.stage_of[ops[0]])
        before = (self._comm(transfers, source), self._comm(transfers, target))
        self.stage_of[ops] = target
        after = (self._comm(transfers, source), self._comm(transfers, target))
        held = self.kind_ops[a] > 0
        lost = self.kind_cost[held & (self.stage_kind_ops[source] == self.kind_ops[a])].sum()
        gained = self.kind_cost[held & (self.stage_kind_ops[target] == 0)].sum()
        loss = self.problem.loss.total if a == self.loss_atom else 0.0
        cost = self.cost.copy()
        cost[source] += after[0] - before[0] - self.atom_time[a] - lost - loss
        cost[target] += after[1] - before[1] + self.atom_time[a] + gained + loss
        better = improves((cost.max(), float(cost @ cost)), (self.cost.max(), float(self.cost @ self.cost)))
        if not better:
            self.stage_of[ops] = source
            return False
        self.cost = cost
        self.stage_kind_ops[source] -= self.kind_ops[a]
        self.stage_kind_ops[target] += self.kind_ops[a]
        self.labels[a] = target
        return True


def rebalance(problem: Problem, dag: nx.DiGraph, atom: np.ndarray, labels: list[int], stages: int) -> _Balancer:
    """Single-atom moves to a neighbouring stage while they help; the balancer holds the
    resulting labels and stage costs."""
    balancer = _Balancer(problem, atom, labels, stages)
    sizes = np.bincount(labels, minlength=stages)
    for _ in range(MAX_PASSES):
        moved = False
        for a in nx.topological_sort(dag):
            source = balancer.labels[a]
            if sizes[source] == 1:
                continue
            low = max((balancer.labels[p] for p in dag.predecessors(a)), default=0)
            high = min((balancer.labels[s] for s in dag.successors(a)), default=stages - 1)
            for target in (source - 1, source + 1):
                if low <= target <= high and balancer.try_move(a, target):
                    sizes[source] -= 1
                    sizes[target] += 1
                    moved = True
                    break
        if not moved:
            break
    return balancer


def linearize(problem: Problem, stage_of: np.ndarray) -> tuple[Problem, np.ndarray]:
    """The problem with its ops reordered stage by stage (program order within a stage), and
    the order (new position -> op). Stage labels rise along every edge, so this is a topological
    order in which each stage is a contiguous run. Model inputs, which problem.py places with
    op 0, are placed with their first reader in the new order."""
    order = np.lexsort((np.arange(problem.size), stage_of))
    position = np.empty(problem.size, dtype=int)
    position[order] = np.arange(problem.size)
    transfers = []
    for t in problem.transfers:
        consumers = sorted({int(position[c]) for c in t.consumers})
        producer = min(int(position[t.producer]), consumers[0])
        transfers.append(replace(t, producer=producer, consumers=consumers))
    atom = atoms_of(problem)[order]
    no_cut = np.append(atom[1:] == atom[:-1], False)
    state = [replace(use, readers=sorted(int(position[r]) for r in use.readers)) for use in problem.footprint.state]
    outputs = [(int(position[producer]), nbytes) for producer, nbytes in problem.footprint.outputs]
    footprint = replace(problem.footprint, saved=problem.saved[order], state=state, largest=problem.largest[order],
                        transient=problem.transient[order], outputs=outputs)  # fmt: skip
    kinds = [replace(kind, positions=np.sort(position[kind.positions])) for kind in problem.kinds]
    reordered = replace(
        problem,
        ops=[problem.ops[k] for k in order],
        time=problem.time[order],
        transfers=transfers,
        no_cut=no_cut,
        fwd_time=problem.forward[order],
        footprint=footprint,
        random=None if problem.random is None else problem.random[order],
        kinds=kinds,
        units=[],
    )
    return reordered, order


def partition_metis(problem: Problem, stages: int) -> Partition:
    check_stage_count(problem, stages)
    atom = atoms_of(problem)
    dag = atom_dag(problem, atom)
    weights = np.bincount(atom, weights=problem.time)
    labels = [0] * len(weights)
    if stages > 1:
        parts = _metis_parts(dag, weights, stages)
        labels = split_until(dag, repair(dag, parts, weights), weights, stages)
        labels = rebalance(problem, dag, atom, labels, stages).labels
    # The stages in order, each a run, form a topological order of the ops: the exact DP then
    # places the cuts along it, within the memory limit; the labelling above is one of the
    # splits it considers, so the DP can only improve on it.
    reordered, order = linearize(problem, np.array([labels[a] for a in atom]))
    starts, _ = split_pipedream(reordered, stages)
    stage_of = np.empty(problem.size, dtype=int)
    stage_of[order] = Partition.contiguous(problem.size, starts, [False] * stages).stage_of
    devices = list(range(stages))
    return Partition(stage_of, devices, choose_recompute(problem, stage_of, devices))
