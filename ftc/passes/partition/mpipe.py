"""FTPipe's mixed pipe: a device may run several stages, so that blocks too coarse to balance as
one contiguous run per device still balance.

1. Coarsen: cut the program order into L blocks, contiguous runs of balanced cost that respect
   the forbidden cuts (the DP of pipedream.py with L stages and no memory limit). `--blocks`
   sets L; by default 2P, 3P and 4P are each tried and the best result kept.
2. Pack the blocks onto the P devices, longest first, each onto the least loaded device whose
   memory still has room for it (the classic longest-processing-time rule for makespan); a
   tensor several blocks of a device read (a tied embedding and head) counts once there, as in
   the device's memory check.
3. Stages are the maximal runs of consecutive blocks on one device, in program order; several
   stages may share a device (pipeline.json "device": [0, 1, 1, 0] ...), which the runtime runs
   with interleaved 1F1B.
4. Refine: move each boundary between adjacent stages to whichever allowed cut lowers the
   predicted bottleneck device (the sum of its stages' costs, communication included; then the
   sum of squared device times), and each stage to whichever device lowers it, while every
   device's memory fits (shared tensors counted once); repeat until nothing moves. Neighbouring
   stages that end up on one device become one stage.
5. One stage per device is a mixed pipe too: where pipedream's exact split predicts a lower
   bottleneck (blocks that already balance), that split is the answer.

Memory and recomputation are decided per device at the end (ftc/passes/recompute.py); while
refining, a stage counts with the least memory --recompute allows and its time without the
re-forward.
"""

from __future__ import annotations

import numpy as np

from ftc.ir import FtcError
from ftc.passes.recompute import choose_recompute

from .pipedream import StageTables, check_stage_count, partition_pipedream, split_pipedream
from .problem import Partition, Problem, improves


def partition_mpipe(problem: Problem, devices: int, blocks: int | None = None) -> Partition:
    check_stage_count(problem, devices)
    if blocks is not None and blocks < devices:
        raise FtcError(f"--blocks {blocks} is fewer than the {devices} devices", f"use --blocks {devices} or more")
    # Without --blocks, a few coarsenings are tried: which packs best depends on the model.
    counts = [blocks] if blocks is not None else [2 * devices, 3 * devices, 4 * devices]
    counts = sorted({min(count, problem.max_stages()) for count in counts})
    tables = StageTables(problem, devices)
    candidates = [_mixed(problem, devices, count, tables) for count in counts]
    # One stage per device is a mixed pipe too; where the exact DP's split is better, take it.
    try:
        candidates.append(partition_pipedream(problem, devices, tables))
    except FtcError:
        if not any(candidates):
            raise
    # On a tie the fewer stages win: fewer boundaries, less to schedule.
    return min(
        (c for c in candidates if c is not None), key=lambda result: (device_load(problem, result), result.num_stages)
    )


def _mixed(problem: Problem, devices: int, count: int, tables: StageTables) -> Partition | None:
    """Coarsen into `count` blocks, pack, refine; None when no device assignment fits memory.
    `tables`: the problem's StageTables for `devices` stages."""
    # Blocks balance time alone (the memory limit applies to devices, in packing), the loss
    # included, so that the block holding it comes out smaller. Their interval costs are the
    # problem's: memory settings do not enter them.
    timing = Problem(
        problem.ops, problem.time, problem.transfers, problem.no_cut, problem.bandwidth,
        name=problem.name, stage_call=problem.stage_call, loss=problem.loss, kinds=problem.kinds,
    )  # fmt: skip
    block_starts, _ = split_pipedream(timing, count, StageTables(timing, count, tables.base))
    cost = tables.base
    limit = problem.footprint.settings.limit
    bounds = [*block_starts, problem.size]
    block_cost = [cost[i, j] for i, j in zip(bounds, bounds[1:])]
    # Where a block will sit in the pipeline is not known before packing: estimate its memory
    # at the position its share of the program order suggests.
    intervals = list(zip(bounds, bounds[1:]))
    block_memory = [
        tables.least_memory(b * devices // count)[i, j] if limit is not None else 0.0
        for b, (i, j) in enumerate(intervals)
    ]
    load = [0.0] * devices
    held: list[list[int]] = [[] for _ in range(devices)]

    def memory_with(d: int, b: int) -> float:
        """Device d's memory once it also holds block b: a tensor several of its blocks read counts once."""
        blocks = [*held[d], b]
        shared = problem.footprint.shared_interval_bytes([intervals[k] for k in blocks])
        return sum(block_memory[k] for k in blocks) - shared

    device_of = [0] * count
    for b in sorted(range(count), key=lambda b: (-block_cost[b], b)):
        by_load = sorted(range(devices), key=lambda d: (load[d], d))
        fitting = [d for d in by_load if limit is None or memory_with(d, b) <= limit]
        d = fitting[0] if fitting else min(range(devices), key=lambda d: (memory_with(d, b), d))
        device_of[b] = d
        load[d] += block_cost[b]
        held[d].append(b)

    starts, owners = _runs(block_starts, device_of)
    starts, owners = _refine(problem, starts, owners, devices, tables.for_stages(len(starts)))
    first_seen = {d: k for k, d in enumerate(dict.fromkeys(owners))}
    result = Partition.contiguous(problem.size, starts, [False] * len(starts))
    result.devices = [first_seen[d] for d in owners]
    if len(first_seen) < devices:
        return None
    try:
        result.recompute = choose_recompute(problem, result.stage_of, result.devices)
    except FtcError:
        return None
    return result


def _runs(starts: list[int], owners: list[int]) -> tuple[list[int], list[int]]:
    """Merge consecutive pieces on one device into one stage."""
    merged_starts, merged_owners = [], []
    for start, owner in zip(starts, owners):
        if not merged_owners or merged_owners[-1] != owner:
            merged_starts.append(start)
            merged_owners.append(owner)
    return merged_starts, merged_owners


def device_load(problem: Problem, result: Partition) -> tuple[float, float]:
    """(bottleneck device time, sum of squared device times) of a partition."""
    loads = problem.device_times(result)
    return float(loads.max()), float(loads @ loads)


def _refine(
    problem: Problem, starts: list[int], owners: list[int], devices: int, tables: StageTables
) -> tuple[list[int], list[int]]:
    """Boundary moves and stage-to-device moves while they lower (bottleneck, sum of squares).
    `tables`: the problem's StageTables for len(starts) stages."""
    n = problem.size
    cost = tables.base
    limit = problem.footprint.settings.limit
    bounded = tables.memory_bound and limit is not None
    # A stage's memory is taken at its position in the first stage order; moves keep the order.
    memory_tables = [tables.least_memory(s) for s in range(len(starts))] if bounded else []
    allowed = [k for k in range(1, n) if not problem.no_cut[k - 1]]
    bounds, owners = [*starts, n], list(owners)
    # used: the sum of each device's stage estimates, which count a tensor several of them read
    # once each (`shared` takes the excess off)
    times, used = np.zeros(devices), np.zeros(devices)
    for s, (i, j) in enumerate(zip(bounds, bounds[1:])):
        times[owners[s]] += cost[i, j]
        used[owners[s]] += memory_tables[s][i, j] if bounded else 0.0
    best = (times.max(), float(times @ times))

    def shared(trial_bounds: list[int], trial_owners: list[int]) -> np.ndarray:
        """Per device, the bytes its stages' memory counts more than once (a tensor several read)."""
        held: list[list[tuple[int, int]]] = [[] for _ in range(devices)]
        for s, d in enumerate(trial_owners):
            held[d].append((trial_bounds[s], trial_bounds[s + 1]))
        return np.array([problem.footprint.shared_interval_bytes(intervals) for intervals in held])

    def accept(
        trial_times: np.ndarray, trial_used: np.ndarray, trial_bounds: list[int], trial_owners: list[int]
    ) -> bool:
        nonlocal best, times, used
        candidate = (trial_times.max(), float(trial_times @ trial_times))
        if not improves(candidate, best):
            return False
        if bounded and (trial_used - shared(trial_bounds, trial_owners)).max() > limit:
            return False
        best, times, used = candidate, trial_times, trial_used
        return True

    improved = True
    while improved:
        improved = False
        for k in range(1, len(owners)):
            left, right = bounds[k - 1], bounds[k + 1]
            a, b = owners[k - 1], owners[k]
            for cut in (c for c in allowed if left < c < right and c != bounds[k]):
                old = bounds[k]
                trial_times, trial_used = times.copy(), used.copy()
                trial_times[a] += cost[left, cut] - cost[left, old]
                trial_times[b] += cost[cut, right] - cost[old, right]
                if bounded:
                    trial_used[a] += memory_tables[k - 1][left, cut] - memory_tables[k - 1][left, old]
                    trial_used[b] += memory_tables[k][cut, right] - memory_tables[k][old, right]
                if accept(trial_times, trial_used, [*bounds[:k], cut, *bounds[k + 1 :]], owners):
                    bounds[k], improved = cut, True
        for k in range(len(owners)):
            i, j = bounds[k], bounds[k + 1]
            for d in range(devices):
                if d == owners[k]:
                    continue
                trial_times, trial_used = times.copy(), used.copy()
                trial_times[owners[k]] -= cost[i, j]
                trial_times[d] += cost[i, j]
                if bounded:
                    trial_used[owners[k]] -= memory_tables[k][i, j]
                    trial_used[d] += memory_tables[k][i, j]
                if accept(trial_times, trial_used, bounds, [*owners[:k], d, *owners[k + 1 :]]):
                    owners[k], improved = d, True
    return _runs(bounds[:-1], owners)
