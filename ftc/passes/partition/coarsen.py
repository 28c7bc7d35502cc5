"""Cut candidates: a problem with more places to cut than the partitioners can afford, merged
into runs of ops first.

The partitioners price stages through tables over every interval of ops (pipedream.py's DP,
mpipe's blocks and refinement, metis's final cuts), O(N^2) in memory and time: 180 MB per table
at 4,700 ops, and a compile under a memory limit keeps a dozen. A model whose forward is a
Python loop over time steps (a recurrence, a sampler) reaches that size at a few blocks. So a
problem of more than MAX_CUTS ops is coarsened: the ops between consecutive kept
cuts become one op of a smaller problem (`coarsened`), exact for every split along the kept
cuts, since every cost and memory term of a stage is a sum, maximum or union over its ops and
the values that cross its ends. The partitioner solves that problem and its answer is spread
back over the ops (`expanded`).

Kept cuts (`cut_candidates`): every allowed one where there are at most MAX_CUTS (the runs of
ops that no cut may separate merge, which loses nothing); where there are more, every place
where the model's top-level block changes (the hand
split's cuts, and where activations are narrow), then one cut per window of equal compute
time, the one that moves the fewest bytes in its window. A stage then ends at most one window
(1/MAX_CUTS of the model's time) from where the exact DP would have ended it.
"""

from __future__ import annotations

import numpy as np

from .problem import KindCost, Partition, Problem, Transfer
from .memory import Footprint, StateUse

# The most places to cut that a problem keeps: tables of 1025^2 float64 are 8 MB each.
MAX_CUTS = 1024


def cut_candidates(problem: Problem, stages: int) -> np.ndarray | None:
    """The first op of each run of a coarsening of `problem` (starts[0] == 0), or None where
    it has few enough places to cut that the partitioners take it whole."""
    n = problem.size
    budget = max(MAX_CUTS, 8 * stages)  # mpipe cuts up to 4 blocks per device, then refines
    if n <= budget:
        return None
    allowed = 1 + np.flatnonzero(~problem.no_cut[: n - 1])  # cut before op c
    if allowed.size <= budget:  # runs of ops no cut may separate: merging them loses nothing
        return np.concatenate([[0], allowed])
    kept = _block_starts(problem, allowed)
    if kept.size > budget // 2:
        kept = kept[:0]
    windows = budget - kept.size
    weights = problem.time if problem.time.sum() > 0 else np.ones(n)
    done = np.concatenate([[0.0], np.cumsum(weights)])[allowed] / weights.sum()  # share of the time before c
    window = np.minimum((done * windows).astype(int), windows - 1)
    crossing = _crossing_bytes(problem)[allowed]
    # within each window the fewest bytes, the earliest on a tie: a stable sort by (window, bytes)
    order = np.lexsort((crossing, window))
    first_of_window = np.concatenate([[True], window[order][1:] != window[order][:-1]])
    chosen = allowed[order[first_of_window]]
    return np.unique(np.concatenate([[0], kept, chosen]))


def _block_starts(problem: Problem, allowed: np.ndarray) -> np.ndarray:
    """The allowed cuts where the op's top-level block differs from the op's before it."""
    if not problem.units:
        return allowed[:0]
    units = np.array(problem.units, dtype=object)
    return allowed[units[allowed] != units[allowed - 1]]


def _crossing_bytes(problem: Problem) -> np.ndarray:
    """crossing[c]: bytes moved, forward and backward, by a cut before op c: every value made
    before it and read at or after it."""
    diff = np.zeros(problem.size + 1)
    for t in problem.transfers:
        last = t.consumers[-1]
        if last > t.producer:
            diff[t.producer + 1] += t.nbytes
            diff[last + 1] -= t.nbytes
    return np.cumsum(diff)[: problem.size]


def coarsened(problem: Problem, starts: np.ndarray) -> Problem:
    """The problem whose op k is the run of ops starts[k] .. starts[k+1]-1 of `problem`, named
    after its first op. A stage of whole runs costs and holds there what it does in `problem`."""
    n = problem.size
    run_of = _run_of(starts, n)

    def summed(values: np.ndarray) -> np.ndarray:
        return np.add.reduceat(values, starts) if values.size else values

    def runs(positions) -> list[int]:
        return sorted({int(run_of[p]) for p in positions})

    transfers = []
    for t in problem.transfers:
        consumers = runs(t.consumers)
        producer = int(run_of[t.producer])
        if consumers != [producer] or t.from_data:
            transfers.append(Transfer(t.value, producer, consumers, t.nbytes, t.value_bytes, t.grad_bytes, t.from_data))
    footprint = problem.footprint
    # A tensor keeps one reader per op that reads it, so that two readers merged into one run
    # still count as two (its partial gradients, Footprint.partial_gradients).
    state = [StateUse(use.name, use.nbytes, use.trainable, sorted(int(run_of[r]) for r in use.readers))
             for use in footprint.state]  # fmt: skip
    largest = np.maximum.reduceat(footprint.largest, starts) if footprint.largest.size else footprint.largest
    coarse_footprint = Footprint(
        footprint.settings, summed(footprint.saved), state, largest, footprint.loss_saved,
        [(int(run_of[producer]), nbytes) for producer, nbytes in footprint.outputs], footprint.outputs_saved,
        summed(footprint.transient),
    )  # fmt: skip
    rewrites = [next((name for name in problem.rewrites[i:j] if name), "")
                for i, j in zip(starts, np.append(starts[1:], n))] if problem.rewrites else []  # fmt: skip
    return Problem(
        ops=[problem.ops[s] for s in starts],
        time=summed(problem.time),
        transfers=transfers,
        no_cut=np.append(problem.no_cut[starts[1:] - 1], False),
        bandwidth=problem.bandwidth,
        fwd_time=None if problem.fwd_time is None else summed(problem.fwd_time),
        footprint=coarse_footprint,
        random=None if problem.random is None else np.logical_or.reduceat(problem.random, starts),
        name=problem.name,
        units=[problem.units[s] for s in starts] if problem.units else [],
        stage_call=problem.stage_call,
        loss=problem.loss,
        kinds=[KindCost(np.array(runs(kind.positions)), kind.cost) for kind in problem.kinds],
        glue=[(int(run_of[first]), int(run_of[last]), reason) for first, last, reason in problem.glue],
        rewrites=rewrites,
    )


def expanded(result: Partition, starts: np.ndarray, size: int) -> Partition:
    """A partition of a coarsened problem as one of the problem it was made from."""
    return Partition(result.stage_of[_run_of(starts, size)], list(result.devices), list(result.recompute))


def _run_of(starts: np.ndarray, size: int) -> np.ndarray:
    """run_of[k]: the run that holds op k of `size` ops, runs starting at `starts`."""
    return np.repeat(np.arange(len(starts)), np.diff(np.append(starts, size)))
