"""Recomputation: which stages drop their activations after forward and run forward again in
backward (activation checkpointing at stage granularity), under `--recompute`:

  never   no stage recomputes; a stage whose activations do not fit is infeasible
  always  every stage recomputes
  auto    a stage recomputes only where the memory limit requires it; under 1F1B the last stage
          keeps one micro-batch in flight, so recomputing saves it nothing and it never does

Under either, a stage whose forward changes a parameter in place (Problem.rewrites) does not
recompute: its second forward would change the parameter again.

A recomputing stage keeps only the values it receives per micro-batch in flight (plus one
micro-batch's activations during its backward) and pays its forward time again in backward;
the partitioners price stages this way (Problem.stage_time), so they see what recomputation
costs. The manifest's per-stage "recompute" flag is what the runtime obeys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ftc.ir import FtcError

if TYPE_CHECKING:
    from ftc.passes.partition.problem import Problem

POLICIES = ("auto", "always", "never")


def recompute_rule(policy: str, limit: int | None, plain, recomputed, allowed=True):
    """(recompute, fits) for stages whose memory is `plain` without recomputation and
    `recomputed` with it, which may recompute where `allowed` (Problem.recomputable); elementwise
    on numpy arrays as on numbers."""
    bound = np.inf if limit is None else limit
    plain, recomputed = np.asarray(plain, dtype=float), np.asarray(recomputed, dtype=float)
    if policy == "never":
        return np.zeros_like(plain, dtype=bool), plain <= bound
    if policy == "always":
        recompute = np.ones_like(plain, dtype=bool) & allowed
    else:
        recompute = (plain > bound) & (recomputed < plain) & allowed
    return recompute, np.where(recompute, recomputed, plain) <= bound


def choose_recompute(problem: Problem, stage_of: np.ndarray, devices: list[int]) -> list[bool]:
    """The recompute flag of every stage of a partition. The limit holds per device: under
    `auto`, the stages of a device that does not fit recompute one at a time, the one that
    saves the most memory first, until the device fits. Raises FtcError naming the device when
    it cannot fit."""
    settings = problem.footprint.settings
    stages = len(devices)
    members = [stage_of == s for s in range(stages)]
    plain = [problem.stage_memory(members[s], s, stages, False).total for s in range(stages)]
    recomputed = [problem.stage_memory(members[s], s, stages, True).total for s in range(stages)]
    allowed = [problem.recomputable(members[s]) for s in range(stages)]
    flags = [settings.recompute == "always" and allowed[s] for s in range(stages)]
    limit = settings.limit
    for device in sorted(set(devices)):
        mine = [s for s in range(stages) if devices[s] == device]
        shared = problem.footprint.shared_bytes([members[s] for s in mine])

        def total() -> int:
            return sum(recomputed[s] if flags[s] else plain[s] for s in mine) - shared

        if settings.recompute == "auto":
            candidates = sorted((s for s in mine if allowed[s] and recomputed[s] < plain[s]),
                                key=lambda s: recomputed[s] - plain[s])  # fmt: skip
            for s in candidates:
                if limit is None or total() <= limit:
                    break
                flags[s] = True
        if limit is not None and total() > limit:
            details = "; ".join(
                f"stage {s}: {problem.stage_memory(members[s], s, stages, flags[s]).describe()}" for s in mine
            )
            # Under auto and always, recomputation was tried already: only never leaves it to allow.
            allow = ", allow --recompute auto" if settings.recompute == "never" else ""
            raise FtcError(
                f"device {device} of the {problem.name} pipeline needs {total():,} bytes, over the memory "
                f"limit of {limit:,} ({details})",
                f"raise --memory-limit, use more --stages{allow}" + _pipedream_hint(problem, stages),
            )
    return flags


def _pipedream_hint(problem: Problem, stages: int) -> str:
    """Whether pipedream's split, which minds the limit, fits it with this many stages."""
    # imported here: pipedream.py imports this module for recompute_rule
    from ftc.passes.partition.memory import format_bytes
    from ftc.passes.partition.pipedream import StageTables, least_peak

    limit = problem.footprint.settings.limit
    peak, _ = least_peak(StageTables(problem, stages))
    if peak <= limit:
        return ", or use --method pipedream, which splits within the limit"
    shown = format_bytes(peak)
    if shown == format_bytes(limit):  # a limit just below the peak: say how far below
        shown = f"{peak:,.0f} B against {limit:,} B"
    return f" (no split into {stages} stages fits: the least possible peak is {shown})"
