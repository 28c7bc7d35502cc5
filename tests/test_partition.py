"""Tests of the partitioner: the stage cost model (problem.py) and the PipeDream dynamic program
(pipedream.py), checked against brute force on many small random problems."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from ftc.ir import FtcError, SeqMeta, TensorMeta
from ftc.passes.partition.pipedream import split_pipedream
from ftc.passes.partition.problem import FixedCost, KindCost, Problem, Transfer, comm_bytes, gradient_bytes

REL = 1e-9


def partition_pipedream(problem: Problem, stages: int) -> list[int]:
    """The DP's stage starts (no memory limit here, so no stage recomputes)."""
    starts, recompute = split_pipedream(problem, stages)
    assert not any(recompute)
    return starts


# ---------------------------------------------------------------------------------------------
# Random problems and brute force


def random_problem(rng: random.Random, max_ops: int = 9) -> Problem:
    """A random Problem shaped like build_problem's output.

    Half the problems use small integers everywhere (exact float arithmetic, so exact ties
    between splits are common and the DP's tie-break is exercised); the others use random floats.
    """
    n = rng.randint(1, max_ops)
    exact = rng.random() < 0.5
    if exact:
        time = np.array([float(rng.randint(0, 6)) for _ in range(n)])
        bandwidth = float(rng.choice([1, 2, 4]))
    else:
        time = np.array([rng.choice([0.0, rng.uniform(0, 10), rng.uniform(0, 1)]) for _ in range(n)])
        bandwidth = rng.uniform(0.3, 50.0)

    def nbytes() -> int:
        return rng.choice([0, rng.randint(1, 8), rng.randint(1, 200)])

    transfers: list[Transfer] = []
    count = itertools.count()

    def add(producer: int, consumers) -> None:
        transfers.append(Transfer(f"v{next(count)}", producer, sorted(set(consumers)), nbytes()))

    # Values made by ops, read by 1-3 later ops (mostly the next ones, sometimes far away).
    for p in range(n - 1):
        for _ in range(rng.choice([0, 1, 1, 1, 2])):
            later = list(range(p + 1, n))
            k = rng.randint(1, min(3, len(later)))
            if rng.random() < 0.6:
                consumers = later[:k]  # local chain
            else:
                consumers = rng.sample(later, k)
            add(p, consumers)
    # Long skip connections.
    if n >= 3:
        for _ in range(rng.randint(0, 2)):
            p = rng.randint(0, n - 3)
            add(p, [rng.randint(p + 2, n - 1)])
    # Model inputs: at position 0, read anywhere (including by op 0 itself).
    for _ in range(rng.randint(0, 2)):
        add(0, rng.sample(range(n), rng.randint(1, min(3, n))))
    # Model outputs: read by the last op (the loss), possibly also by ops in between; an output
    # made by the last op itself has consumers == [producer] and moves nothing.
    for _ in range(rng.randint(0, 2)):
        p = rng.randint(0, n - 1)
        extra = rng.sample(range(p + 1, n), rng.randint(0, min(2, n - 1 - p))) if p < n - 1 else []
        add(p, [*extra, n - 1])
    rng.shuffle(transfers)

    no_cut = np.zeros(n, dtype=bool)
    if rng.random() < 0.4:
        no_cut = np.array([rng.random() < 0.35 for _ in range(n)], dtype=bool)
    problem = Problem([f"op{k}" for k in range(n)], time, transfers, no_cut, bandwidth)
    # Sometimes what every stage pays for its call, and the loss the last stage pays.
    if rng.random() < 0.3:
        problem.stage_call = FixedCost(*(float(rng.randint(0, 2)) for _ in range(2)))
        problem.loss = FixedCost(*(float(rng.randint(0, 3)) for _ in range(2)))
    # Sometimes kinds of op that a stage pays for once, however many of their ops it holds.
    if rng.random() < 0.4:
        kind_of = [rng.randrange(3) for _ in range(n)]
        problem.kinds = [
            KindCost(np.flatnonzero(np.array(kind_of) == kind), FixedCost(float(rng.randint(0, 2)), float(rng.randint(1, 3))))
            for kind in sorted(set(kind_of))
        ]  # fmt: skip
    return problem


def allowed_cuts(problem: Problem) -> list[int]:
    """Positions k (1..N-1) where a stage may start: no_cut[k-1] is False."""
    return [k for k in range(1, problem.size) if not problem.no_cut[k - 1]]


def all_splits(problem: Problem, stages: int):
    """Every split of the ops into `stages` non-empty contiguous stages respecting no_cut, as
    lists of stage starts."""
    for cuts in itertools.combinations(allowed_cuts(problem), stages - 1):
        yield [0, *cuts]


def split_costs(problem: Problem, starts: list[int], table: dict | None = None) -> list[float]:
    bounds = [*starts, problem.size]
    if table is None:
        return [problem.stage_cost(i, j) for i, j in zip(bounds, bounds[1:])]
    return [table[i, j] for i, j in zip(bounds, bounds[1:])]


def cost_table(problem: Problem) -> dict:
    """stage_cost(i, j) (the definition) for every interval."""
    n = problem.size
    return {(i, j): problem.stage_cost(i, j) for i in range(n) for j in range(i + 1, n + 1)}


def assert_valid_split(problem: Problem, starts: list[int], stages: int) -> None:
    assert len(starts) == stages, starts
    assert starts[0] == 0, starts
    assert all(a < b for a, b in zip(starts, starts[1:])), starts
    assert starts[-1] < problem.size, starts
    for k in starts[1:]:
        assert not problem.no_cut[k - 1], f"split {starts} cuts between ops {k - 1} and {k} (no_cut)"


# ---------------------------------------------------------------------------------------------
# DP against brute force


def test_dp_matches_brute_force_on_random_problems():
    """On 300 seeded random problems and every feasible stage count, the DP's split is valid,
    reaches the brute-force optimal bottleneck, and among the optimal splits has the least sum of
    squared stage costs (its documented tie-break)."""
    rng = random.Random(20240611)
    checked = ties = 0
    for case in range(300):
        problem = random_problem(rng)
        table = cost_table(problem)
        max_stages = 1 + len(allowed_cuts(problem))
        assert problem.max_stages() == max_stages
        for stages in range(1, min(problem.size, max_stages) + 1):
            splits = [(starts, split_costs(problem, starts, table)) for starts in all_splits(problem, stages)]
            assert splits, (case, stages)
            optimum = min(max(costs) for _, costs in splits)
            optimal = [(s, c) for s, c in splits if max(c) <= optimum * (1 + REL)]
            best_total = min(sum(x * x for x in c) for _, c in optimal)
            ties += len(optimal) > 1

            starts = partition_pipedream(problem, stages)
            context = f"case {case}, {stages} stages: {problem}\nDP split {starts}"
            assert_valid_split(problem, starts, stages)
            costs = split_costs(problem, starts, table)
            assert math.isclose(max(costs), optimum, rel_tol=REL, abs_tol=1e-12), (
                f"{context}: bottleneck {max(costs)} != optimum {optimum} "
                f"(optimal splits: {[s for s, _ in optimal]})"
            )
            squares = sum(x * x for x in costs)
            assert math.isclose(squares, best_total, rel_tol=REL, abs_tol=1e-12), (
                f"{context}: sum of squares {squares} != least among optimal splits {best_total} "
                f"(optimal splits: {[(s, sum(x * x for x in c)) for s, c in optimal]})"
            )
            checked += 1
    # The generator must actually produce the situations the test is about.
    assert checked > 1000 and ties > 100, (checked, ties)


def test_single_stage_is_everything():
    """One stage holds every op: starts == [0]."""
    rng = random.Random(7)
    for _ in range(50):
        problem = random_problem(rng)
        assert partition_pipedream(problem, 1) == [0]


def test_as_many_stages_as_allowed_cuts():
    """Asking for exactly max_stages stages cuts at every allowed position."""
    rng = random.Random(8)
    for _ in range(100):
        problem = random_problem(rng)
        stages = problem.max_stages()
        assert partition_pipedream(problem, stages) == [0, *allowed_cuts(problem)]


# ---------------------------------------------------------------------------------------------
# The vectorized interval cost matrix against the definition


def test_interval_costs_match_stage_cost():
    """C = interval_costs() has C[i, j] == stage_cost(i, j) for every 0 <= i < j <= N."""
    rng = random.Random(12345)
    for case in range(200):
        problem = random_problem(rng, max_ops=rng.choice([9, 14]))
        n = problem.size
        matrix = problem.interval_costs()
        assert matrix.shape == (n + 1, n + 1)
        for i in range(n):
            for j in range(i + 1, n + 1):
                expected = problem.stage_cost(i, j)
                assert math.isclose(matrix[i, j], expected, rel_tol=REL, abs_tol=1e-12), (
                    f"case {case}: C[{i}, {j}] = {matrix[i, j]} but stage_cost = {expected}\n{problem}"
                )


def test_interval_costs_single_transfer_by_hand():
    """One value made by op 1 and read by ops 2 and 4 of a 5-op problem, 10 bytes, bandwidth 2
    (5 s per crossing), no compute: a stage pays 5 when it sends the value (holds op 1 and not
    op 4), and 5 when it receives it (starts after op 1 and holds op 2 or op 4)."""
    problem = Problem([f"op{k}" for k in range(5)], np.zeros(5), [Transfer("v", 1, [2, 4], 10)], np.zeros(5, bool), 2.0)
    expected = {
        (0, 1): 0, (0, 2): 5, (0, 3): 5, (0, 4): 5, (0, 5): 0,
        (1, 2): 5, (1, 3): 5, (1, 4): 5, (1, 5): 0,
        (2, 3): 5, (2, 4): 5, (2, 5): 5,
        (3, 4): 0, (3, 5): 5,
        (4, 5): 5,
    }  # fmt: skip
    matrix = problem.interval_costs()
    for (i, j), cost in expected.items():
        assert problem.stage_cost(i, j) == cost, (i, j)
        assert math.isclose(matrix[i, j], cost, abs_tol=1e-12), (i, j, matrix[i, j])


def test_communication_splits_into_values_forward_and_gradients_backward():
    """The value of test_interval_costs_single_transfer_by_hand with 4 of its 10 bytes moving
    backward (its gradient): the sender of ops 0..1 pays 6 / 2 = 3 s forward and 2 s backward."""
    transfer = Transfer("v", 1, [2, 4], 10, grad_bytes=4)
    problem = Problem([f"op{k}" for k in range(5)], np.zeros(5), [transfer], np.zeros(5, bool), 2.0)
    members = np.array([True, True, False, False, False])
    assert problem.member_comm(members) == (3.0, 2.0)
    assert problem.member_cost(members) == 5.0
    assert problem.member_comm(~members) == (3.0, 2.0)  # the receiver pays the same
    assert problem.member_comm(np.ones(5, bool)) == (0.0, 0.0)


def test_gradient_bytes_count_floating_tensors_that_require_grad():
    activation = TensorMeta([8, 16], "float32", requires_grad=True, batch_dim=0)
    tokens = TensorMeta([8, 16], "int64", batch_dim=0)
    frozen = TensorMeta([8, 16], "float32", batch_dim=0)
    assert gradient_bytes(activation) == comm_bytes(activation) - activation.nbytes == 512
    assert gradient_bytes(tokens) == gradient_bytes(frozen) == 0
    pair = SeqMeta("tuple", [activation, tokens])
    assert gradient_bytes(pair) == 512 and comm_bytes(pair) == 2 * 512 + 1024


# ---------------------------------------------------------------------------------------------
# A hand-computed case


def hand_problem() -> Problem:
    """A 4-op chain op0 -> op1 -> op2 -> op3 with a skip connection op0 -> op3.

    times: 4, 1, 1, 4 s; chain values a0, a1, a2 are 1 byte each; the skip value s is 2 bytes;
    bandwidth 1 byte/s, so each byte crossing a boundary costs its sender 1 s and each receiving
    stage 1 s."""
    transfers = [
        Transfer("a0", 0, [1], 1),
        Transfer("a1", 1, [2], 1),
        Transfer("a2", 2, [3], 1),
        Transfer("s", 0, [3], 2),
    ]
    return Problem(["op0", "op1", "op2", "op3"], np.array([4.0, 1.0, 1.0, 4.0]), transfers, np.zeros(4, bool), 1.0)


def test_hand_computed_two_stages():
    """Two stages:
        [op0 | op1 op2 op3]: stage0 = 4 + a0 1 + s 2 = 7;  stage1 = 6 + a0 1 + s 2 = 9 -> max 9
        [op0 op1 | op2 op3]: stage0 = 5 + a1 1 + s 2 = 8;  stage1 = 5 + a1 1 + s 2 = 8 -> max 8
        [op0 op1 op2 | op3]: stage0 = 6 + a2 1 + s 2 = 9;  stage1 = 4 + a2 1 + s 2 = 7 -> max 9
    The optimum cuts after op1, bottleneck 8."""
    problem = hand_problem()
    assert problem.stage_cost(0, 1) == 7 and problem.stage_cost(1, 4) == 9
    assert problem.stage_cost(0, 2) == 8 and problem.stage_cost(2, 4) == 8
    assert problem.stage_cost(0, 3) == 9 and problem.stage_cost(3, 4) == 7
    starts = partition_pipedream(problem, 2)
    assert starts == [0, 2]
    assert max(split_costs(problem, starts)) == 8


def test_hand_computed_three_stages():
    """Three stages (a middle stage without op0 or op3 never touches s):
        [op0 | op1 | op2 op3]: 4+1+2 = 7;  1 + a0 + a1 = 3;  5 + a1 + s = 8         -> max 8
        [op0 | op1 op2 | op3]: 4+1+2 = 7;  2 + a0 + a2 = 4;  4 + a2 + s = 7         -> max 7
        [op0 op1 | op2 | op3]: 5+1+2 = 8;  1 + a1 + a2 = 3;  4 + a2 + s = 7         -> max 8
    The optimum is [0, 1, 3] with bottleneck 7."""
    problem = hand_problem()
    assert problem.stage_cost(1, 3) == 4 and problem.stage_cost(2, 4) == 8 and problem.stage_cost(1, 2) == 3
    starts = partition_pipedream(problem, 3)
    assert starts == [0, 1, 3]
    assert split_costs(problem, starts) == [7, 4, 7]


def test_hand_computed_heavy_middle_op():
    """Times 1, 5, 1, 1 and one 3-byte value op2 -> op3 (bandwidth 1).
    Two stages:
        [op0 | op1 op2 op3]: 1;  7 (v stays inside)     -> max 7
        [op0 op1 | op2 op3]: 6;  2                      -> max 6   (optimum)
        [op0 op1 op2 | op3]: 7 + 3 = 10;  1 + 3 = 4     -> max 10
    Three stages:
        [op0 | op1 | op2 op3]: 1;  5;  2                -> max 5   (optimum)
        [op0 | op1 op2 | op3]: 1;  6 + 3 = 9;  4        -> max 9
        [op0 op1 | op2 | op3]: 6;  1 + 3 = 4;  4        -> max 6
    Four stages: the only split, paying for v twice (sent by op2's stage, received by op3's)."""
    transfers = [Transfer("v", 2, [3], 3)]
    problem = Problem(["a", "b", "c", "d"], np.array([1.0, 5.0, 1.0, 1.0]), transfers, np.zeros(4, bool), 1.0)
    assert partition_pipedream(problem, 2) == [0, 2]
    assert partition_pipedream(problem, 3) == [0, 1, 2]
    assert partition_pipedream(problem, 4) == [0, 1, 2, 3]
    assert split_costs(problem, [0, 1, 2, 3]) == [1, 5, 4, 4]


def test_hand_computed_tie_break_prefers_the_most_even_split():
    """Times 10, 1, 1, 0 and a 2-byte value v: op1 -> op3 (bandwidth 1). The heavy op0 alone
    fixes the bottleneck at 10. In three stages:
        [op0 | op1 | op2 op3]: 10;  1 + 2 (send v) = 3;  1 + 2 (receive v) = 3  -> max 10, squares 118
        [op0 | op1 op2 | op3]: 10;  2 + 2 = 4;           0 + 2 = 2             -> max 10, squares 120
        [op0 op1 | op2 | op3]: 11 + 2 = 13                                     -> max 13
    so the DP picks the even [0, 1, 2]. Adding a 1-byte value w: op2 -> op3 leaves the first
    split's costs alone (w stays inside its last stage) but makes the second one 10; 5; 3 —
    same bottleneck, squares 134 — and the DP still picks [0, 1, 2]."""
    transfers = [Transfer("v", 1, [3], 2)]
    problem = Problem(["a", "b", "c", "d"], np.array([10.0, 1.0, 1.0, 0.0]), transfers, np.zeros(4, bool), 1.0)
    # Two stages: [op0 | rest] = 10; 2 beats 13 and 14.
    assert partition_pipedream(problem, 2) == [0, 1]
    assert split_costs(problem, [0, 1, 2]) == [10, 3, 3]
    assert split_costs(problem, [0, 1, 3]) == [10, 4, 2]
    assert partition_pipedream(problem, 3) == [0, 1, 2]
    problem.transfers.append(Transfer("w", 2, [3], 1))
    assert split_costs(problem, [0, 1, 2]) == [10, 3, 3]
    assert split_costs(problem, [0, 1, 3]) == [10, 5, 3]
    assert partition_pipedream(problem, 3) == [0, 1, 2]


def test_hand_computed_tie_break_mirrored():
    """The previous case mirrored (times 0, 1, 1, 10; v: op0 -> op2, 2 bytes; w: op0 -> op1,
    1 byte), so that the most even split is now the one with the *later* middle cut:
        [op0 op1 | op2 | op3]: 0+1 + 2 (send v) = 3;  1 + 2 (receive v) = 3;  10  -> max 10, squares 118
        [op0 | op1 op2 | op3]: 0 + 2 + 1 = 3;  2 + 2 + 1 = 5;  10                 -> max 10, squares 134
    A DP that took the first split within the bottleneck would return [0, 1, 3]."""
    transfers = [Transfer("v", 0, [2], 2), Transfer("w", 0, [1], 1)]
    problem = Problem(["a", "b", "c", "d"], np.array([0.0, 1.0, 1.0, 10.0]), transfers, np.zeros(4, bool), 1.0)
    assert split_costs(problem, [0, 2, 3]) == [3, 3, 10]
    assert split_costs(problem, [0, 1, 3]) == [3, 5, 10]
    assert partition_pipedream(problem, 3) == [0, 2, 3]


def test_hand_computed_fixed_costs():
    """Six ops of 1 s in a chain of free values, a stage call of 0.5 s (0.25 forward, 0.25
    backward) and a loss of 2 s (0.5 forward, 1.5 backward). With k ops in the first of two
    stages it costs k + 0.5 and the last 6 - k + 0.5 + 2: the optimum gives the last stage the
    two ops fewer, [0, 4] at 4.5 each (without the loss, [0, 3])."""
    transfers = [Transfer(f"a{k}", k, [k + 1], 0) for k in range(5)]
    problem = Problem([f"op{k}" for k in range(6)], np.ones(6), transfers, np.zeros(6, bool), 1.0)
    assert partition_pipedream(problem, 2) == [0, 3]
    problem.stage_call, problem.loss = FixedCost(0.25, 0.25), FixedCost(0.5, 1.5)
    assert partition_pipedream(problem, 2) == [0, 4]
    assert split_costs(problem, [0, 4]) == [4.5, 4.5]
    last = np.arange(6) >= 4
    assert problem.fixed(last) == FixedCost(0.75, 1.75) and problem.fixed(~last) == FixedCost(0.25, 0.25)
    assert problem.interval_costs()[0, 6] == 6 + 0.5 + 2  # one stage pays one call and the loss


def test_hand_computed_kind_costs():
    """Six ops of 1 s alternating two kinds, L at 0, 2, 4 (a stage holding any pays 3 s once)
    and R at 1, 3, 5 (0.5 s once): a stage pays each kind it holds once, whatever the number of
    its ops. (The random problems of the brute-force tests hold kinds too.)"""
    transfers = [Transfer(f"a{k}", k, [k + 1], 0) for k in range(5)]
    problem = Problem([f"op{k}" for k in range(6)], np.ones(6), transfers, np.zeros(6, bool), 1.0)
    problem.kinds = [KindCost(np.array([0, 2, 4]), FixedCost(1.0, 2.0)), KindCost(np.array([1, 3, 5]), FixedCost(0.0, 0.5))]
    assert split_costs(problem, [0, 3]) == [6.5, 6.5]
    assert problem.fixed(np.arange(6) == 5) == FixedCost(0.0, 0.5)
    assert problem.interval_costs()[0, 6] == 6 + 3.5
    assert problem.interval_costs()[3, 4] == 1 + 0.5 and problem.interval_costs()[4, 5] == 1 + 3
    assert partition_pipedream(problem, 2) == [0, 3]  # 6.5 each; [0, 2] and [0, 4] give 7.5


# ---------------------------------------------------------------------------------------------
# Infeasible stage counts


def test_too_many_stages_because_of_no_cut():
    """With 5 ops and cuts forbidden after ops 0 and 2, only 3 stages are possible: asking for 4
    raises FtcError that says 3 stages are possible (and suggests --stages 3)."""
    no_cut = np.array([True, False, True, False, False])
    problem = Problem([f"op{k}" for k in range(5)], np.ones(5), [], no_cut, 1.0)
    assert problem.max_stages() == 3
    assert partition_pipedream(problem, 3) == [0, 2, 4]
    with pytest.raises(FtcError) as info:
        partition_pipedream(problem, 4)
    assert "at most 3 stages" in info.value.message
    assert "ops op0 .. op1 (2 of them) must share a stage" in info.value.message
    assert "--stages 3 or fewer" in info.value.hint


def test_too_many_stages_all_cuts_forbidden():
    """When every boundary is forbidden only one stage is possible."""
    problem = Problem(["a", "b", "c"], np.ones(3), [], np.ones(3, bool), 1.0)
    assert problem.max_stages() == 1
    assert partition_pipedream(problem, 1) == [0]
    with pytest.raises(FtcError, match=r"at most 1 stages are possible; ops a \.\. c \(3 of them\) must share"):
        partition_pipedream(problem, 2)


def test_more_stages_than_ops():
    """Without no_cut, at most one stage per op."""
    problem = Problem(["a", "b"], np.ones(2), [], np.zeros(2, bool), 1.0)
    with pytest.raises(FtcError, match="at most 2 stages"):
        partition_pipedream(problem, 3)


LATE_INPUT = """
import torch
import torch.nn as nn


class LateInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*[nn.Linear(256, 256) for _ in range(6)])
        self.proj = nn.Linear(256, 256)

    def forward(self, x):
        return self.body(x) + self.proj(x)


def build_model():
    return LateInput()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 256),)
"""


@pytest.mark.parametrize("method", ["pipedream", "metis"])
def test_a_model_input_read_by_a_later_stage_costs_no_transfer(tmp_path, method):
    """Every device whose stages read a model input loads it with the batch: charging the first
    stage for sending `x` and the last for receiving it inflated both (and metis's DP did not
    charge it while its reported times did)."""
    import json

    from ftc.compiler import CompileOptions, compile_model

    (tmp_path / "late_input.py").write_text(LATE_INPUT)
    options = CompileOptions(stages=3, batch_size=64, method=method, bandwidth=1.0)
    folder = compile_model(tmp_path / "late_input.py", tmp_path / "gen", options).folder
    manifest = json.loads((folder / "pipeline.json").read_text())
    values, model_inputs = manifest["values"], set(manifest["inputs"])
    assert any(model_inputs & set(stage["inputs"]) for stage in manifest["stages"][1:])
    readers = {name: [s for s in manifest["stages"] if name in s["inputs"]] for name in values}
    for stage in manifest["stages"]:
        crossing = [n for n in stage["inputs"] if n not in model_inputs]
        crossing += [n for n in stage["outputs"] if any(r["index"] != stage["index"] for r in readers[n])]
        moved = sum(math.prod(values[n]["shape"]) * 4 * (2 if values[n]["requires_grad"] else 1) for n in crossing)
        cost = stage["cost"]
        assert cost["comm_fwd_time"] + cost["comm_bwd_time"] == pytest.approx(moved / 1e9)


def test_a_value_that_stays_on_its_device_costs_no_transfer():
    """Mixed-pipe: stages 0 and 2 share device 0, so `v` (made in stage 0, read in stage 2) is
    handed over in memory; `u` goes to device 1 and back (`w`), and is charged both ways."""
    from dataclasses import replace

    from ftc.passes.partition.problem import Partition

    transfers = [Transfer("u", 0, [1], 10), Transfer("v", 0, [2], 100), Transfer("w", 1, [2], 1000)]
    problem = Problem(["a", "b", "c"], np.zeros(3), transfers, np.zeros(3, bool), 1.0)
    result = replace(Partition.contiguous(3, [0, 1, 2], [False] * 3), devices=[0, 1, 0])
    assert list(problem.device_times(result)) == [10 + 1000, 10 + 1000]
    # one stage per device: every crossing value moves
    assert list(problem.device_times(Partition.contiguous(3, [0, 1, 2], [False] * 3))) == [110, 1010, 1100]
