"""Every partitioning method, memory limits and recomputation.

The correctness statement (the stages compute exactly what the model computes) is checked for
every method on every example and edge-case model at P = 2 and 4, with ftc.check against the
original model. Each model is traced and profiled once per module; the methods partition it
and write a pipeline each. The memory-limited DP is checked against brute force on small
random problems, metis against acyclicity on random DAGs.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import replace

import networkx as nx
import numpy as np
import pytest

from ftc.backend.plan import plan_stages
from ftc.backend.writer import write_pipeline
from ftc.check import check_pipeline
from ftc.ir import Cost, FtcError, validate
from ftc.passes.partition import METHODS, assign, build_problem, partition
from ftc.passes.partition.memory import WORKING_COPIES, Footprint, MemorySettings, StateUse, parse_bytes
from ftc.passes.partition.metis import atom_dag, atoms_of, linearize, partition_metis, rebalance
from ftc.passes.partition.pipedream import StageTables, least_peak, split_pipedream
from ftc.passes.partition.problem import FixedCost, KindCost, Partition, Problem, Transfer
from ftc.passes.recompute import choose_recompute, recompute_rule
from ftc.runtime.model_file import load_model_file

from .conftest import EXAMPLES, MODELS

REL = 1e-9

MODEL_PATHS = [
    *(EXAMPLES / f"{name}.py" for name in ("gpt", "mlp", "resnet", "unet", "two_tower")),
    *(MODELS / f"{name}.py" for name in ("inplace", "buffers", "shared", "leaf", "shape_dependent", "deep_skip", "no_grad")),
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def write(graph, model_file, out_dir, method, stages, bandwidth=1.0):
    problem = build_problem(graph, bandwidth)
    result = partition(problem, method, stages)
    assigned = assign(graph, problem, result)
    validate(assigned)
    folder, _ = write_pipeline(assigned, problem, out_dir, model_file.path, method, {}, recompute=result.recompute)
    return folder, result, problem


def assert_check_passes(folder):
    report = check_pipeline(folder, batch_size=4)
    details = [(s.file, s.outputs, s.input_grads, s.gradients, s.state, s.problems) for s in report.stages]
    assert (
        report.ok
    ), f"{report.problems}; end to end {report.model_outputs:.2e} {report.model_gradients:.2e}; {details}"


def assert_pipeline_order(problem: Problem, result: Partition):
    """Every value flows to the same or a later stage (stage numbers are a topological order),
    and ops that draw random numbers run in program order when the stages run in order."""
    for t in problem.transfers:
        for c in t.consumers:
            assert result.stage_of[t.producer] <= result.stage_of[c], (t.value, t.producer, c)
    if problem.random is not None:
        drawing = result.stage_of[problem.random]
        assert (np.diff(drawing) >= 0).all(), drawing


# ---------------------------------------------------------------------------------------------
# Every method computes what the model computes


@pytest.mark.parametrize("model_path", MODEL_PATHS, ids=lambda p: p.stem)
def test_every_method_computes_what_the_model_computes(model_path, analyzed, tmp_path):
    """Each method at P = 2 and 4 (where the graph has room): the written pipeline passes the
    check. Methods often agree; a partition already checked for this model is not checked again."""
    graph, model_file = analyzed(model_path)
    probe = build_problem(graph, 1.0)
    checked = set()
    for method, stages in itertools.product(sorted(METHODS), (2, 4)):
        if stages > probe.max_stages():
            continue
        try:
            folder, result, problem = write(graph, model_file, tmp_path / f"{method}{stages}", method, stages)
        except FtcError as exc:
            # the uniform baseline needs as many blocks as stages; nothing else may refuse
            assert method == "uniform" and "fewer than" in exc.message, exc
            continue
        manifest = json.loads((folder / "pipeline.json").read_text())
        assert manifest["num_devices"] == stages, method
        assert len(manifest["stages"]) == result.num_stages >= stages, method
        assert [s["device"] for s in manifest["stages"]] == result.devices
        assert all(isinstance(s["recompute"], bool) for s in manifest["stages"])
        assert_pipeline_order(problem, result)
        key = (tuple(result.stage_of.tolist()), tuple(result.devices))
        if key not in checked:
            checked.add(key)
            assert_check_passes(folder)


def device_bottleneck(problem: Problem, result: Partition) -> float:
    loads = [0.0] * (max(result.devices) + 1)
    for s, device in enumerate(result.devices):
        loads[device] += problem.stage_time(result.members(s), result.recompute[s])
    return max(loads)


def test_mpipe_runs_several_stages_on_one_device(analyzed, tmp_path):
    """With fast links (100 GB/s) a mixed pipe beats one stage per device: on gpt at P=4 some
    device runs two stages and the predicted bottleneck device is lower than pipedream's exact
    contiguous split; on the mlp at P=3 and 4 such pipelines compute what the model computes
    (with stage calls free: at the default 30 us each, a tiny model's extra stages cost more
    than they balance). At the default 1 GB/s the extra boundaries cost more than they balance,
    and mpipe keeps pipedream's split, never worse."""
    graph, _ = analyzed(EXAMPLES / "gpt.py")
    for bandwidth in (1.0, 100.0):
        problem = build_problem(graph, bandwidth)
        mixed, plain = partition(problem, "mpipe", 4), partition(problem, "pipedream", 4)
        assert sorted(set(mixed.devices)) == [0, 1, 2, 3]
        assert device_bottleneck(problem, mixed) <= device_bottleneck(problem, plain) * (1 + 1e-9)
    assert len(mixed.devices) > len(set(mixed.devices)), mixed.devices
    assert device_bottleneck(problem, mixed) < device_bottleneck(problem, plain) * 0.99
    graph, model_file = analyzed(EXAMPLES / "mlp.py")
    graph = replace(graph, stage_cost=Cost())
    for stages in (3, 4):
        folder, result, problem = write(graph, model_file, tmp_path / f"P{stages}", "mpipe", stages, bandwidth=100.0)
        manifest = json.loads((folder / "pipeline.json").read_text())
        devices = [stage["device"] for stage in manifest["stages"]]
        assert manifest["num_devices"] == stages and len(devices) > stages, devices
        assert manifest["predicted"]["bottleneck_time"] == pytest.approx(device_bottleneck(problem, result))
        assert_pipeline_order(problem, result)
        assert_check_passes(folder)


def chain_problem(times: list[float]) -> Problem:
    """Ops in a chain whose values cost nothing to send."""
    transfers = [Transfer(f"a{k}", k, [k + 1], 0) for k in range(len(times) - 1)]
    return Problem([f"op{k}" for k in range(len(times))], np.array(times), transfers, np.zeros(len(times), bool), 1.0)


def test_mpipe_pays_a_stage_call_for_every_stage():
    """Times 1, 1, 1, 5, 2 on 2 devices. Contiguous, the best is 1+1+1 | 5+2, bottleneck 7; a
    mixed pipe puts 1+1+1 and 2 on one device and 5 on the other, 5 each. When each stage call
    costs 3 s, the mixed pipe's three stages make 5 + 2*3 = 11 on the first device against the
    contiguous split's 7 + 3 = 10, and mpipe must keep the contiguous split."""
    problem = chain_problem([1.0, 1.0, 1.0, 5.0, 2.0])
    mixed = partition(problem, "mpipe", 2)
    assert mixed.devices == [0, 1, 0] and device_bottleneck(problem, mixed) == 5
    problem.stage_call = FixedCost(0.0, 3.0)
    plain = partition(problem, "mpipe", 2)
    assert plain.devices == [0, 1] and device_bottleneck(problem, plain) == 10


@pytest.mark.parametrize("method", ["pipedream", "metis", "mpipe"])
def test_every_cost_aware_method_charges_the_loss_to_the_last_stage(method):
    """Twelve ops of 1 s in a chain and a loss of 4 s (1 forward, 3 backward) on 2 devices: the
    best bottleneck is 8, eight ops on the first device and four with the loss on the last; a
    method blind to the loss would cut in the middle, 6 | 6 + 4 = 10."""
    problem = chain_problem([1.0] * 12)
    problem.loss = FixedCost(1.0, 3.0)
    result = partition(problem, method, 2)
    assert device_bottleneck(problem, result) == 8
    last = result.stage_of[-1]
    assert int((result.stage_of == last).sum()) == 4


def test_metis_stages_need_not_be_contiguous(analyzed, tmp_path):
    """On the two-tower model the two towers are independent until they meet; metis may give
    them to different stages. Whatever it does, a stage is any set of ops: the backend writes
    it and the check passes. At least one model among these must yield a non-contiguous stage
    for this to test anything."""
    seen_non_contiguous = False
    for path in (EXAMPLES / "two_tower.py", EXAMPLES / "unet.py", MODELS / "deep_skip.py"):
        graph, model_file = analyzed(path)
        for stages in (2, 4):
            folder, result, problem = write(graph, model_file, tmp_path / f"{path.stem}{stages}", "metis", stages)
            if (np.diff(result.stage_of) < 0).any():
                seen_non_contiguous = True
                assert_check_passes(folder)
    assert seen_non_contiguous


def test_uniform_gives_each_stage_equal_blocks(analyzed):
    """gpt has 8 transformer blocks: uniform at P=4 puts two in each stage, the embedding in the
    first and the head in the last; at P=2, four each."""
    graph, _ = analyzed(EXAMPLES / "gpt.py")
    problem = build_problem(graph, 1.0)
    by_name = graph.by_name()
    for stages in (2, 4):
        result = partition(problem, "uniform", stages)
        blocks = [set() for _ in range(stages)]
        for k, name in enumerate(problem.ops):
            path = by_name[name].module_path or by_name[name].target
            if path.startswith("blocks."):
                blocks[result.stage_of[k]].add(path.split(".")[1])
        count = sum(1 for path in graph.modules if path.count(".") == 1 and path.startswith("blocks."))
        assert count == 8
        assert [len(b) for b in blocks] == [count // stages] * stages
        assert result.stage_of[0] == 0 and result.stage_of[-1] == stages - 1


def test_parameters_baseline_balances_parameter_bytes(analyzed):
    """The parameters baseline reaches the least possible largest per-stage parameter bytes over
    contiguous splits (brute force over the cuts of the mlp)."""
    graph, _ = analyzed(EXAMPLES / "mlp.py")
    problem = build_problem(graph, 1.0)
    weights = np.zeros(problem.size)
    for use in problem.footprint.state:
        if use.trainable:
            weights[min(use.readers)] += use.nbytes
    cuts = [k for k in range(1, problem.size) if not problem.no_cut[k - 1]]
    for stages in (2, 3):
        best = min(
            max(weights[i:j].sum() for i, j in zip((0, *c), (*c, problem.size)))
            for c in itertools.combinations(cuts, stages - 1)
        )
        result = partition(problem, "parameters", stages)
        got = max(weights[result.stage_of == s].sum() for s in range(stages))
        assert got == pytest.approx(best)


# ---------------------------------------------------------------------------------------------
# Memory: the model, the limited DP against brute force, the error


def test_parse_bytes():
    assert parse_bytes("16GB") == 16 * 10**9
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1.5k") == 1500
    assert parse_bytes("80e9") == 80 * 10**9
    for bad in ("", "GB", "12 parsecs", "0"):
        with pytest.raises(FtcError):
            parse_bytes(bad)


def test_stage_memory_by_hand():
    """Two ops; at the compile batch size op0 reads a 100-byte trainable weight and a 10-byte
    buffer, saves 70 bytes and sends a 30-byte value to op1, which saves 50 bytes; their largest
    outputs are 40 and 20 bytes. Adam: two optimizer copies. Under 1F1B with 2 stages and 2
    micro-batches (as many as stages), a micro-batch holds half of each, the first stage keeps 2
    micro-batches in flight, the second 1; a backward also holds WORKING_COPIES of its
    stage's largest output and a new gradient of its largest weight (the working set), and a
    stage that receives holds the gradient its backward sends back until it is received. Adam's
    step on the CPU makes two copies of the largest weight at a time, on CUDA one of them all."""
    W = WORKING_COPIES
    state = [StateUse("w", 100, True, [0]), StateUse("b", 10, False, [0])]
    footprint = Footprint(MemorySettings(optimizer="adam"), np.array([70.0, 50.0]), state, np.array([40.0, 20.0]))
    problem = Problem(
        ["a", "b"], np.ones(2), [Transfer("v", 0, [1], 30, 30)], np.zeros(2, bool), 1.0, footprint=footprint
    )
    first, second = np.array([True, False]), np.array([False, True])
    memory = problem.stage_memory(first, 0, 2, False)
    assert (memory.parameters, memory.gradients, memory.optimizer) == (110, 100, 200)
    assert memory.activations == (2 * 70 + W * 40) / 2 + 100  # saved per micro-batch in flight, working set
    assert memory.temporaries == 2 * 100 and memory.total == 410 + max(memory.activations, 200)
    # A recomputing stage keeps what it sends and receives per micro-batch in flight, one
    # micro-batch's saved values and the working set.
    assert problem.stage_memory(first, 0, 2, True).activations == (2 * 30 + 70 + W * 40) / 2 + 100
    assert problem.stage_memory(second, 1, 2, False).total == ((50 + 30) * 1 + W * 20 + 30) / 2
    assert problem.stage_memory(second, 1, 2, True).activations == (30 * 1 + 50 + W * 20 + 30) / 2
    gpipe = Footprint(MemorySettings(schedule="gpipe", micro_batches=5), footprint.saved, state, footprint.largest)
    problem.footprint = gpipe
    assert problem.stage_memory(second, 1, 2, False).activations == ((50 + 30) * 5 + W * 20 + 30) / 5  # the whole batch
    # Adam on CUDA steps foreach: one copy of all the stage's weights; SGD steps in place.
    two_weights = [*state, StateUse("w2", 300, True, [0])]
    for settings, step in ((MemorySettings(device="cuda"), 400), (MemorySettings(), 600), (MemorySettings(optimizer="sgd"), 0)):
        problem.footprint = Footprint(settings, footprint.saved, two_weights, footprint.largest)
        assert problem.stage_memory(first, 0, 2, False).temporaries == step


def random_memory_problem(rng: random.Random) -> Problem:
    """A random problem with a footprint: op times, forward times, saved bytes, values between
    ops, parameters (some tied: read by two ops) and a random limit and policy."""
    n = rng.randint(2, 8)
    time = np.array([float(rng.randint(1, 9)) for _ in range(n)])
    fwd = np.array([t * rng.choice([0.3, 0.5]) for t in time])
    transfers = []
    for p in range(n - 1):
        for c in rng.sample(range(p + 1, n), rng.randint(1, min(2, n - 1 - p))):
            size = rng.randint(1, 20)  # a value's bytes at the compile batch size: a micro-batch holds 1/M
            transfers.append(Transfer(f"v{p}_{c}", p, [c], 2 * size, 4 * size))
    state = [StateUse(f"w{k}", rng.randint(1, 60), rng.random() < 0.8, sorted(rng.sample(range(n), rng.choice([1, 1, 2]))))
             for k in range(rng.randint(0, 4))]  # fmt: skip
    settings = MemorySettings(
        limit=rng.randint(60, 700),
        optimizer=rng.choice(["sgd", "momentum", "adam"]),
        schedule=rng.choice(["1f1b", "gpipe"]),
        micro_batches=rng.choice([None, 2, 8]),
        recompute=rng.choice(["auto", "always", "never"]),
    )
    saved = [float(rng.randint(0, 120)) for _ in range(n)]
    largest = np.array([rng.choice([0.0, 0.1, 0.25]) * bytes_ for bytes_ in saved])
    footprint = Footprint(settings, np.array(saved), state, largest)
    no_cut = np.array([rng.random() < 0.2 for _ in range(n)], dtype=bool)
    return Problem([f"op{k}" for k in range(n)], time, transfers, no_cut, rng.choice([1.0, 4.0]), fwd, footprint)


def brute_force(problem: Problem, stages: int):
    """(optimal bottleneck or inf, least peak memory) over every contiguous split, each stage
    priced from the definitions (Problem.stage_memory, stage_time) and the recompute rule."""
    settings = problem.footprint.settings
    cuts = [k for k in range(1, problem.size) if not problem.no_cut[k - 1]]
    best = peak = np.inf
    for chosen in itertools.combinations(cuts, stages - 1):
        bounds = [0, *chosen, problem.size]
        worst = worst_memory = 0.0
        for s, (i, j) in enumerate(zip(bounds, bounds[1:])):
            members = np.zeros(problem.size, dtype=bool)
            members[i:j] = True
            plain = problem.stage_memory(members, s, stages, False).total
            recomputed = problem.stage_memory(members, s, stages, True).total
            flag, fits = recompute_rule(settings.recompute, settings.limit, plain, recomputed)
            least = {"never": plain, "always": recomputed}.get(settings.recompute, min(plain, recomputed))
            worst_memory = max(worst_memory, least)
            worst = max(worst, problem.stage_time(members, bool(flag)) if fits else np.inf)
        best, peak = min(best, worst), min(peak, worst_memory)
    return best, peak


def test_memory_limited_dp_matches_brute_force():
    """On 200 random problems with memory limits, optimizers, schedules and recompute policies:
    the DP's split is within the limit, reaches the brute-force optimal bottleneck (recompute
    time included), its recompute flags follow the rule, and when nothing fits it raises
    FtcError with the brute-force least peak."""
    rng = random.Random(31337)
    feasible = infeasible = recomputing = 0
    for case in range(200):
        problem = random_memory_problem(rng)
        settings = problem.footprint.settings
        for stages in range(1, problem.max_stages() + 1):
            optimum, peak = brute_force(problem, stages)
            if not np.isfinite(optimum):
                with pytest.raises(FtcError) as info:
                    split_pipedream(problem, stages)
                assert "least possible peak" in info.value.message
                assert least_peak(StageTables(problem, stages))[0] == pytest.approx(peak)
                infeasible += 1
                continue
            starts, flags = split_pipedream(problem, stages)
            result = Partition.contiguous(problem.size, starts, flags)
            costs = []
            for s in range(stages):
                members = result.members(s)
                memory = problem.stage_memory(members, s, stages, flags[s]).total
                assert memory <= settings.limit, (case, stages, s)
                plain = problem.stage_memory(members, s, stages, False).total
                recomputed = problem.stage_memory(members, s, stages, True).total
                assert flags[s] == bool(recompute_rule(settings.recompute, settings.limit, plain, recomputed)[0])
                costs.append(problem.stage_time(members, flags[s]))
            assert max(costs) == pytest.approx(optimum, rel=REL), (case, stages, starts)
            feasible += 1
            recomputing += any(flags) and settings.recompute == "auto"
    assert feasible > 300 and infeasible > 200 and recomputing > 20, (feasible, infeasible, recomputing)


def test_infeasible_hint_says_only_what_brute_force_confirms():
    """On random problems where no split fits the limit, each stage count the hint names is
    checked by brute force over every count: "no number of stages fits" (some run of ops holds
    more weights than the limit) means none does, "use --stages k, which fits" that k does,
    "up to m do not fit" that none up to m does (it said "try --stages 15 or more" for a head
    whose weights alone exceeded the limit)."""
    rng = random.Random(7)
    claims = {"none fits": 0, "use": 0, "try": 0}
    for case in range(300):
        problem = random_memory_problem(rng)
        counts = range(1, problem.max_stages() + 1)
        fitting = [k for k in counts if np.isfinite(brute_force(problem, k)[0])]
        for stages in counts:
            if stages in fitting:
                continue
            with pytest.raises(FtcError) as info:
                split_pipedream(problem, stages)
            hint = info.value.hint
            if "no number of stages fits" in hint:
                assert not fitting, (case, stages, hint)
                claims["none fits"] += 1
            if used := re.search(r"use --stages (\d+), which fits", hint):
                assert int(used[1]) in fitting, (case, stages, hint)
                claims["use"] += 1
            if tried := re.search(r"try --stages (\d+) or more \(up to (\d+) do not fit\)", hint):
                assert not [k for k in fitting if stages < k <= int(tried[2])], (case, stages, hint)
                claims["try"] += 1
    assert claims["none fits"] > 50 and claims["use"] > 20, claims


def test_infeasible_limit_names_the_least_peak(analyzed):
    """gpt into 4 stages under a 1 MB limit: the error says the least peak that would fit (the
    brute-force-checked least_peak) and what to do."""
    graph, _ = analyzed(EXAMPLES / "gpt.py")
    problem = build_problem(graph, 1.0, MemorySettings(limit=10**6))
    with pytest.raises(FtcError) as info:
        partition(problem, "pipedream", 4)
    peak, _ = least_peak(StageTables(problem, 4))
    assert info.value.message.startswith("no split of gpt into 4 stages fits 1.0 MB per device")
    assert f"least possible peak is {peak / 1e6:.1f} MB" in info.value.message
    # no number of stages fits: the MLP's first Linear alone, its weights, gradients and two Adam
    # states, holds more than 1 MB (it suggested 9 stages or more)
    fc = load_model_file(EXAMPLES / "gpt.py").build("meta").blocks[0].fc
    assert sum(p.numel() * p.element_size() for p in fc.parameters()) * 4 > 10**6
    assert "--memory-limit" in info.value.hint and "--stages" not in info.value.hint
    assert "no number of stages fits 1.0 MB: blocks_0_fc alone holds 1.1 MB" in info.value.hint
    # no more stages are suggested where none are possible
    mlp, _ = analyzed(EXAMPLES / "mlp.py")
    tight = build_problem(mlp, 1.0, MemorySettings(limit=10**4))
    with pytest.raises(FtcError) as at_most:
        partition(tight, "pipedream", tight.max_stages())
    assert "--stages" not in at_most.value.hint
    # the least peak is what it says: a limit at it fits, just under it does not
    fitted = build_problem(graph, 1.0, MemorySettings(limit=int(np.ceil(peak))))
    assert partition(fitted, "pipedream", 4).num_stages == 4
    with pytest.raises(FtcError):
        partition(build_problem(graph, 1.0, MemorySettings(limit=int(peak) - 1)), "pipedream", 4)


def test_recompute_auto_turns_on_exactly_where_the_limit_requires(analyzed):
    """With the gpt split fixed, a limit at the first stage's memory keeps every stage plain; one
    byte less makes exactly that stage recompute (1F1B: it keeps the most micro-batches), and
    the last stage never recomputes (one micro-batch in flight, nothing to save)."""
    graph, _ = analyzed(EXAMPLES / "gpt.py")
    problem = build_problem(graph, 1.0)
    result = partition(problem, "pipedream", 4)
    plain = [problem.stage_memory(result.members(s), s, 4, False).total for s in range(4)]
    recomputed = [problem.stage_memory(result.members(s), s, 4, True).total for s in range(4)]
    assert plain[0] == max(plain) and recomputed[3] >= plain[3]
    for limit, expected in ((plain[0], [False] * 4), (plain[0] - 1, [True, False, False, False])):
        problem.footprint = replace(problem.footprint, settings=MemorySettings(limit=limit))
        assert choose_recompute(problem, result.stage_of, result.devices) == expected
    # the DP, free to move the cuts, recomputes a stage exactly when its plain memory exceeds the limit
    limit = (plain[0] + plain[1]) // 2
    problem.footprint = replace(problem.footprint, settings=MemorySettings(limit=limit))
    chosen = partition(problem, "pipedream", 4)
    for s in range(4):
        needs = problem.stage_memory(chosen.members(s), s, 4, False).total > limit
        assert chosen.recompute[s] == needs
    assert not chosen.recompute[3]
    # a recomputing stage pays its forward again
    members = chosen.members(0)
    assert problem.stage_time(members, True) == pytest.approx(
        problem.stage_time(members, False) + problem.forward[members].sum()
    )


def test_every_method_keeps_each_device_within_the_limit(analyzed):
    """Under a limit 20% above the least peak of 4 stages (so some stages must recompute),
    every method either keeps each device's memory (the sum of its stages', with their
    recompute flags) within it or refuses with an error naming the limit; the cost-aware
    methods pipedream and mpipe always fit."""
    graph, _ = analyzed(EXAMPLES / "gpt.py")
    peak, _ = least_peak(StageTables(build_problem(graph, 1.0, MemorySettings(limit=1)), 4))
    limit = int(peak * 1.2)
    problem = build_problem(graph, 1.0, MemorySettings(limit=limit))
    fitted = set()
    for method in sorted(METHODS):
        try:
            result = partition(problem, method, 4)
        except FtcError as exc:
            assert "limit" in exc.message, exc
            continue
        used = [0] * 4
        for s, device in enumerate(result.devices):
            used[device] += problem.stage_memory(result.members(s), s, result.num_stages, result.recompute[s]).total
        assert max(used) <= limit, (method, used, limit)
        fitted.add(method)
    assert {"pipedream", "mpipe"} <= fitted, fitted
    assert any(partition(problem, "pipedream", 4).recompute)


def test_a_baseline_over_the_limit_points_to_pipedream_only_where_pipedream_fits(analyzed):
    graph, _ = analyzed(EXAMPLES / "gpt.py")
    peak, _ = least_peak(StageTables(build_problem(graph, 1.0, MemorySettings(limit=1, recompute="never")), 4))
    for limit, hint in ((int(np.ceil(peak)), "or use --method pipedream, which splits within the limit"),
                        (int(peak) - 1, "(no split into 4 stages fits: the least possible peak is")):  # fmt: skip
        problem = build_problem(graph, 1.0, MemorySettings(limit=limit, recompute="never"))
        with pytest.raises(FtcError) as info:
            partition(problem, "uniform", 4)
        assert hint in info.value.hint


def test_a_baseline_over_the_limit_asks_to_allow_recomputation_only_where_it_is_off(analyzed):
    """Under --recompute auto (the default) the baseline's stages had recomputed already, and the
    hint still said to allow --recompute; with a limit one byte under the least peak it also
    gave that peak rounded to the limit's figure ("the least possible peak is 1.1 MB" against
    --memory-limit 1.1MB)."""
    graph, _ = analyzed(EXAMPLES / "mlp.py")
    for policy, allow in (("auto", False), ("never", True)):
        settings = MemorySettings(limit=1, recompute=policy)
        peak, _ = least_peak(StageTables(build_problem(graph, 1.0, settings), 4))
        problem = build_problem(graph, 1.0, replace(settings, limit=int(peak) - 1))
        with pytest.raises(FtcError) as info:
            partition(problem, "uniform", 4)
        assert ("allow --recompute" in info.value.hint) == allow, info.value.hint
        assert not allow or "allow --recompute auto" in info.value.hint
        assert f"the least possible peak is {peak:,.0f} B against {int(peak) - 1:,} B" in info.value.hint


def test_mpipe_builds_its_quadratic_tables_once(analyzed, monkeypatch):
    """Interval costs and interval memory take O(N^2) time and memory: mpipe's coarsenings,
    packings, refinements and its one-stage-per-device candidate share one of each."""
    graph, _ = analyzed(EXAMPLES / "gpt.py")
    calls = {"interval_costs": 0, "interval_tables": 0}
    for cls, name in ((Problem, "interval_costs"), (Footprint, "interval_tables")):
        original = getattr(cls, name)

        def counted(self, *args, original=original, name=name):
            calls[name] += 1
            return original(self, *args)

        monkeypatch.setattr(cls, name, counted)
    peak, _ = least_peak(StageTables(build_problem(graph, 1.0, MemorySettings(limit=1)), 4))
    for limit in (None, int(peak * 1.2)):
        calls.update(interval_costs=0, interval_tables=0)
        result = partition(build_problem(graph, 1.0, MemorySettings(limit=limit)), "mpipe", 4)
        assert result.num_stages >= 4
        assert calls == {"interval_costs": 1, "interval_tables": 0 if limit is None else 1}, (limit, calls)


def test_recompute_never_and_always():
    problem = random_memory_problem(random.Random(5))
    footprint = problem.footprint
    for policy, expected in (("never", False), ("always", True)):
        problem.footprint = replace(footprint, settings=MemorySettings(recompute=policy))
        result = Partition.contiguous(problem.size, [0], [False])
        assert choose_recompute(problem, result.stage_of, result.devices) == [expected]


# ---------------------------------------------------------------------------------------------
# metis on random DAGs


def random_dag_problem(rng: random.Random) -> Problem:
    """Ops in a topological order with random edges (some long), random times and bytes, a few
    forbidden cuts and ops that draw random numbers."""
    n = rng.randint(8, 60)
    transfers = []
    for p in range(n - 1):
        for c in sorted(rng.sample(range(p + 1, n), rng.randint(1, min(3, n - 1 - p)))):
            size = rng.randint(1, 1000)
            transfers.append(Transfer(f"v{p}_{c}", p, [c], size, size))
    time = np.array([rng.uniform(0.1, 10.0) for _ in range(n)])
    no_cut = np.array([rng.random() < 0.15 for _ in range(n)], dtype=bool)
    random_ops = np.array([rng.random() < 0.2 for _ in range(n)], dtype=bool)
    return Problem([f"op{k}" for k in range(n)], time, transfers, no_cut, 1e3, random=random_ops)


def test_metis_output_is_acyclic_on_random_dags():
    """On 40 random DAGs and P = 2..6: exactly P non-empty stages, every value flows forward in
    stage order (so the stage graph is acyclic), random ops run in program order, and ops joined
    by a forbidden cut share a stage."""
    rng = random.Random(99)
    non_contiguous = 0
    for case in range(40):
        problem = random_dag_problem(rng)
        for stages in range(2, min(6, problem.max_stages()) + 1):
            result = partition_metis(problem, stages)
            assert result.num_stages == stages
            assert set(result.stage_of.tolist()) == set(range(stages)), (case, stages)
            assert_pipeline_order(problem, result)
            graph = nx.DiGraph()
            graph.add_edges_from(
                (int(result.stage_of[t.producer]), int(result.stage_of[c]))
                for t in problem.transfers
                for c in t.consumers
                if result.stage_of[t.producer] != result.stage_of[c]
            )
            assert nx.is_directed_acyclic_graph(graph)
            atom = atoms_of(problem)
            for a in set(atom.tolist()):
                assert len(set(result.stage_of[atom == a].tolist())) == 1
            non_contiguous += bool((np.diff(result.stage_of) < 0).any())
    assert non_contiguous > 50, non_contiguous


def test_metis_rebalancing_keeps_each_stage_s_cost_as_member_cost_prices_it():
    """Step 4 updates the two stages' costs move by move: an atom's ops, their transfers, the
    kinds of op the source no longer holds and the target newly holds (Problem.kinds), and the
    loss with the last op. It once moved only times and transfers, so a stage's running cost
    drifted from its cost (a kind charged to a stage left without its ops), and the bottleneck
    the moves lowered was not the stages'."""
    rng = random.Random(12)
    rebalanced = 0
    for case in range(30):
        problem = random_dag_problem(rng)
        kind_of = np.array([rng.randrange(4) for _ in range(problem.size)])
        problem.kinds = [KindCost(np.flatnonzero(kind_of == kind), FixedCost(rng.uniform(0, 5), rng.uniform(0, 5)))
                         for kind in sorted(set(kind_of.tolist()))]  # fmt: skip
        problem.loss = FixedCost(rng.uniform(0, 20), rng.uniform(0, 20))
        stages = min(3, problem.max_stages())
        atom = atoms_of(problem)
        dag = atom_dag(problem, atom)
        start = [min(stages - 1, a * stages // len(dag)) for a in range(len(dag))]  # stages along the program order
        balancer = rebalance(problem, dag, atom, start, stages)
        stage_of = np.array([balancer.labels[a] for a in atom])
        rebalanced += balancer.labels != start
        expected = [problem.member_cost(stage_of == s) for s in range(stages)]
        np.testing.assert_allclose(balancer.cost, expected, rtol=1e-9, err_msg=str(case))
    assert rebalanced > 10, rebalanced


def test_metis_reordering_keeps_each_op_s_costs_with_it():
    """Step 5 cuts the ops reordered stage by stage (linearize): every figure kept per op
    position moves with its op (the kinds a stage pays for once, the forward's transients, the
    model outputs the loss holds), so each stage, a run of the new order, costs and holds in the
    DP's tables what the same ops cost and hold in the original order. The kinds' positions and
    the transients once stayed where the ops had been, so the DP charged a kind to stages that
    held none of its ops, and counted other ops' transients."""
    rng = random.Random(11)
    reordered_cases = 0
    for case in range(30):
        problem = random_dag_problem(rng)
        n = problem.size
        kind_of = np.array([rng.randrange(3) for _ in range(n)])
        problem.kinds = [KindCost(np.flatnonzero(kind_of == kind), FixedCost(rng.uniform(0, 5), rng.uniform(0, 5)))
                         for kind in sorted(set(kind_of.tolist()))]  # fmt: skip
        problem.footprint = Footprint(
            MemorySettings(recompute="never"), np.array([rng.uniform(0, 100) for _ in range(n)]), [], np.zeros(n),
            loss_saved=10.0, outputs=[(rng.randrange(n), 50.0), (n - 1, 20.0)], outputs_saved=False,
            transient=np.array([rng.uniform(0, 1000) for _ in range(n)]),
        )  # fmt: skip
        stages = min(3, problem.max_stages())
        stage_of = partition_metis(problem, stages).stage_of
        reordered, order = linearize(problem, stage_of)
        reordered_cases += bool((order != np.arange(n)).any())
        tables = StageTables(reordered, stages)
        for s in range(stages):
            members = stage_of == s
            run = np.flatnonzero(members[order])
            i, j = int(run[0]), int(run[-1]) + 1
            assert reordered.interval_costs()[i, j] == pytest.approx(problem.member_cost(members)), (case, s)
            expected = problem.stage_memory(members, s, stages, False).total
            assert tables.least_memory(s)[i, j] == pytest.approx(expected, abs=1), (case, s)  # rounded up either side
    assert reordered_cases > 10, reordered_cases


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_memory_flags(tmp_path, capsys):
    """--memory-limit takes units; a limit nothing fits is a usage error (exit 2) naming the
    least peak; a fitting one writes each stage's memory and recompute flag into pipeline.json."""
    from ftc.cli import main

    model = str(EXAMPLES / "mlp.py")
    assert main(["compile", model, "--stages", "2", "-o", str(tmp_path), "--memory-limit", "1kB"]) == 2
    assert "least possible peak" in capsys.readouterr().err
    args = ["compile", model, "--stages", "2", "-o", str(tmp_path), "--memory-limit", "1GiB", "--optimizer", "sgd"]
    assert main([*args, "--method", "mpipe", "--blocks", "3"]) == 0
    manifest = json.loads((tmp_path / "mlp" / "pipeline.json").read_text())
    assert manifest["settings"]["memory_limit"] == 2**30 and manifest["settings"]["blocks"] == 3
    for stage in manifest["stages"]:
        memory = stage["cost"]["memory"]
        assert memory["optimizer"] == 0 and memory["gradients"] > 0 and stage["recompute"] is False
        assert memory["total"] == sum(memory[k] for k in ("parameters", "gradients", "optimizer", "activations"))
        assert memory["temporaries"] == 0  # SGD steps in place
    assert main([*args, "--blocks", "3", "--force"]) == 2
    assert "--blocks applies to --method mpipe" in capsys.readouterr().err


def test_a_tensor_two_stages_of_one_device_share_counts_once_against_the_limit(analyzed):
    """shared.py's embedding is read by the first op and the tied head at the end: with the
    first and last stage on one device (mixed-pipe) the device holds one table, one gradient and
    one optimizer state, which the sum of the two stages' estimates counted twice."""
    graph, _ = analyzed(MODELS / "shared.py")
    n = len(build_problem(graph, 1.0).ops)
    result = Partition.contiguous(n, [0, n // 3, 2 * n // 3], [False] * 3)
    result = replace(result, devices=[0, 1, 0])
    settings = MemorySettings(recompute="never", optimizer="adam")
    problem = build_problem(graph, 1.0, settings)
    stages = [problem.stage_memory(result.members(s), s, 3, False).total for s in (0, 2)]
    shared = problem.footprint.shared_bytes([result.members(0), result.members(2)])
    # what the stage code of both stages adopts: the table, the block called at three places, the
    # scale; each with its gradient and Adam's two moments
    plans = plan_stages(assign(graph, problem, result))
    both = set(plans[0].state) & set(plans[2].state)
    assert {"embed.weight", "block.0.weight", "scale"} <= both
    assert shared == sum(graph.state[key].meta.nbytes * (2 + 2) for key in both)
    for limit, fits in ((sum(stages) - shared, True), (sum(stages) - shared - 1, False)):
        limited = build_problem(graph, 1.0, replace(settings, limit=limit))
        if fits:
            assert choose_recompute(limited, result.stage_of, result.devices) == [False] * 3
        else:
            with pytest.raises(FtcError, match="device 0 of the shared pipeline needs"):
                choose_recompute(limited, result.stage_of, result.devices)


def test_mpipe_packs_the_holders_of_a_tied_tensor_together_when_it_fits_counted_once():
    """Four ops in a chain, one block each, times 2, 3, 1, 2 s on 2 devices; ops 0 and 3 read a
    tied 100-byte weight W (an embedding and its head), ops 1 and 2 nothing; momentum: one
    optimizer copy. Each holder's stage needs W, its gradient, its momentum and the new gradient
    of its largest weight: 400 bytes. The only split into 2 devices of 4 s each puts ops 0 and 3
    on one device and 1, 2 on the other, where one W, its gradient and momentum (300) and the two
    stages' new gradients (200) make 500 bytes: a limit of 500 holds them when W counts once,
    not twice (800). Counted twice, the packing keeps them apart, at 5 s."""
    weight = 100
    state = [StateUse("embed.weight", weight, True, [0, 3])]
    settings = MemorySettings(limit=5 * weight, optimizer="momentum", recompute="never")
    footprint = Footprint(settings, np.zeros(4), state, np.zeros(4))
    transfers = [Transfer(f"a{k}", k, [k + 1], 0) for k in range(3)]
    problem = Problem([f"op{k}" for k in range(4)], np.array([2.0, 3.0, 1.0, 2.0]), transfers, np.zeros(4, bool), 1.0,
                      footprint=footprint)  # fmt: skip
    result = partition(problem, "mpipe", 2)
    assert list(result.stage_of) == [0, 1, 1, 2] and result.devices == [0, 1, 0]
    assert device_bottleneck(problem, result) == 4
    stages = [problem.stage_memory(result.members(s), s, 3, False).total for s in range(3)]
    assert stages == [4 * weight, 0, 4 * weight]
    holders = [result.members(0), result.members(2)]
    assert sum(stages) - problem.footprint.shared_bytes(holders) == 5 * weight
    assert choose_recompute(problem, result.stage_of, result.devices) == [False] * 3


def test_shared_bytes_of_intervals_match_those_of_masks():
    """On random problems with tied tensors, the interval form mpipe packs with and the boolean
    mask form the device check uses agree, for random sets of disjoint intervals."""
    rng = random.Random(7)
    for _ in range(200):
        footprint = random_memory_problem(rng).footprint
        n = len(footprint.saved)
        cuts = sorted(rng.sample(range(1, n), rng.randint(0, n - 1))) if n > 1 else []
        bounds = [0, *cuts, n]
        intervals = [pair for pair in zip(bounds, bounds[1:]) if rng.random() < 0.6]
        masks = []
        for i, j in intervals:
            members = np.zeros(n, dtype=bool)
            members[i:j] = True
            masks.append(members)
        copies = {"sgd": 0, "momentum": 1, "adam": 2}[footprint.settings.optimizer]
        expected = 0
        for use in footprint.state:
            holders = sum(1 for i, j in intervals if any(i <= r < j for r in use.readers))
            expected += max(holders - 1, 0) * use.nbytes * ((2 + copies) if use.trainable else 1)
        assert footprint.shared_interval_bytes(intervals) == footprint.shared_bytes(masks) == expected


def test_mpipe_refinement_moves_a_stage_onto_the_device_of_the_tensor_it_shares():
    """Ops of 2, 4 and 2 s, the first and last reading a tied 100-byte weight (400 bytes per
    holder's stage, as above), start on devices 0, 1, 1: loads 2 and 6 s. Moving the last stage to
    device 0 makes 4 and 4, with 500 bytes on device 0 (W counted once), within a limit of 500."""
    from ftc.passes.partition.mpipe import _refine

    weight = 100
    state = [StateUse("embed.weight", weight, True, [0, 2])]
    settings = MemorySettings(limit=5 * weight, optimizer="momentum", recompute="never")
    footprint = Footprint(settings, np.zeros(3), state, np.zeros(3))
    transfers = [Transfer(f"a{k}", k, [k + 1], 0) for k in range(2)]
    problem = Problem(["op0", "op1", "op2"], np.array([2.0, 4.0, 2.0]), transfers, np.zeros(3, bool), 1.0,
                      footprint=footprint)  # fmt: skip
    assert _refine(problem, [0, 1, 2], [0, 1, 1], 2, StageTables(problem, 3)) == ([0, 1, 2], [0, 1, 0])
