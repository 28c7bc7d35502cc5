"""Coarsening a problem with many places to cut (ftc/passes/partition/coarsen.py).

The independent truths: the problem it was made from, whose tables and member prices every split
along the kept cuts must reproduce exactly; the exact DP on the whole problem, which the
coarsened answer must come within a window of; and the original model, which the stages of
coarsened partitions must compute (ftc.check)."""

from __future__ import annotations

import random

import numpy as np
import pytest

import ftc.passes.partition.coarsen as coarsen
from ftc.compiler import CompileOptions, compile_model
from ftc.passes.partition import METHODS, build_problem, partition
from ftc.passes.partition.coarsen import coarsened, cut_candidates
from ftc.passes.partition.memory import Footprint, MemorySettings, StateUse
from ftc.passes.partition.pipedream import StageTables, least_peak, split_pipedream
from ftc.passes.partition.problem import Partition, Problem, Transfer

from .conftest import EXAMPLES, MODELS
from .test_methods import assert_check_passes, assert_pipeline_order, device_bottleneck, write

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = [
    MemorySettings(limit=10**9, optimizer="adam", schedule="1f1b", micro_batches=4, recompute="auto"),
    MemorySettings(limit=10**9, optimizer="momentum", schedule="gpipe", recompute="always"),
    MemorySettings(limit=10**9, optimizer="sgd", schedule="async", micro_batches=2, recompute="never"),
]


def random_runs(problem: Problem, rng: random.Random) -> np.ndarray:
    """Starts of runs at about a third of the allowed cuts."""
    allowed = [c for c in range(1, problem.size) if not problem.no_cut[c - 1]]
    return np.array([0, *sorted(rng.sample(allowed, max(1, len(allowed) // 3)))])


def assert_prices_match(fine: Problem, starts: np.ndarray, stages: int, rng: random.Random) -> None:
    coarse = coarsened(fine, starts)
    bounds = np.append(starts, fine.size)
    grid = np.ix_(bounds, bounds)
    np.testing.assert_allclose(coarse.interval_costs(), fine.interval_costs()[grid], rtol=1e-12, atol=1e-15)
    fine_tables, coarse_tables = StageTables(fine, stages), StageTables(coarse, stages)
    for position in range(stages):
        np.testing.assert_allclose(coarse_tables.least_memory(position), fine_tables.least_memory(position)[grid])
        np.testing.assert_allclose(coarse_tables.cost(position), fine_tables.cost(position)[grid])
    # any set of whole runs, contiguous or not (metis, mpipe's devices)
    for _ in range(5):
        chosen = np.array([rng.random() < 0.4 for _ in starts])
        if not chosen.any():
            continue
        members = chosen[np.repeat(np.arange(len(starts)), np.diff(bounds))]
        assert coarse.member_cost(chosen) == pytest.approx(fine.member_cost(members), rel=1e-12)
        assert coarse.recomputable(chosen) == fine.recomputable(members)
        for recompute in (False, True):
            assert coarse.stage_memory(chosen, 1, stages, recompute) == fine.stage_memory(members, 1, stages, recompute)


@pytest.mark.parametrize("model", [EXAMPLES / "gpt.py", EXAMPLES / "two_tower.py", MODELS / "shared.py",
                                   MODELS / "buffers.py", MODELS / "deep_skip.py"], ids=lambda p: p.stem)  # fmt: skip
def test_a_coarsened_model_prices_every_split_along_its_runs_as_the_whole_one(model, analyzed):
    """Costs, memory tables of every stage position (three schedules, optimizers and recompute
    policies) and member prices of non-contiguous sets, against the whole problem's."""
    graph, _ = analyzed(model)
    rng = random.Random(model.stem)
    for settings in SETTINGS:
        fine = build_problem(graph, 1.0, settings)
        assert_prices_match(fine, random_runs(fine, rng), 3, rng)


def test_two_readers_of_a_weight_merged_into_one_run_still_hold_partial_gradients():
    """A tied weight read by ops 1 and 2 of a chain: backward holds two partial gradients of it
    in any stage that holds both readers, also where one run of the coarsened problem does."""
    n = 5
    transfers = [Transfer(f"v{k}", k, [k + 1], 8, 4) for k in range(n - 1)]
    footprint = Footprint(MemorySettings(limit=10**6), np.full(n, 16.0), [StateUse("w", 100, True, [1, 2])])
    fine = Problem([f"op{k}" for k in range(n)], np.ones(n), transfers, np.zeros(n, bool), 1.0, np.ones(n) / 2, footprint)
    starts = np.array([0, 1, 3])
    coarse = coarsened(fine, starts)
    assert coarse.footprint.partial_gradients(np.array([False, True, False])) == 200
    assert_prices_match(fine, starts, 2, random.Random(0))


def chain(times: np.ndarray, crossing: np.ndarray | None = None) -> Problem:
    crossing = np.zeros(len(times) - 1) if crossing is None else crossing
    transfers = [Transfer(f"a{k}", k, [k + 1], int(crossing[k])) for k in range(len(times) - 1)]
    return Problem([f"op{k}" for k in range(len(times))], times, transfers, np.zeros(len(times), bool), 1e9)


def test_a_large_problem_is_split_within_a_window_of_the_exact_optimum(monkeypatch):
    """300 ops of random times into 4 stages with 32 places kept: a stage ends within one window
    of time (1/32 of the total) of where the exact DP on all 300 ops ends it, so the bottleneck
    is at most two windows above the optimum."""
    monkeypatch.setattr(coarsen, "MAX_CUTS", 32)
    rng = np.random.default_rng(0)
    for _ in range(5):
        problem = chain(rng.uniform(0.1, 1.0, 300))
        assert cut_candidates(problem, 4) is not None
        starts, _ = split_pipedream(problem, 4)
        bounds = [*starts, problem.size]
        optimum = max(problem.stage_cost(i, j) for i, j in zip(bounds, bounds[1:]))
        result = partition(problem, "pipedream", 4)
        window = problem.time.sum() / 32
        assert optimum <= device_bottleneck(problem, result) <= optimum + 2 * window


def test_within_a_window_the_cut_that_moves_fewest_bytes_is_kept(monkeypatch):
    """Ops of equal time where every fourth cut moves 1 byte and the others 1,000: with one kept
    cut per four ops, those kept are the cheap ones."""
    monkeypatch.setattr(coarsen, "MAX_CUTS", 16)
    crossing = np.where(np.arange(1, 64) % 4 == 2, 1, 1000)
    starts = cut_candidates(chain(np.ones(64), crossing), 2)
    assert starts is not None and len(starts) == 1 + 16
    assert all(start % 4 == 2 for start in starts[1:]), starts


def test_a_large_problem_builds_no_table_over_all_its_ops(monkeypatch):
    """3,000 ops: the interval tables (O(N^2) memory) are built over problems of at most MAX_CUTS + 1 ops
    for every method; fewer where fewer cuts are allowed."""
    sizes = []
    interval_costs = Problem.interval_costs

    def recorded(self):
        sizes.append(self.size)
        return interval_costs(self)

    monkeypatch.setattr(Problem, "interval_costs", recorded)
    problem = chain(np.random.default_rng(1).uniform(0.1, 1.0, 3000))
    for method in ("pipedream", "mpipe", "metis"):
        result = partition(problem, method, 4)
        assert len(result.stage_of) == 3000 and sorted(set(result.devices)) == [0, 1, 2, 3]
    assert sizes and max(sizes) <= coarsen.MAX_CUTS + 1, sizes
    # with cuts allowed only every 30 ops, the 100 runs between them are merged, which loses
    # nothing: the split is the exact DP's on the whole problem
    problem.no_cut = np.arange(3000) % 30 != 29
    sizes.clear()
    result = partition(problem, "pipedream", 4)
    assert max(sizes) == 100
    sizes.clear()
    exact, _ = split_pipedream(problem, 4)
    assert max(sizes) == 3000
    assert result.stage_of.tolist() == Partition.contiguous(3000, exact, [False] * 4).stage_of.tolist()


def test_every_method_on_a_coarsened_model_computes_what_the_model_computes(analyzed, tmp_path, monkeypatch):
    """gpt with 16 places kept for 2 stages: every method cuts only at kept places and keeps the
    stages in pipeline order; mpipe's pipeline (with fast links, several stages per device, its
    refinement moving cuts) passes the check against the original model."""
    monkeypatch.setattr(coarsen, "MAX_CUTS", 16)
    graph, model_file = analyzed(EXAMPLES / "gpt.py")
    probe = build_problem(graph, 1.0)
    starts = cut_candidates(probe, 2)
    assert starts is not None and probe.max_stages() > 16
    folders = {}
    for method in sorted(METHODS):
        folders[method], result, problem = write(graph, model_file, tmp_path / method, method, 2, bandwidth=100.0)
        if method == "mpipe":
            assert len(result.devices) > 2, result.devices
        stage_starts = [k for k in range(1, problem.size) if result.stage_of[k] != result.stage_of[k - 1]]
        assert set(stage_starts) <= set(starts.tolist()), method
        assert_pipeline_order(problem, result)
    assert_check_passes(folders["mpipe"])


def test_a_memory_limit_on_a_coarsened_model_is_kept(analyzed, monkeypatch):
    """gpt under a limit one byte below the least peak of any split without recomputation: the
    coarsened split recomputes and keeps every stage within the limit as the whole problem
    prices it."""
    monkeypatch.setattr(coarsen, "MAX_CUTS", 16)
    graph, _ = analyzed(EXAMPLES / "gpt.py")
    plain_peak, _ = least_peak(StageTables(build_problem(graph, 1.0, MemorySettings(recompute="never")), 2))
    problem = build_problem(graph, 1.0, MemorySettings(limit=int(plain_peak) - 1))
    limited = partition(problem, "pipedream", 2)
    assert any(limited.recompute)
    for s in range(2):
        assert problem.stage_memory(limited.members(s), s, 2, limited.recompute[s]).total < plain_peak


def test_ftc_compile_says_when_it_considers_only_some_of_the_cuts(tmp_path, monkeypatch):
    monkeypatch.setattr(coarsen, "MAX_CUTS", 16)
    compiled = compile_model(EXAMPLES / "mlp.py", tmp_path / "few", CompileOptions(stages=2))
    assert not any("places to cut" in note for note in compiled.notes)
    compiled = compile_model(EXAMPLES / "gpt.py", tmp_path / "many", CompileOptions(stages=2))
    allowed = build_problem(compiled.graph, 1.0).max_stages() - 1
    assert f"with {allowed:,} places to cut: the partitioner considers 16 of them" in "\n".join(compiled.notes)


def test_more_mpipe_blocks_than_a_coarsened_graph_has_runs_says_how_many_it_packed(tmp_path, monkeypatch):
    """Coarsened to 17 runs (16 kept cuts), gpt's mixed pipe packs at most 17 blocks: the note
    says 17, not the number of places the whole graph could be cut at, and the pipeline is the
    one --blocks 17 gives."""
    monkeypatch.setattr(coarsen, "MAX_CUTS", 16)
    many = compile_model(EXAMPLES / "gpt.py", tmp_path / "many", CompileOptions(stages=2, method="mpipe", blocks=40))
    assert "note: --blocks 40 is more than the 17 runs of ops 'gpt' can be cut into: mpipe packed 17 blocks" in many.notes
    exact = compile_model(EXAMPLES / "gpt.py", tmp_path / "exact", CompileOptions(stages=2, method="mpipe", blocks=17))
    assert [s["sha256"] for s in many.stages] == [s["sha256"] for s in exact.stages]
