"""Schedules against hand-checkable figures (uniform chains) and brute-force replays (random
stage graphs and device maps)."""

from __future__ import annotations

import random

import pytest

from ftc.ir import FtcError
from ftc.runtime import StageSpec
from ftc.runtime.schedule import BACKWARD, FORWARD, ONE_F_ONE_B_POLICIES, SCHEDULES, Action, simulate


def chain(devices: list[int]) -> list[StageSpec]:
    return [
        StageSpec(k, f"stage{k}.py", f"Stage{k}", device, [f"v{k - 1}" if k else "x"], [f"v{k}"], [], False)
        for k, device in enumerate(devices)
    ]


def random_pipeline(rng: random.Random) -> list[StageSpec]:
    """Stages in topological order; each reads a random set of earlier stages' values (skips
    included) and the last reads every value nothing else reads; devices drawn at random."""
    count = rng.randint(2, 6)
    devices = [rng.randrange(count) for _ in range(count)]
    numbering = {d: k for k, d in enumerate(sorted(set(devices)))}
    stages = []
    read: set[str] = set()
    for k in range(count):
        if k == 0:
            inputs = ["x"]
        elif k == count - 1:
            inputs = sorted({f"v{j}" for j in range(k)} - read) or [f"v{k - 1}"]
        else:
            inputs = sorted({f"v{rng.randrange(k)}" for _ in range(rng.randint(1, 2))})
        read.update(inputs)
        stages.append(StageSpec(k, "", "", numbering[devices[k]], inputs, [f"v{k}"], [], False))
    return stages


def dependencies(stages: list[StageSpec], micro_batches: int) -> dict[Action, set[Action]]:
    producer = {name: s.index for s in stages for name in s.outputs}
    deps: dict[Action, set[Action]] = {}
    for s in stages:
        for m in range(micro_batches):
            deps.setdefault(Action(FORWARD, s.index, m), set()).update(
                Action(FORWARD, producer[name], m) for name in s.inputs if name in producer
            )
            deps.setdefault(Action(BACKWARD, s.index, m), set()).add(Action(FORWARD, s.index, m))
            for name in s.inputs:
                if name in producer:
                    deps.setdefault(Action(BACKWARD, producer[name], m), set()).add(Action(BACKWARD, s.index, m))
    return deps


def replay(orders: dict[int, list[Action]], deps: dict[Action, set[Action]]) -> int:
    """Run each device's order with blocking waits on dependencies; the number of actions done
    before everything finished or every device was stuck."""
    done: set[Action] = set()
    position = {device: 0 for device in orders}
    progress = True
    while progress:
        progress = False
        for device, order in orders.items():
            while position[device] < len(order) and deps[order[position[device]]] <= done:
                done.add(order[position[device]])
                position[device] += 1
                progress = True
    return len(done)


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("stages, micro_batches", [(1, 1), (2, 4), (3, 2), (4, 8), (4, 3)])
def test_uniform_chain_makespan_and_bubble(kind, stages, micro_batches):
    forward, backward = 1.0, 2.0
    timeline = simulate(
        chain(list(range(stages))), micro_batches, kind, {k: (forward, backward) for k in range(stages)}
    )
    assert timeline.makespan == (micro_batches + stages - 1) * (forward + backward)
    assert timeline.bubble_fraction == pytest.approx((stages - 1) / (micro_batches + stages - 1))


@pytest.mark.parametrize("stages, micro_batches", [(2, 4), (4, 8), (4, 2)])
def test_1f1b_bounds_micro_batches_in_flight(stages, micro_batches):
    def peak_in_flight(kind: str) -> dict[int, int]:
        """Device -> the most micro-batches it has forwarded and not yet backwarded."""
        peaks = {}
        for device, order in simulate(chain(list(range(stages))), micro_batches, kind).orders().items():
            open_, peaks[device] = 0, 0
            for action in order:
                open_ += 1 if action.kind == FORWARD else -1
                peaks[device] = max(peaks[device], open_)
        return peaks

    assert peak_in_flight("1f1b") == {rank: min(stages - rank, micro_batches) for rank in range(stages)}
    assert peak_in_flight("gpipe") == {rank: micro_batches for rank in range(stages)}


def test_1f1b_alternates_after_warm_up():
    orders = simulate(chain([0, 1, 2]), 5, "1f1b").orders()
    letters = ["".join(a.kind[0].upper() + str(a.micro_batch) for a in orders[rank]) for rank in range(3)]
    assert letters == [
        "F0F1F2B0F3B1F4B2B3B4",
        "F0F1B0F2B1F3B2F4B3B4",
        "F0B0F1B1F2B2F3B3F4B4",
    ]


def timed_replay(orders: dict[int, list[Action]], deps: dict[Action, set[Action]], costs: dict) -> float:
    """The makespan of running each device's order as given: an action starts when its device
    is free and its dependencies have ended."""
    end: dict[Action, float] = {}
    free = dict.fromkeys(orders, 0.0)
    position = dict.fromkeys(orders, 0)
    while len(end) < len(deps):
        progress = False
        for device, order in orders.items():
            while position[device] < len(order) and deps[order[position[device]]] <= end.keys():
                action = order[position[device]]
                start = max([free[device], *(end[need] for need in deps[action])])
                end[action] = free[device] = start + costs[action.stage][action.kind == BACKWARD]
                position[device] += 1
                progress = True
        assert progress, "the orders deadlock"
    return max(end.values())


def textbook_1f1b(stages: int, micro_batches: int) -> dict[int, list[Action]]:
    """PipeDream-flush as its paper draws it for a chain: rank r warms up with P - r - 1
    forwards, then strictly alternates one forward and one backward, then drains."""
    orders = {}
    for rank in range(stages):
        warm_up = min(stages - rank - 1, micro_batches)
        order = [Action(FORWARD, rank, m) for m in range(warm_up)]
        for m in range(micro_batches):
            if warm_up + m < micro_batches:
                order.append(Action(FORWARD, rank, warm_up + m))
            order.append(Action(BACKWARD, rank, m))
        orders[rank] = order
    return orders


@pytest.mark.parametrize("seed", range(40))
def test_1f1b_is_never_slower_than_the_textbook_order_on_uneven_chains(seed):
    rng = random.Random(seed)
    stages, micro_batches = rng.randint(2, 6), rng.choice([2, 4, 8, 16])
    costs = {}
    for k in range(stages):
        forward = rng.uniform(0.5, 1.5)
        costs[k] = (forward, forward * rng.uniform(1.5, 2.5))
    last_forward, last_backward = costs[stages - 1]
    costs[stages - 1] = (1.5 * last_forward, 1.5 * last_backward)  # the loss makes the last stage heavier
    pipeline = chain(list(range(stages)))
    deps = dependencies(pipeline, micro_batches)
    timeline = simulate(pipeline, micro_batches, "1f1b", costs)

    assert timed_replay(timeline.orders(), deps, costs) == pytest.approx(timeline.makespan)
    assert timeline.makespan <= timed_replay(textbook_1f1b(stages, micro_batches), deps, costs) * (1 + 1e-12)


def test_waiting_for_the_forward_beats_running_a_backward_in_between():
    """The last stage is the fastest: when the devices before it run a ready backward instead of
    waiting a moment for their next forward, it starves (the textbook order does not)."""
    pipeline, costs = chain([0, 1, 2]), {0: (1.5, 4.5), 1: (1.5, 4.5), 2: (1.0, 3.0)}
    by_policy = {policy: simulate(pipeline, 8, "1f1b", costs, policy=policy) for policy in ONE_F_ONE_B_POLICIES}
    textbook = timed_replay(textbook_1f1b(3, 8), dependencies(pipeline, 8), costs)

    assert by_policy["in order"].orders() == textbook_1f1b(3, 8)
    assert by_policy["in order"].makespan == pytest.approx(textbook)
    assert by_policy["forward first"].makespan > 1.05 * textbook
    assert by_policy["backward first"].makespan > 1.10 * textbook
    assert simulate(pipeline, 8, "1f1b", costs).orders() == textbook_1f1b(3, 8)


@pytest.mark.parametrize("kind, policy", [(kind, None) for kind in SCHEDULES] + [("1f1b", p) for p in ONE_F_ONE_B_POLICIES])
@pytest.mark.parametrize("seed", range(12))
def test_random_pipelines_respect_dependencies_and_never_deadlock(kind, policy, seed):
    rng = random.Random(seed)
    stages = random_pipeline(rng)
    micro_batches = rng.randint(1, 6)
    costs = {s.index: (rng.uniform(0.0, 2.0), rng.uniform(0.0, 4.0)) for s in stages}
    timeline = simulate(stages, micro_batches, kind, costs, policy=policy)
    deps = dependencies(stages, micro_batches)

    assert sorted(map(repr, (t.action for t in timeline.actions))) == sorted(map(repr, deps))
    timed = {t.action: t for t in timeline.actions}
    position = {t.action: k for k, t in enumerate(timeline.actions)}
    for action, needs in deps.items():
        for need in needs:
            assert timed[need].end <= timed[action].start
            assert position[need] < position[action]
    device_of = {s.index: s.device for s in stages}
    for device, order in timeline.orders().items():
        assert all(device_of[a.stage] == device for a in order)
        spans = [(timed[a].start, timed[a].end) for a in order]
        assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    assert replay(timeline.orders(), deps) == len(deps)


def test_mixed_pipe_interleaves_and_is_deterministic():
    stages = chain([0, 1, 1, 0])
    first = simulate(stages, 4, "1f1b").orders()
    assert first == simulate(stages, 4, "1f1b").orders()
    assert replay(first, dependencies(stages, 4)) == 2 * 4 * 4
    # Device 0 holds the first and the last stage: the last stage (depth 1) alternates one
    # forward and one backward, interleaved with the first stage's actions.
    last = [a.kind[0] for a in first[0] if a.stage == 3]
    assert "".join(last) == "fb" * 4
    assert [a.stage for a in first[0]] != sorted(a.stage for a in first[0])


def test_bad_arguments():
    with pytest.raises(FtcError, match="unknown schedule 'pipedream'"):
        simulate(chain([0, 1]), 2, "pipedream")
    with pytest.raises(FtcError, match="at least 1"):
        simulate(chain([0, 1]), 0, "gpipe")
    with pytest.raises(FtcError, match="unknown 1f1b policy 'eager'"):
        simulate(chain([0, 1]), 2, "1f1b", policy="eager")
    with pytest.raises(FtcError, match="no .forward, backward. cost given for stages .1."):
        simulate(chain([0, 1]), 2, "gpipe", {0: (1.0, 1.0)})
