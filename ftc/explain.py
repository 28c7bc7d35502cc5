"""`ftc explain`: what a generated pipeline is predicted to cost, stage by stage and device by
device, and how fast the GPipe, 1F1B and async schedules would run it.

Everything comes from pipeline.json (the partitioner's per-stage costs at the compile batch
size) and the runtime's schedule simulator (ftc.runtime.schedule), so nothing is run. A stage's
time is its forward and backward compute, the forward again in its backward when it recomputes,
and its communication: the bytes of the values it sends to and receives from stages on other
devices over the compile's --bandwidth, the activations forward and the gradients of those that
require grad backward (ftc/communication.py). It follows the device map as pipeline.json has it,
so stages put on one device by hand pass their values in memory, free. A micro-batch of B/M
samples is taken to cost 1/M of the stage's time at the compile batch size B, with communication
inside the stage's step (as the partitioner's cost model has it, no overlap). Throughput is B
samples per simulated step; async simulates the steps between two flushes (staleness.flush_every)
as one run, which pays one fill and drain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ftc.communication import stage_communication
from ftc.tables import figure, human, table
from ftc.ir import FtcError
from ftc.runtime.pipeline import Pipeline, load_pipeline
from ftc.runtime.config import StalenessConfig
from ftc.runtime.schedule import BACKWARD, IN_ORDER, SCHEDULES, Timeline, simulate

DEFAULT_MICRO_BATCHES = (4, 8)


@dataclass
class StageCost:
    index: int
    device: int
    ops: int
    parameters: int
    memory: int  # bytes: the manifest's memory estimate, or its parameter bytes without one
    fwd_time: float  # seconds at the compile batch size
    bwd_time: float  # the backward, with the forward again when the stage recomputes
    comm_fwd: float
    comm_bwd: float
    bytes_in: int
    bytes_out: int
    recompute: bool

    @property
    def total(self) -> float:
        return self.fwd_time + self.bwd_time + self.comm_fwd + self.comm_bwd


@dataclass
class SchedulePrediction:
    schedule: str
    micro_batches: int
    timeline: Timeline  # of one step (one batch of the compile batch size), in seconds; async: of a segment
    throughput: float  # samples per second
    steps: int = 1  # the steps the timeline runs: async's steps per flush

    @property
    def step_time(self) -> float:
        return self.timeline.makespan / self.steps


@dataclass
class Explanation:
    folder: Path
    name: str
    batch_size: int
    profile: str
    memory_estimated: bool  # False: `memory` holds parameter bytes only
    memory_plan: str  # the settings the memory estimate is for
    stages: list[StageCost]
    predictions: list[SchedulePrediction]
    # The compiler's figures, where the device map is the compiled one: a tensor its stages share counted once
    device_memory: dict[int, float] = field(default_factory=dict)
    device_parameters: dict[int, int] = field(default_factory=dict)

    def devices(self) -> dict[int, list[StageCost]]:
        by_device: dict[int, list[StageCost]] = {}
        for stage in self.stages:
            by_device.setdefault(stage.device, []).append(stage)
        return dict(sorted(by_device.items()))


def explain(
    folder: str | Path, micro_batches: list[int] | None = None, flush_every: int = StalenessConfig().flush_every
) -> Explanation:
    """`flush_every`: the async rows' steps between pipeline flushes (training config key
    staleness.flush_every)."""
    if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
        raise FtcError(
            f"--flush-every {flush_every!r} is not a positive integer",
            "pass the training config's staleness.flush_every: the steps between flushes, 1 or more",
        )
    pipeline = load_pipeline(folder)
    batch_size = int(pipeline.manifest.get("batch_size", 1))
    # The runtime splits the batch into equal micro-batches, so only divisors of it run.
    counts = list(micro_batches or [m for m in DEFAULT_MICRO_BATCHES if batch_size % m == 0] or [batch_size])
    bad = [m for m in counts if m < 1 or batch_size % m]
    if bad:
        raise FtcError(f"--micro-batches {bad[0]} does not split the batch of {batch_size} (pipeline.json's batch_size) "
                       "into equal micro-batches, as the runtime does",
                       f"pass a divisor of {batch_size}, or compile with another --batch-size")  # fmt: skip
    stages, estimated = _stage_costs(pipeline)
    costs = {s.index: (s.fwd_time + s.comm_fwd, s.bwd_time + s.comm_bwd) for s in stages}
    predictions = []
    for kind in SCHEDULES:
        for m in counts:
            per_micro_batch = {index: (f / m, b / m) for index, (f, b) in costs.items()}
            timeline = simulate(pipeline.stages, m, kind, per_micro_batch, pipeline.outputs)
            throughput = batch_size / timeline.makespan if timeline.makespan > 0 else math.inf
            predictions.append(SchedulePrediction(kind, m, timeline, throughput))
    # Async: one fill and drain per flush_every steps, in the textbook 1F1B order the runtime runs it in.
    for m in counts:
        per_micro_batch = {index: (f / m, b / m) for index, (f, b) in costs.items()}
        timeline = simulate(
            pipeline.stages, m * flush_every, "1f1b", per_micro_batch, pipeline.outputs, policy=IN_ORDER
        )
        throughput = flush_every * batch_size / timeline.makespan if timeline.makespan > 0 else math.inf
        predictions.append(SchedulePrediction("async", m, timeline, throughput, flush_every))
    return Explanation(
        folder=pipeline.folder,
        name=pipeline.name,
        batch_size=batch_size,
        profile=_profile(pipeline.manifest.get("settings", {})),
        memory_estimated=estimated,
        memory_plan=_memory_plan(pipeline),
        stages=stages,
        predictions=predictions,
        **_device_figures(pipeline.manifest.get("predicted", {}), stages),
    )


def _device_figures(predicted: dict, stages: list[StageCost]) -> dict[str, dict[int, float]]:
    """The manifest's per-device memory and parameters, where its devices hold the stages they held
    when compiled (else none: they would be other devices' figures)."""
    held: dict[int, list[int]] = {}
    for stage in stages:
        held.setdefault(stage.device, []).append(stage.index)
    if predicted.get("device_stages") != [held[device] for device in sorted(held)]:
        return {}
    return {key: dict(enumerate(predicted.get(key, []))) for key in ("device_memory", "device_parameters")}


def _memory_plan(pipeline: Pipeline) -> str:
    """The schedule, micro-batches and optimizer the compiler estimated memory for."""
    settings = pipeline.manifest.get("settings", {})
    micro_batches = pipeline.planned_micro_batches
    samples = pipeline.manifest["batch_size"] / micro_batches
    plan = (
        f"{settings.get('schedule', '1f1b')} with {micro_batches} micro-batch{'es' if micro_batches != 1 else ''} of "
        f"{samples:g} sample{'s' if samples != 1 else ''}, {settings.get('optimizer', 'adam')} optimizer state"
    )
    limit = settings.get("memory_limit")
    return plan + (f", under a limit of {human(limit, 'B')} per device" if limit else "")


def _stage_costs(pipeline: Pipeline) -> tuple[list[StageCost], bool]:
    manifest_path = pipeline.folder / "pipeline.json"
    communication = stage_communication(pipeline)
    rows = []
    estimated = True
    for entry in pipeline.manifest["stages"]:
        cost = entry.get("cost")
        try:
            fwd, bwd = float(cost["fwd_time"]), float(cost["bwd_time"])
            memory = cost.get("memory")
            if isinstance(memory, dict) and "total" in memory:
                memory_bytes = int(memory["total"])
            else:
                memory_bytes, estimated = int(cost["parameter_bytes"]), False
            recompute = bool(entry.get("recompute", False))
            replay = float(cost["recompute_time"]) if recompute else 0.0
            if recompute and not replay:  # switched on by hand: the forward again (its fixed costs too: an upper bound)
                replay = fwd
            comm_fwd, comm_bwd = communication[int(entry["index"])]
            rows.append(
                StageCost(
                    index=int(entry["index"]),
                    device=int(entry["device"]),
                    ops=int(cost["ops"]),
                    parameters=int(cost["parameters"]),
                    memory=memory_bytes,
                    fwd_time=fwd,
                    bwd_time=bwd + replay,
                    comm_fwd=comm_fwd,
                    comm_bwd=comm_bwd,
                    bytes_in=int(cost["bytes_in"]),
                    bytes_out=int(cost["bytes_out"]),
                    recompute=recompute,
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FtcError(
                f"{manifest_path}: stage {entry.get('index', '?')} has no predicted cost ftc can read ({exc!r})",
                "recompile the pipeline with `ftc compile`",
            ) from exc
    return rows, estimated


def _profile(settings: dict) -> str:
    """Where the stage times come from: "analytic profile", "measure profile on cpu, refined"..."""
    device = f" on {settings['device']}" if settings.get("device") else ""
    refined = f", refined by timing up to {settings['refine']} splits" if settings.get("refine") else ""
    return f"{settings.get('profile', 'analytic')} profile{device}{refined}"


def render(explanation: Explanation) -> str:
    e = explanation
    devices = e.devices()
    lines = [
        f"{e.name}: {len(e.stages)} stage{'s' if len(e.stages) > 1 else ''} on {len(devices)} device{'s' if len(devices) > 1 else ''}, batch size {e.batch_size}, "
        f"{e.profile} ({e.folder / 'pipeline.json'})"
    ]
    headers = ["stage", "device", "ops", "params", "memory", "fwd ms", "bwd ms", "comm ms", "total ms", "in", "out",
               "recompute"]  # fmt: skip
    rows = [
        [s.index, s.device, s.ops, human(s.parameters), human(s.memory, "B"), ms(s.fwd_time), ms(s.bwd_time),
         ms(s.comm_fwd + s.comm_bwd), ms(s.total), human(s.bytes_in, "B"), human(s.bytes_out, "B"),
         "yes" if s.recompute else "no"]
        for s in e.stages
    ]  # fmt: skip
    lines.append(table(headers, rows))
    if e.profile == "analytic profile":
        lines.append("times: estimated from FLOPs and bytes moved; compile with --profile measure, or --refine N, "
                     "to time the stages on the device")  # fmt: skip
    if not e.memory_estimated:
        lines.append("memory: parameter bytes only (the manifest has no memory estimate)")
    else:
        lines.append(f"memory: estimated at compile time for {e.memory_plan}; other schedules and micro-batch "
                     "counts hold other activations (recompile with --schedule, --micro-batches to see them)")  # fmt: skip
    if len(devices) < len(e.stages):
        device_rows = [
            [device, ",".join(str(s.index) for s in held), human(e.device_parameters.get(device, sum(s.parameters for s in held))),
             human(e.device_memory.get(device, sum(s.memory for s in held)), "B"), ms(sum(s.fwd_time for s in held)),
             ms(sum(s.bwd_time for s in held)), ms(sum(s.comm_fwd + s.comm_bwd for s in held)),
             ms(sum(s.total for s in held))]
            for device, held in devices.items()
        ]  # fmt: skip
        lines.append("")
        lines.append(
            table(["device", "stages", "params", "memory", "fwd ms", "bwd ms", "comm ms", "total ms"], device_rows)
        )
        if not e.device_memory:
            lines.append("devices: the sums of their stages' figures, which count a tensor several stages of a "
                         "device read once per stage (pipeline.json has no device figures for this device map)")  # fmt: skip
    lines.append("")
    schedule_rows = [
        [p.schedule if p.schedule != "async" else f"async (flush every {_steps(p.steps)})", p.micro_batches,
         ms(p.step_time), figure(p.throughput), f"{p.timeline.bubble_fraction:.3f}"]
        for p in e.predictions
    ]  # fmt: skip
    lines.append(table(["schedule", "micro-batches", "step ms", "samples/s", "bubble"], schedule_rows))
    return "\n".join(lines)


def _steps(count: int) -> str:
    return "step" if count == 1 else f"{count} steps"


def ms(seconds: float) -> str:
    return figure(seconds * 1e3)


def plot(explanation: Explanation, path: str | Path) -> Path:
    """A PNG with two panels: each device's load (forward, backward, communication) and the 1F1B
    timeline of one step with the most micro-batches explained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise FtcError(f"--plot {path}: the plot is a PNG", "name a .png file")
    if not path.parent.is_dir():
        raise FtcError(f"--plot {path}: folder {path.parent} does not exist", "create it or name another file")
    e = explanation
    devices = e.devices()
    prediction = max((p for p in e.predictions if p.schedule == "1f1b"), key=lambda p: p.micro_batches)
    colors = {"forward": "tab:blue", "backward": "tab:orange", "comm": "tab:gray"}
    figure, (loads, gantt) = plt.subplots(2, 1, figsize=(10, 3 + 0.5 * len(devices) + 3), constrained_layout=True)

    labels = [f"device {d}" for d in devices]
    bottom = [0.0] * len(devices)
    parts = {
        "forward": [sum(s.fwd_time for s in held) * 1e3 for held in devices.values()],
        "backward": [sum(s.bwd_time for s in held) * 1e3 for held in devices.values()],
        "comm": [sum(s.comm_fwd + s.comm_bwd for s in held) * 1e3 for held in devices.values()],
    }
    for part, heights in parts.items():
        loads.bar(labels, heights, bottom=bottom, color=colors[part], label=part)
        bottom = [b + h for b, h in zip(bottom, heights)]
    loads.set_ylabel(f"ms per batch of {e.batch_size}")
    loads.set_title(f"{e.name}: load per device ({e.profile})")
    loads.legend()

    row = {device: k for k, device in enumerate(devices)}
    texts = bar_labels(prediction.timeline.actions)
    several = "." in texts[0] if texts else False
    for timed, text in zip(prediction.timeline.actions, texts):
        kind = "backward" if timed.action.kind == BACKWARD else "forward"
        start, width = timed.start * 1e3, (timed.end - timed.start) * 1e3
        gantt.barh(row[timed.device], width, left=start, color=colors[kind], edgecolor="white")
        gantt.text(start + width / 2, row[timed.device], text, ha="center", va="center", fontsize=7)
    gantt.set_yticks(list(row.values()), labels)
    gantt.invert_yaxis()
    gantt.set_xlabel("ms")
    gantt.set_title(
        f"1f1b, {prediction.micro_batches} micro-batches: step {ms(prediction.timeline.makespan)} ms, "
        f"bubble {prediction.timeline.bubble_fraction:.3f} (numbers: {'stage.' if several else ''}micro-batch)"
    )
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        figure.savefig(temporary, format="png", dpi=100)
        temporary.replace(path)
    except OSError as exc:
        # a folder the file system refuses (read-only, virtual): name the user's path, not ours
        raise FtcError(f"--plot {path} cannot be written: {exc.strerror or exc}", "name a .png file in a folder you can write") from None
    finally:
        plt.close(figure)
    return path


def bar_labels(actions: list) -> list[str]:
    """The timeline's bar texts: the micro-batch, or "stage.micro-batch" where a device owns
    several stages (mixed-pipe), so that a bar says whose it is."""
    owned: dict[int, set[int]] = {}
    for timed in actions:
        owned.setdefault(timed.device, set()).add(timed.action.stage)
    several = any(len(stages) > 1 for stages in owned.values())
    return [f"{t.action.stage}.{t.action.micro_batch}" if several else str(t.action.micro_batch) for t in actions]
