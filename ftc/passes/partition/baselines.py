"""The splits people make without a cost model, as baselines for the cost-aware partitioners.

uniform     equal numbers of the model's repeated blocks per stage, the hand split: the items of
            its ModuleLists and Sequentials (transformer layers, residual blocks) are counted and
            cut into equal runs; what comes before the first block (an embedding) stays with the
            first stage and what comes after the last (a head) with the last. A model without
            enough such items counts each of its top-level children instead.
parameters  contiguous stages with equal parameter bytes (DeepSpeed's
            partition_method="parameters"); a tied tensor counts at its first reader.

Both balance their count with the exact DP of pipedream.py over a problem whose op times are
the counted quantity, then decide recomputation for the real problem.
"""

from __future__ import annotations

import numpy as np

from ftc.ir import FtcError
from ftc.passes.recompute import choose_recompute

from .pipedream import split_pipedream
from .problem import Partition, Problem


def _balanced(problem: Problem, weights: np.ndarray, no_cut: np.ndarray, stages: int, what: str) -> Partition:
    counted = Problem(problem.ops, weights, [], no_cut, 1.0, name=problem.name)
    if stages > counted.max_stages():
        raise FtcError(
            f"{problem.name} has {counted.max_stages()} {what} to split at, fewer than {stages} stages",
            "use fewer --stages or another --method (pipedream cuts between any ops)",
        )
    starts, _ = split_pipedream(counted, stages)
    result = Partition.contiguous(problem.size, starts, [False] * stages)
    result.recompute = choose_recompute(problem, result.stage_of, result.devices)
    return result


def partition_uniform(problem: Problem, stages: int) -> Partition:
    units = list(problem.units) or [""] * problem.size
    # The root's own ops (an add between blocks, a final reshape) go with the block before them.
    filled, current = [], next((u for u in units if u), "")
    for unit in units:
        current = unit or current
        filled.append(current)
    run_starts = [k for k in range(problem.size) if k == 0 or filled[k] != filled[k - 1]]
    repeated = [k for k in run_starts if "." in filled[k]]
    counted = repeated if len(repeated) >= stages else run_starts
    weights = np.zeros(problem.size)
    weights[counted] = 1.0
    no_cut = problem.no_cut.copy()
    allowed = np.zeros(problem.size, dtype=bool)
    allowed[[k - 1 for k in counted if k > 0]] = True
    no_cut |= ~allowed
    return _balanced(problem, weights, no_cut, stages, "blocks")


def partition_parameters(problem: Problem, stages: int) -> Partition:
    weights = np.zeros(problem.size)
    for use in problem.footprint.state:
        if use.trainable:
            weights[min(use.readers)] += use.nbytes
    return _balanced(problem, weights, problem.no_cut, stages, "places")
