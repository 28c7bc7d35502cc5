"""PipeDream-style partitioning: an exact dynamic program over contiguous splits of the program
order that minimizes the bottleneck stage cost (see problem.py for the cost model).

    best[s][j] = min over stage starts i < j of max(best[s-1][i], C[i][j])

Throughput only depends on the bottleneck, but many splits reach it (a heavy layer can fix the
bottleneck alone). Among those, a second pass picks the most even one, the least sum of
squared stage costs: the other stages then share the work instead of one of them taking a
sliver, which balances memory and leaves slack on every device. Both passes are exact and
O(P N^2), vectorized over i.
"""

from __future__ import annotations

import numpy as np

from ftc.ir import FtcError

from .problem import Problem

# Stage costs within this relative margin of the bottleneck count as reaching it.
TOLERANCE = 1e-9


def partition_pipedream(problem: Problem, stages: int) -> list[int]:
    """The first op of each stage (starts[0] == 0), for an optimal split into `stages` stages."""
    n = problem.size
    if stages > problem.max_stages():
        raise FtcError(
            f"cannot split {n} ops into {stages} stages: at most {problem.max_stages()} stages are possible "
            "(in-place ops and tuple values must stay with their producer)",
            f"use --stages {problem.max_stages()} or fewer",
        )
    cost = problem.interval_costs()
    can_start = np.ones(n + 1, dtype=bool)
    can_start[1:n] = ~problem.no_cut[: n - 1]
    starts = np.flatnonzero(can_start[:n])

    # bottleneck[s, j]: best bottleneck of ops 0..j-1 in s+1 stages (inf where impossible)
    bottleneck = np.full((stages, n + 1), np.inf)
    bottleneck[0, 1:] = cost[0, 1:]
    for s in range(1, stages):
        for j in range(1, n + 1):
            if not can_start[j]:
                continue
            i = starts[(starts > 0) & (starts < j)]
            if i.size:
                bottleneck[s, j] = np.maximum(bottleneck[s - 1, i], cost[i, j]).min()
    best = bottleneck[stages - 1, n]

    # total[s, j]: least sum of squared stage costs of ops 0..j-1 in s+1 stages, each within
    # the bottleneck
    limit = best * (1 + TOLERANCE)
    total = np.full((stages, n + 1), np.inf)
    choice = np.zeros((stages, n + 1), dtype=int)
    total[0, 1:] = np.where(cost[0, 1:] <= limit, cost[0, 1:] ** 2, np.inf)
    for s in range(1, stages):
        for j in range(1, n + 1):
            if not can_start[j]:
                continue
            i = starts[(starts > 0) & (starts < j)]
            if not i.size:
                continue
            candidate = np.where(cost[i, j] <= limit, total[s - 1, i] + cost[i, j] ** 2, np.inf)
            k = int(np.argmin(candidate))
            total[s, j], choice[s, j] = candidate[k], i[k]
    result, end = [], n
    for s in range(stages - 1, 0, -1):
        end = int(choice[s, end])
        result.append(end)
    return [0] + result[::-1]
