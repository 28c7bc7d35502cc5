"""PipeDream-style partitioning: an exact dynamic program over contiguous splits of the program
order that minimizes the bottleneck stage cost (see problem.py for the cost model).

    best[s][j] = min over stage starts i < j of max(best[s-1][i], C_s[i][j])

C_s[i][j] is the cost of ops i..j-1 as the stage at position s: compute, communication with
every other stage, and the forward again when the stage must recompute to fit the per-device
memory limit (memory.py, ftc/passes/recompute.py); infinite when it cannot fit at all. Memory
depends on the position (under 1F1B, earlier stages keep more micro-batches in flight), which
the DP knows, since it builds stages from the first.

Throughput only depends on the bottleneck, but many splits reach it (a heavy layer can fix the
bottleneck alone). Among those, a second pass picks the most even one, the least sum of
squared stage costs: the other stages then share the work instead of one of them taking a
sliver, which balances memory and leaves slack on every device. Both passes are exact and
O(P N^2) in time and O(N^2) in memory, each stage one operation over a whole table; partition()
hands them a problem with at most coarsen.MAX_CUTS places to cut (coarsen.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from ftc.ir import FtcError
from ftc.passes.recompute import recompute_rule

from .memory import OPTIMIZER_STATES, MemorySettings, activation_bytes, format_bytes, interval_sums, step_bytes
from .problem import Partition, Problem

# Stage costs within this relative margin of the bottleneck count as reaching it.
TOLERANCE = 1e-9

Table = Callable[[int], np.ndarray]  # stage position -> (N+1, N+1) matrix over intervals [i, j)


class StageTables:
    """Per stage position: each interval's cost, whether it recomputes, and its least memory.
    The memory matrices are built on first use: without a limit (and without --recompute
    always) the costs do not depend on memory. All of them take O(N^2) time and memory for N
    ops, so tables for another stage count of the same problem share them (for_stages)."""

    def __init__(self, problem: Problem, stages: int, base: np.ndarray | None = None,
                 settings: MemorySettings | None = None):  # fmt: skip
        """`base`: problem.interval_costs(), where the caller has it; `settings`: the memory
        settings to price with, where not the problem's (another micro-batch count)."""
        self.problem, self.stages = problem, stages
        self.base = problem.interval_costs() if base is None else base
        self.settings = settings = settings or problem.footprint.settings
        self.memory_bound = settings.limit is not None or settings.recompute == "always"
        self._parts: list[tuple[np.ndarray, ...]] = []  # shared with for_stages' tables; empty until built

    def for_stages(self, stages: int, settings: MemorySettings | None = None) -> StageTables:
        """The tables of the same problem split into `stages` stages, sharing these matrices;
        `settings`: another micro-batch count (the step's parts of the matrices do not depend on it)."""
        tables = StageTables(self.problem, stages, self.base, settings)
        tables._parts = self._parts
        return tables

    def _memory(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """(memory without recomputation, with it) of every interval at `position`."""
        if not self._parts:
            settings, n = self.settings, self.problem.size
            held, trainable, saved = self.problem.footprint.interval_tables(n)
            static = held + trainable * (1 + OPTIMIZER_STATES[settings.optimizer])
            tables = (self.problem.received_table(), interval_sums(self.problem.forward))
            # a new gradient of the largest weight, and partial ones of weights read twice
            parameter = self.problem.largest_parameter_table()
            partials = self.problem.footprint.partial_gradient_table(n)
            step = step_bytes(settings, trainable, parameter)
            footprint = self.problem.footprint
            # The loss's memory, for the intervals that hold the last op (the stage computing it).
            loss_saved, outputs = np.zeros_like(saved), np.zeros_like(saved)
            loss_saved[:, n] = footprint.loss_saved
            outputs[:, n] = [footprint.loss_outputs(np.arange(n) >= i) for i in range(n + 1)]
            self._parts.append((static, saved, *tables, self.problem.sent_table(), self.problem.largest_table(),
                                parameter, step, trainable, loss_saved, outputs,
                                interval_sums(self.problem.transient), partials))  # fmt: skip
        (static, saved, received, _, sent, largest, parameter, step, trainable, loss_saved, outputs,
         transient, partials) = self._parts[0]  # fmt: skip
        footprint, settings = self.problem.footprint, self.settings
        in_flight, share = settings.in_flight(position, self.stages), settings.share(self.stages)
        stash = trainable * settings.stash_copies(position, self.stages)

        def activations(recompute: bool) -> np.ndarray:
            held = activation_bytes(saved, received, sent, largest, in_flight, recompute, loss_saved, outputs,
                                    footprint.outputs_saved, transient)  # fmt: skip
            return np.ceil(held * share) + parameter + partials

        if settings.schedule == "async":  # each stage steps while other micro-batches are in flight
            return tuple(static + stash + activations(recompute) + step for recompute in (False, True))
        return tuple(static + np.maximum(activations(recompute), step) for recompute in (False, True))

    def _rule(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        settings = self.settings
        return recompute_rule(settings.recompute, settings.limit, *self._memory(position),
                              self.problem.recomputable_table())  # fmt: skip

    def cost(self, position: int) -> np.ndarray:
        if not self.memory_bound:
            return self.base
        recompute, fits = self._rule(position)
        forward = self._parts[0][3]
        return np.where(fits, self.base + recompute * forward, np.inf)

    def recompute(self, position: int, start: int, end: int) -> bool:
        return self.memory_bound and bool(self._rule(position)[0][start, end])

    def least_memory(self, position: int) -> np.ndarray:
        """Each interval's memory with the recompute choice --recompute allows that needs least."""
        plain, recomputed = self._memory(position)
        recomputed = np.where(self.problem.recomputable_table(), recomputed, plain)
        policy = self.settings.recompute
        return {"never": plain, "always": recomputed}.get(policy, np.minimum(plain, recomputed))


def _later_starts(problem: Problem) -> np.ndarray:
    """valid[i, j]: a stage after the first may hold ops i..j-1 (0 < i < j, cuts allowed at both
    ends)."""
    n = problem.size
    can_start = np.ones(n + 1, dtype=bool)
    can_start[1:n] = ~problem.no_cut[: n - 1]
    can_start[0] = False
    return np.triu(can_start[:, None] & can_start[None, :], 1)


def min_bottleneck(problem: Problem, stages: int, table: Table) -> tuple[float, list[int]]:
    """The least, over splits into `stages` stages, of the largest table(s)[start, end], and a
    split that reaches it (inf when every split has an infinite stage)."""
    n = problem.size
    valid = _later_starts(problem)
    bottleneck = np.full((stages, n + 1), np.inf)
    choice = np.zeros((stages, n + 1), dtype=int)
    bottleneck[0, 1:] = table(0)[0, 1:]
    for s in range(1, stages):
        # candidate[i, j]: stages 0..s-1 end at i, stage s holds i..j-1; the least per j, the
        # first i on a tie
        candidate = np.where(valid, np.maximum(bottleneck[s - 1][:, None], table(s)), np.inf)
        choice[s] = np.argmin(candidate, axis=0)
        bottleneck[s] = np.take_along_axis(candidate, choice[s][None, :], axis=0)[0]
    return float(bottleneck[stages - 1, n]), _walk_back(choice, stages, n)


def _walk_back(choice: np.ndarray, stages: int, n: int) -> list[int]:
    result, end = [], n
    for s in range(stages - 1, 0, -1):
        end = int(choice[s, end])
        result.append(end)
    return [0] + result[::-1]


def most_even(problem: Problem, stages: int, table: Table, limit: float) -> list[int]:
    """Among splits whose every stage costs at most `limit`, one with the least sum of squared
    stage costs."""
    n = problem.size
    valid = _later_starts(problem)
    total = np.full((stages, n + 1), np.inf)
    choice = np.zeros((stages, n + 1), dtype=int)
    first = table(0)[0, 1:]
    total[0, 1:] = np.where(first <= limit, first**2, np.inf)
    for s in range(1, stages):
        cost = table(s)
        candidate = np.where(valid & (cost <= limit), total[s - 1][:, None] + cost**2, np.inf)
        choice[s] = np.argmin(candidate, axis=0)
        total[s] = np.take_along_axis(candidate, choice[s][None, :], axis=0)[0]
    return _walk_back(choice, stages, n)


def check_stage_count(problem: Problem, stages: int) -> None:
    if stages > problem.max_stages():
        first, last = _longest_glued_run(problem)
        glued = ""
        if last > first:
            # the widest reasons first: they are what holds the run together
            reasons = sorted((r for r in problem.glue if r[0] <= last and r[1] >= first), key=lambda r: r[0] - r[1])
            because = "; ".join(reason for _, _, reason in reasons[:3]) or (
                "an in-place op stays with the value it changes, a buffer or parameter forward changes with its "
                "readers, a tuple or dict with its readers"
            )
            glued = f"; ops {problem.ops[first]} .. {problem.ops[last]} ({last - first + 1} of them) must share a stage: {because}"
        raise FtcError(
            f"cannot split {problem.size} ops into {stages} stages: at most {problem.max_stages()} stages are possible{glued}",
            f"use --stages {problem.max_stages()} or fewer; with fx, --frontend export may allow more (it passes a "
            "parameter or buffer changed in forward on as a value); or change the model so that no such op spans it "
            "(untie a weight that an Embedding's max_norm renormalizes, or drop max_norm)",
        )


def _longest_glued_run(problem: Problem) -> tuple[int, int]:
    """The first and last op of the longest run of ops no stage boundary may separate."""
    best, start = (0, 0), 0
    for k in range(problem.size):
        if k == 0 or not problem.no_cut[k - 1]:
            start = k
        if k - start > best[1] - best[0]:
            best = (start, k)
    return best


def split_pipedream(
    problem: Problem, stages: int, tables: StageTables | None = None
) -> tuple[list[int], list[bool]]:
    """The first op of each stage (starts[0] == 0) of an optimal split into `stages` stages
    within the memory limit, and which of those stages recompute. `tables`: the problem's
    StageTables for `stages`, where the caller has them."""
    check_stage_count(problem, stages)
    tables = tables or StageTables(problem, stages)
    best, _ = min_bottleneck(problem, stages, tables.cost)
    if not np.isfinite(best):
        raise memory_error(problem, stages)
    starts = most_even(problem, stages, tables.cost, best * (1 + TOLERANCE))
    bounds = [*starts, problem.size]
    return starts, [tables.recompute(s, i, j) for s, (i, j) in enumerate(zip(bounds, bounds[1:]))]


def partition_pipedream(problem: Problem, stages: int, tables: StageTables | None = None) -> Partition:
    starts, recompute = split_pipedream(problem, stages, tables)
    return Partition.contiguous(problem.size, starts, recompute)


def least_peak(tables: StageTables) -> tuple[float, list[int]]:
    """The least possible largest stage memory over splits of the tables' problem into their
    stage count, and a split that reaches it."""
    return min_bottleneck(tables.problem, tables.stages, tables.least_memory)


def heaviest_unit_state(problem: Problem, optimizer: str | None = None) -> tuple[int, int, int]:
    """The bytes of parameters, buffers, gradients and `optimizer` state (default: the
    compile's) of the run of ops no stage boundary may separate that holds the most, with its
    first and last op: no stage of any split holds less."""
    copies = OPTIMIZER_STATES[optimizer or problem.footprint.settings.optimizer]
    heaviest, first = (0, 0, 0), 0
    for k in range(problem.size):
        if k < problem.size - 1 and problem.no_cut[k]:
            continue
        members = np.zeros(problem.size, dtype=bool)
        members[first : k + 1] = True
        held, trainable = problem.footprint.state_bytes(members)
        heaviest = max(heaviest, (held + trainable * (1 + copies), first, k), key=lambda unit: unit[0])
        first = k + 1
    return heaviest


def _larger_micro_batch_counts(settings: MemorySettings) -> list[int]:
    """Micro-batch counts above the planned one that split the compile batch equally, where
    the count was planned (--micro-batches not given)."""
    batch = settings.planned_batch
    if batch is None or settings.micro_batches is None:
        return []
    return [m for m in range(settings.micro_batches + 1, batch + 1) if batch % m == 0]


def memory_error(problem: Problem, stages: int) -> FtcError:
    """No split fits: say the least limit that would fit this stage count, and what does."""
    settings = problem.footprint.settings
    tables = StageTables(problem, stages)
    peak, starts = least_peak(tables)
    bounds = [*starts, problem.size]
    worst = max(range(stages), key=lambda s: tables.least_memory(s)[bounds[s], bounds[s + 1]])
    members = np.zeros(problem.size, dtype=bool)
    members[bounds[worst] : bounds[worst + 1]] = True
    plain = problem.stage_memory(members, worst, stages, False)
    recomputed = problem.stage_memory(members, worst, stages, True)
    recomputable = problem.recomputable(members)
    allowed = [
        m for m, ok in ((plain, settings.recompute != "always" or not recomputable),
                        (recomputed, settings.recompute != "never" and recomputable)) if ok
    ]  # fmt: skip
    detail = min(allowed, key=lambda m: m.total).describe()
    hint = f"raise --memory-limit to at least {format_bytes(peak, up=True).replace(' ', '')}"
    floor, first, last = heaviest_unit_state(problem)
    if floor > settings.limit:
        # no stage count fits: some run of ops no cut may separate holds more weights than the
        # limit, whatever else its stage holds
        ops = f"{problem.ops[first]} alone holds" if first == last else f"ops {problem.ops[first]} .. {problem.ops[last]}, which no cut may separate, hold"
        hint += (
            f"; no number of stages fits {format_bytes(settings.limit)}: {ops} "
            f"{format_bytes(floor)} of parameters, gradients and {settings.optimizer} state"
        )
        lightest = min(OPTIMIZER_STATES, key=OPTIMIZER_STATES.get)
        stateless = heaviest_unit_state(problem, lightest)[0]
        if settings.optimizer != lightest and stateless <= settings.limit:
            hint += f" ({format_bytes(stateless)} with --optimizer {lightest}, which keeps none)"
    else:
        # each count priced as a compile into it would be: with the micro-batches planned for it
        # where --micro-batches was not given
        tried = min(problem.max_stages(), 2 * stages)
        more = next((k for k in range(stages + 1, tried + 1)
                     if least_peak(tables.for_stages(k, settings.for_stages(k)))[0] <= settings.limit), None)  # fmt: skip
        smaller = next((m for m in _larger_micro_batch_counts(settings)
                        if least_peak(tables.for_stages(stages, replace(settings, micro_batches=m)))[0] <= settings.limit), None)  # fmt: skip
        if smaller:
            hint += f", or use --micro-batches {smaller}, which fits (smaller micro-batches hold less)"
        if more:
            hint += f", or use --stages {more}, which fits"
        elif tried < problem.max_stages():  # more stages than were tried may fit
            hint += f", or try --stages {tried + 1} or more (up to {tried} do not fit)"
        if settings.recompute == "never":
            hint += ", or allow --recompute auto"
    shown_peak = format_bytes(peak)
    if shown_peak == format_bytes(settings.limit):  # a limit just below the peak: say how far below
        shown_peak = f"{peak:,.0f} B against {settings.limit:,} B"
    return FtcError(
        f"no split of {problem.name} into {stages} stages fits {format_bytes(settings.limit)} per device: the least "
        f"possible peak is {shown_peak} (stage {worst} of that split: {detail})",
        hint,
    )
