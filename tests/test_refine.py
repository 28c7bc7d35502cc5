"""Refinement by measurement (ftc/passes/partition/refine.py), against a hidden truth: the
"measurement" is each stage's sum under true node costs that the profile gets wrong, so the
best split is known by brute force. Then `ftc compile --refine` end to end, with real timings."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ftc.check import check_pipeline
from ftc.cli import main
from ftc.frontends import trace
from ftc.passes.cleanup import eliminate_dead_code
from ftc.passes.naming import name_values
from ftc.passes.partition import build_problem, partition
from ftc.passes.partition.refine import refine, scale_stage_times, stage_compute
from ftc.profiling import DeviceModel, profile_analytic
from ftc.runtime.model_file import load_model_file

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STAGES = 3


@pytest.fixture(scope="module")
def mlp_graph():
    model_file = load_model_file(EXAMPLES / "mlp.py")
    graph, model, batch = trace(model_file, 8, "auto", "mlp")
    graph = name_values(eliminate_dead_code(graph), model_file.path.parent)
    return profile_analytic(graph, model, batch, DeviceModel(), model_file)


def build(graph):
    return build_problem(graph, 1000.0)


def split(problem):
    return partition(problem, "pipedream", STAGES)


class HiddenTruth:
    """Stage "timings" from true node costs: the profile's times with the first ops made
    `factor` times dearer, as when the profile misprices one kind of op."""

    def __init__(self, graph, dearer: int, factor: float):
        problem = build(graph)
        self.true_time = problem.time.copy()
        self.true_time[:dearer] *= factor
        self.fixed = problem.fixed
        self.calls = 0

    def stage_seconds(self, result) -> list[float]:
        return [
            float(self.true_time[result.members(s)].sum()) + self.fixed(result.members(s)).total
            for s in range(result.num_stages)
        ]

    def __call__(self, candidates) -> list[list[float]]:
        self.calls += 1
        return [self.stage_seconds(result) for _, _, result in candidates]

    def best_bottleneck(self, problem) -> float:
        """Brute force over every contiguous split into STAGES stages at allowed cuts."""
        cuts = [k for k in range(1, problem.size) if not problem.no_cut[k - 1]]
        best = float("inf")
        for chosen in itertools.combinations(cuts, STAGES - 1):
            bounds = [0, *chosen, problem.size]
            loads = []
            for i, j in zip(bounds, bounds[1:]):
                members = np.zeros(problem.size, dtype=bool)
                members[i:j] = True
                loads.append(float(self.true_time[i:j].sum()) + self.fixed(members).total)
            best = min(best, max(loads))
        return best


def test_refinement_finds_the_true_optimum_where_the_profile_misprices_a_region(mlp_graph):
    truth = HiddenTruth(mlp_graph, dearer=4, factor=3.0)
    initial = split(build(mlp_graph))
    graph, problem, result, history = refine(mlp_graph, build, split, truth, rounds=4)
    optimum = truth.best_bottleneck(problem)
    assert max(truth.stage_seconds(initial)) > 1.2 * optimum  # the profile alone splits badly
    assert max(truth.stage_seconds(result)) == pytest.approx(optimum)
    # A round's figure adds the communication at 1000 GB/s: nanoseconds.
    assert history[0].measured == pytest.approx(max(truth.stage_seconds(initial)), rel=1e-4)
    assert min(r.measured for r in history) == pytest.approx(optimum, rel=1e-4)
    assert [r.remeasured for r in history] == [r.measured for r in history]  # the truth does not drift
    assert truth.calls == len(history) + 1  # each round, then all together
    # The corrected profile predicts the kept split's stages as they measured.
    assert stage_compute(problem, result) == pytest.approx(truth.stage_seconds(result))
    assert [n.name for n in graph.nodes] == [n.name for n in mlp_graph.nodes]


def test_refinement_stops_when_a_split_comes_back_and_zero_rounds_change_nothing(mlp_graph):
    exact = HiddenTruth(mlp_graph, dearer=0, factor=1.0)  # the profile is right
    graph, problem, result, history = refine(mlp_graph, build, split, exact, rounds=5)
    assert exact.calls == 1 and len(history) == 1
    assert history[0].worst_stage_error == pytest.approx(0.0, abs=1e-12)
    assert (result.stage_of == split(build(mlp_graph)).stage_of).all()

    untouched = HiddenTruth(mlp_graph, dearer=4, factor=3.0)
    graph, problem, result, history = refine(mlp_graph, build, split, untouched, rounds=0)
    assert untouched.calls == 0 and history == [] and graph is mlp_graph


def test_a_stage_scales_its_nodes_alone_and_within_bounds(mlp_graph):
    problem = build(mlp_graph)
    result = split(problem)
    predicted = stage_compute(problem, result)
    fixed = [problem.fixed(result.members(s)).total for s in range(STAGES)]
    # Stage 0 measures twice its nodes' time, stage 1 as predicted, stage 2 a thousand times.
    measured = [fixed[0] + 2 * (predicted[0] - fixed[0]), predicted[1], fixed[2] + 1000 * (predicted[2] - fixed[2])]
    scaled = scale_stage_times(mlp_graph, problem, result, measured)
    before, after = mlp_graph.by_name(), scaled.by_name()
    for s, factor in enumerate([2.0, 1.0, 8.0]):  # 1000 is cut to MAX_CORRECTION
        for k in np.flatnonzero(result.members(s)):
            name = problem.ops[k]
            assert after[name].cost.fwd_time == pytest.approx(factor * before[name].cost.fwd_time)
            assert after[name].cost.bwd_time == pytest.approx(factor * before[name].cost.bwd_time)
            assert after[name].cost.fwd_flops == before[name].cost.fwd_flops


def test_compile_refine_end_to_end(tmp_path, capsys):
    torch.set_flush_denormal(True)
    out = tmp_path / "out"
    command = ["compile", str(EXAMPLES / "mlp.py"), "--stages", "2", "--refine", "2", "-o", str(out)]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "refine:" in printed and "timed on cpu" in printed, printed
    manifest = json.loads((out / "mlp" / "pipeline.json").read_text())
    assert manifest["settings"]["refine"] == 2 and manifest["settings"]["device"] == "cpu"
    assert check_pipeline(out / "mlp", batch_size=4).ok
    assert main(["explain", str(out / "mlp")]) == 0
    header, *rest = capsys.readouterr().out.splitlines()
    assert "analytic profile on cpu, refined by timing up to 2 splits" in header
    assert not any(line.startswith("times: estimated") for line in rest)


def test_refine_flag_errors(tmp_path, capsys):
    base = ["compile", str(EXAMPLES / "mlp.py"), "--stages", "2", "-o", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        main(base + ["--refine", "-1"])
    assert "must be at least 0" in capsys.readouterr().err
    assert main(base + ["--threads", "2"]) == 2
    assert "add --profile measure or --refine N" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(base + ["--device", "cuda", "--refine", "1"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["metis", "mpipe"])
def test_refinement_never_keeps_a_split_worse_than_the_first(mlp_graph, method):
    truth = HiddenTruth(mlp_graph, dearer=4, factor=3.0)

    def split_by(problem):
        return partition(problem, method, STAGES)

    def busiest(result) -> float:
        loads = np.zeros(max(result.devices) + 1)
        for seconds, device in zip(truth.stage_seconds(result), result.devices):
            loads[device] += seconds
        return float(loads.max())

    initial = split_by(build(mlp_graph))
    _, _, result, history = refine(mlp_graph, build, split_by, truth, rounds=4)
    assert busiest(result) <= busiest(initial) * (1 + 1e-12)
    assert busiest(result) == pytest.approx(min(r.remeasured for r in history), rel=1e-4)


def test_the_split_kept_is_the_best_when_timed_together(mlp_graph):
    """A machine that runs each later round slower (drift): judged by their rounds' timings the
    first split would win; timed together, the split that is really faster does."""
    truth = HiddenTruth(mlp_graph, dearer=4, factor=3.0)
    rounds_seen = []

    def drifting(candidates):
        rounds_seen.append(len(candidates))
        slowdown = 1.0 if len(candidates) > 1 else 2.0 ** (len(rounds_seen) - 1)
        return [[slowdown * t for t in truth.stage_seconds(result)] for _, _, result in candidates]

    _, problem, result, history = refine(mlp_graph, build, split, drifting, rounds=4)
    assert len(history) > 1 and rounds_seen[-1] == len(history)
    assert history[0].measured == min(r.measured for r in history)  # drift favours the first
    assert max(truth.stage_seconds(result)) == pytest.approx(truth.best_bottleneck(problem))
    assert stage_compute(problem, result) == pytest.approx(truth.stage_seconds(result))


def test_the_stage_timer_runs_each_stage_once_per_key_and_the_last_from_the_loss(tmp_path):
    """What is timed is the work: the last stage's run gives its parameters the gradients the
    whole model's loss gives them (same weights, batch and target as the timer draws), and the
    same split compiled twice is timed once."""
    from ftc.compiler import CompileOptions, compile_model
    from ftc.profiling.loss import as_leaves, loss_target
    from ftc.profiling.stages import StageTimer

    model_file = load_model_file(EXAMPLES / "mlp.py")
    folders = [compile_model(model_file.path, tmp_path / name, CompileOptions(stages=2)).folder for name in "ab"]
    timer = StageTimer(model_file, 8, calls=2)
    keys = timer.add(folders[0])
    assert timer.add(folders[1]) == keys and len(timer.runs) == 2
    timer.runs[keys[-1]]()
    torch.manual_seed(0)
    model = model_file.build().train()
    torch.manual_seed(1)
    output = model(*model_file.inputs(8))
    model_file.loss_fn(output, loss_target(model_file, as_leaves(output), 8, "cpu")).backward()
    expected = dict(model.named_parameters())
    last = dict(timer.stages[keys[-1]].named_parameters())
    assert last and set(last) < set(expected)
    for name, param in last.items():
        torch.testing.assert_close(param.grad, expected[name].grad, rtol=1e-5, atol=1e-7)
    seconds = timer.measure(warmup=1, repeats=2)
    assert set(seconds) == set(keys) and all(s > 0 for s in seconds.values())


def test_a_rounds_prediction_error_ignores_the_profiles_absolute_speed():
    from ftc.passes.partition.refine import _shape_error

    assert _shape_error([2.0, 4.0], [1.0, 2.0]) == 0.0  # off by 2x everywhere: proportions right
    assert _shape_error([1.0, 1.0], [1.0, 3.0]) == pytest.approx(1.0)  # k = 2: |2 - 1| / 1
