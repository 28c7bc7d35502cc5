"""The memory a pipeline stage needs on its device, per training step.

    parameters   the parameters and buffers the stage's ops read (a tied tensor counts once)
  + gradients    one copy of its trainable parameters
  + optimizer    `--optimizer` state: sgd 0, momentum 1, adam / adamw 2 copies of them
  + stashed      `--schedule async` only: a copy of them per weight version its micro-batches
                 in flight use (MemorySettings.weight_versions), and one for the gradient a
                 backward leaves on the stashed copy until it is summed into the step's
  + the larger of
    activations  per micro-batch in flight: what its ops save for backward and the values it
                 receives (the runtime keeps them until the micro-batch's backward), and on the
                 stage that computes the loss, what the loss saves (a log_softmax's output, as
                 large as the logits), times the micro-batches the schedule keeps in flight at
                 the stage: under 1F1B the stage at position k of S keeps S - k of them (at most
                 the micro-batch count), under GPipe all M, under async S - k (a segment of
                 flush_every steps is one 1F1B pipeline); plus, once, the larger of the
                 backward's working set (the gradients a backward holds beside what forward
                 saved, WORKING_COPIES times the stage's largest op output, one micro-batch's)
                 and the forward's transients (what its ops make that nothing saves: the stage's
                 forward names every value, so they live until it returns); plus the gradients
                 of the values it received that its backward sent back (held until the stage
                 before receives them); plus a weight gradient being accumulated into .grad (the
                 new one is made beside it: the stage's largest trainable tensor), and two
                 partial gradients of every trainable tensor that several of its ops read
                 (autograd holds the one from the later reader until the earlier one's meets
                 it, and adds them before .grad);
    temporaries  of the optimizer step, which runs after the activations are freed (step_bytes);
                 under async each stage steps while micro-batches are in flight, so they add.

Not counted: the receive buffers the runtime posts a few actions ahead (runtime/device_runner.py
PREFETCH_ACTIONS); allocator caching and fragmentation. Checked against the live storages of
every device while the real engine trains (tests/memory_truth.py, tests/test_memory_truth.py;
the README has the figures).

The IR's sizes are for the compile batch size, which the runtime splits into M micro-batches
(`--micro-batches`, or the compiler's default plan: compiler.py planned_micro_batches), so one micro-batch saves 1/M of them, as
the time model takes one micro-batch to cost 1/M of the stage's time. Under GPipe a stage thus
holds the whole batch's activations, under 1F1B at most (S - k)/M of them.

A stage that recomputes keeps only the values it receives and the values it sends per
micro-batch in flight (its outputs, made without autograd, wait for the micro-batch's backward;
on the loss stage, the model's outputs the loss holds, and what the loss saves), plus one
micro-batch's activations while it runs that micro-batch's backward, and the working set.

What an op saves for backward is what the profile counted autograd saving (Cost.peak_memory:
each storage once, for the first op that saves it, parameters left out; both profiles count it).
The values a stage sends (and the model outputs the loss reads) count besides, since the runtime
holds them until the micro-batch's backward whether autograd saved them or not
(Footprint.outputs_saved). The forward's transients are the profile's Cost.transient_memory. An
IR without a profile is estimated from its metadata: every output of a compute op that requires
grad and is not a view (views share their source's memory) taken as saved, so sent values and
transients are among them.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property

import numpy as np

from ftc.ir import FtcError

OPTIMIZER_STATES = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}
# Autograd frees a node's saved tensors as its backward finishes, but while it runs, the gradient
# of its output and the gradient it computes are alive beside them, and more wait where branches
# join (a residual trunk's gradient waits while its branch is backpropagated): measured with the
# profiler's allocation counts on the CPU, a 6-block residual MLP stage's forward + backward of
# one micro-batch peaked at its saved bytes plus about 5 copies of its largest activation.
WORKING_COPIES = 4
UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
}  # fmt: skip


def parse_bytes(text: str) -> int:
    """'16GB' -> 16e9, '512MiB' -> 512 * 2**20, '1e9' -> 1e9 bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise FtcError(
            f"{text!r} is not a memory size",
            "write a number of bytes with an optional unit: 16GB, 512MiB, 80e9",
        )
    value = float(match.group(1)) * UNITS[match.group(2).lower()]
    if not value >= 1:
        raise FtcError(f"memory size {text!r} is less than one byte")
    if not math.isfinite(value):
        raise FtcError(f"memory size {text!r} is too large", "write a finite number of bytes")
    return int(value)


def format_bytes(count: float, up: bool = False) -> str:
    """One decimal; `up` rounds up, for a limit that must hold `count`."""
    for suffix, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            shown = math.ceil(count / scale * 10) / 10 if up else count / scale
            return f"{shown:.1f} {suffix}"
    return f"{math.ceil(count) if up else count:.0f} B"


def planned_micro_batches(stages: int, batch_size: int) -> int:
    """The fewest micro-batches that fill a pipeline of `stages` devices (one per device) and
    split the batch into equal micro-batches, as the runtime does: the smallest divisor of the
    batch size from the device count up (the batch size itself when it is smaller)."""
    return next(m for m in range(min(stages, batch_size), batch_size + 1) if batch_size % m == 0)


@dataclass(frozen=True)
class MemorySettings:
    limit: int | None = None  # bytes per device; None: no limit
    optimizer: str = "adam"
    schedule: str = "1f1b"
    micro_batches: int | None = None  # None: as many as stages (the fewest that fill the pipeline)
    recompute: str = "auto"  # "auto" | "always" | "never" (ftc/passes/recompute.py)
    device: str = "cpu"  # "cpu" | "cuda": how torch's optimizers step there (step_bytes)
    # The compile batch size where `micro_batches` is the compiler's plan, not --micro-batches:
    # compiled into another number of stages, it plans another count (for_stages); None: fixed.
    planned_batch: int | None = None

    def for_stages(self, stages: int) -> MemorySettings:
        """The settings a compile into `stages` stages would have, as far as the user fixed them."""
        if self.planned_batch is None:
            return self
        return replace(self, micro_batches=planned_micro_batches(stages, self.planned_batch))

    def in_flight(self, position: int, stages: int) -> int:
        """Micro-batches whose activations the stage at `position` (0-based) of `stages` keeps."""
        micro_batches = self.micro_batches or stages
        if self.schedule == "gpipe":
            return micro_batches
        if self.schedule == "async":
            # One 1F1B pipeline over a whole segment (staleness.flush_every steps): the stage's
            # depth in flight whatever the micro-batches of one step.
            return stages - position
        return min(stages - position, micro_batches)

    def weight_versions(self, position: int, stages: int) -> int:
        """Copies of its trainable parameters the stage at `position` keeps beside them under
        async (weight stashing, runtime/staleness.py): one per version its micro-batches in
        flight were run with (the current one too, a copy), two when the micro-batches of a
        step reach its depth, up to the depth when fewer; 0 for the synchronous schedules."""
        if self.schedule != "async":
            return 0
        depth = stages - position
        return min(depth, math.ceil((depth - 1) / (self.micro_batches or stages)) + 1)

    def stash_copies(self, position: int, stages: int) -> int:
        """Copies of the trainable parameters async adds: the stashed weights and the gradient
        a backward leaves on them until it is summed into the step's (the `gradients` term)."""
        versions = self.weight_versions(position, stages)
        return versions + 1 if versions else 0

    def share(self, stages: int) -> float:
        """The part of the compile batch one micro-batch holds."""
        return 1.0 / (self.micro_batches or stages)


@dataclass
class StateUse:
    """A parameter or buffer and the ops (positions) that read it."""

    name: str
    nbytes: int
    trainable: bool
    readers: list[int]  # in increasing order


@dataclass
class StageMemory:
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    temporaries: int = 0  # the optimizer step's, alive when the activations are not
    stashed: int = 0  # async: stashed weight versions and their gradients

    @property
    def total(self) -> int:
        return (self.parameters + self.gradients + self.optimizer + self.stashed
                + max(self.activations, self.temporaries))  # fmt: skip

    def to_json(self) -> dict:
        return {**asdict(self), "total": self.total}

    def describe(self) -> str:
        step = f", optimizer step temporaries {format_bytes(self.temporaries)}" if self.temporaries > self.activations else ""
        stashed = f", stashed weights {format_bytes(self.stashed)}" if self.stashed else ""
        return (
            f"{format_bytes(self.total)}: parameters {format_bytes(self.parameters)}, gradients "
            f"{format_bytes(self.gradients)}, optimizer {format_bytes(self.optimizer)}{stashed}, activations "
            f"{format_bytes(self.activations)}{step}"
        )


@dataclass
class Footprint:
    """What the ops of a problem hold in memory; indexed by op position like Problem.ops."""

    settings: MemorySettings
    saved: np.ndarray  # bytes each op saves for backward, at the compile batch size
    state: list[StateUse]
    largest: np.ndarray = field(default_factory=lambda: np.zeros(0))  # bytes of each op's output's gradient
    # The training loss, computed on the stage holding the last op right after its forward and
    # kept until the micro-batch's backward: what the loss saves beyond its inputs (a
    # log_softmax's output: the logits' size again), and the model's outputs it reads, as
    # (producing op, bytes) (a recomputing stage made them without autograd, so they are not
    # among its saved values, but the loss holds them).
    loss_saved: float = 0.0
    outputs: list[tuple[int, float]] = field(default_factory=list)
    # Whether `saved` counts every op's output (the IR's estimate), so that the values a stage
    # sends are among them; a profile counts what autograd saves, which may leave a stage's
    # outputs out (a convolution's, a residual add's).
    outputs_saved: bool = True
    # bytes each op makes in forward that nothing saves, at the compile batch size (empty: none)
    transient: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def loss_outputs(self, members: np.ndarray) -> float:
        """Bytes of the model's outputs that the loss stage, holding the ops of the boolean mask,
        made (those another stage made, it received)."""
        return float(sum(nbytes for producer, nbytes in self.outputs if members[producer]))

    def largest_parameter(self, n: int) -> np.ndarray:
        """Bytes of the largest trainable tensor each of the n ops reads (0: none): a stage's
        largest is the largest of its ops', wherever else the tensor is read."""
        largest = np.zeros(n)
        for use in self.state:
            if use.trainable:
                largest[use.readers] = np.maximum(largest[use.readers], use.nbytes)
        return largest

    def partial_gradients(self, members: np.ndarray) -> int:
        """Bytes of the partial gradients of the trainable tensors that several ops in the
        boolean mask read: backward holds the gradient from the later reader until the
        earlier reader's is made and the two are summed, before either reaches .grad (measured:
        two_tower's projection head, called on both towers, held twice its weights in new
        gradients beside .grad), so two copies of each."""
        return sum(2 * use.nbytes for use in self.state if use.trainable and members[use.readers].sum() > 1)

    def partial_gradient_table(self, n: int) -> np.ndarray:
        """partial_gradients of every interval of ops i..j-1, as an (n+1, n+1) matrix: a tensor
        counts in the intervals that hold two of its readers, taken by the first two inside."""
        table = np.zeros((n + 2, n + 2))
        for use in self.state:
            if not use.trainable:
                continue
            readers = sorted(use.readers)  # one per reading op: two ops of a coarsened run count twice
            for k in range(len(readers) - 1):
                previous = readers[k - 1] if k else -1
                # intervals [i, j) with previous < i <= readers[k] and j > readers[k + 1]
                add_rectangle(table, previous + 1, readers[k], readers[k + 1] + 1, n, 2 * use.nbytes)
        return summed(table, n)

    def state_bytes(self, members: np.ndarray) -> tuple[int, int]:
        """(parameter and buffer bytes, trainable bytes) the ops in the boolean mask read."""
        held = trainable = 0
        for use in self.state:
            if members[use.readers].any():
                held += use.nbytes
                trainable += use.nbytes if use.trainable else 0
        return held, trainable

    def shared_bytes(self, stages: list[np.ndarray]) -> int:
        """Bytes that the memory of the stages of one device (boolean masks) counts more than
        once: a parameter or buffer several of them read is one tensor on the device (with one
        gradient and one optimizer state), which each stage's estimate counts."""
        return sum(
            (holders - 1) * charge
            for use, charge in self.shareable
            if (holders := sum(1 for members in stages if members[use.readers].any())) > 1
        )

    def shared_interval_bytes(self, intervals: list[tuple[int, int]]) -> int:
        """shared_bytes of the stages of one device that hold ops i..j-1 each, for every (i, j)
        in `intervals`."""
        shared = 0
        for use, charge in self.shareable:
            holders = 0
            for i, j in intervals:
                first = bisect.bisect_left(use.readers, i)
                holders += first < len(use.readers) and use.readers[first] < j
            shared += max(holders - 1, 0) * charge
        return shared

    @cached_property
    def shareable(self) -> list[tuple[StateUse, int]]:
        """The parameters and buffers several ops read, which several stages of one device can
        share, each with the bytes a stage's estimate charges for it: the tensor, and for a
        trainable one its gradient and optimizer state."""
        copies = OPTIMIZER_STATES[self.settings.optimizer]
        return [
            (use, use.nbytes * ((2 + copies) if use.trainable else 1)) for use in self.state if len(use.readers) > 1
        ]

    def memory(
        self, held: int, trainable: int, saved: int, received: int, in_flight: int, recompute: bool,
        share: float = 1.0, sent: int = 0, largest: float = 0.0, parameter: int = 0,
        loss_saved: float = 0.0, outputs: float = 0.0, stash_copies: int = 0, transient: float = 0.0,
        partials: int = 0,
    ) -> StageMemory:
        """`saved`, `received`, `sent` (the values the stage sends), `largest` (its largest op
        output), `loss_saved` and `outputs` (the loss's, on the stage that computes it),
        `transient` (what its ops make that nothing saves): bytes at the compile batch size, of
        which a micro-batch holds `share`; `parameter`: its largest trainable tensor;
        `stash_copies`: MemorySettings.stash_copies; `partials`: partial_gradients."""
        activations = math.ceil(
            activation_bytes(saved, received, sent, largest, in_flight, recompute, loss_saved, outputs,
                             self.outputs_saved, transient) * share
        )  # fmt: skip
        copies = OPTIMIZER_STATES[self.settings.optimizer]
        step = int(step_bytes(self.settings, trainable, parameter))
        if self.settings.schedule == "async":
            # each stage steps right after its backward of a step's last micro-batch, while the
            # other micro-batches in flight keep their activations
            activations, step = activations + step, 0
        return StageMemory(held, trainable, trainable * copies, activations + parameter + partials, step,
                           trainable * stash_copies)  # fmt: skip

    def interval_tables(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(held, trainable, saved) for every interval of ops i..j-1, as (n+1, n+1) matrices:
        a tensor counts in an interval that holds at least one of its readers."""
        held, trainable = np.zeros((n + 2, n + 2)), np.zeros((n + 2, n + 2))
        for use in self.state:
            previous = -1
            for reader in sorted(set(use.readers)):
                # intervals [i, j) with previous < i <= reader < j hold this reader first
                for table, weight in ((held, use.nbytes), (trainable, use.nbytes if use.trainable else 0)):
                    add_rectangle(table, previous + 1, reader, reader + 1, n, weight)
                previous = reader
        return summed(held, n), summed(trainable, n), interval_sums(self.saved)


def step_bytes(settings: MemorySettings, trainable, parameter):
    """The temporaries of one optimizer step over `trainable` bytes of parameters whose largest
    tensor has `parameter` bytes (numbers or arrays). The runtime takes torch's default
    implementation (runtime/optim.py): per tensor on the CPU, foreach on CUDA (one list op over all
    of a device's tensors). Adam and AdamW make denom = sqrt(v) / c + eps beside v: per tensor, two
    copies of one tensor at a time (the largest sets the peak; measured on the CPU); foreach, one
    copy of all of them. SGD, with or without momentum, steps in place (weight decay or Nesterov,
    which the compiler is not told of, make one copy of the gradients)."""
    if settings.optimizer not in ("adam", "adamw"):
        return 0 * trainable
    return trainable if settings.device == "cuda" else 2 * parameter


def activation_bytes(saved, received, sent, largest, in_flight, recompute, loss_saved=0.0, outputs=0.0,
                     outputs_saved=True, transient=0.0):  # fmt: skip
    """The activations a stage holds at its peak, at the compile batch size (numbers or, for
    every interval at once, arrays). `loss_saved` and `outputs`: Footprint's, for the stage
    that computes the loss (0 elsewhere). `outputs_saved`: Footprint's; where False (a
    profile), the values the stage sends and the outputs the loss reads, which the runtime
    holds until the micro-batch's backward whether or not autograd saved them, count too.
    Beside the micro-batches in flight, one micro-batch's backward working set or its
    forward's `transient` values, whichever is larger (a forward's transients die when it
    returns, before the device runs a backward), and the gradients of the values it received
    that its last backward sent back: the sender holds them until the stage before receives
    them, which under 1F1B is after this stage's next forward."""
    extra = np.maximum(WORKING_COPIES * largest, transient) + received
    if recompute:
        return (received + sent + outputs + loss_saved) * in_flight + saved + extra
    held = 0 if outputs_saved else sent + outputs
    return (saved + received + loss_saved + held) * in_flight + extra


def interval_sums(values: np.ndarray) -> np.ndarray:
    """S[i, j] = the sum of values[i..j-1], for every interval of ops."""
    prefix = np.concatenate([[0.0], np.cumsum(values)])
    return prefix[None, :] - prefix[:, None]


def add_rectangle(diff: np.ndarray, i1: int, i2: int, j1: int, j2: int, weight: float) -> None:
    """Add `weight` to every (i, j) with i1 <= i <= i2 and j1 <= j <= j2 of a 2-D difference array."""
    if i1 > i2 or j1 > j2 or not weight:
        return
    diff[i1, j1] += weight
    diff[i1, j2 + 1] -= weight
    diff[i2 + 1, j1] -= weight
    diff[i2 + 1, j2 + 1] += weight


def summed(diff: np.ndarray, n: int) -> np.ndarray:
    return diff.cumsum(axis=0).cumsum(axis=1)[: n + 1, : n + 1]
