"""The partitioning problem over a graph's program order, and its stage cost model.

The DP (pipedream.py) cuts the compute ops' program order, a topological order that also keeps
in-place mutations where the model put them, into contiguous runs. A stage's cost is

    compute (forward + backward time of its ops)
  + (bytes it receives + bytes it sends) / bandwidth
  + what calling a stage costs beyond its ops (`stage_call`: its forward call, its backward's
    engine start), the same for every stage
  + for each kind of op the stage holds (`kinds`: a module class, a function), what its first
    op of that kind pays beyond the op's own time (Graph.kind_costs): a measured profile times
    ops in the whole model, where a later op of a kind finds that kind's code and data warm,
    and a stage cut out of it finds them cold once per call (a Linear stage on this project's
    CPU paid 18 us so, at 8 x 256 features, beyond its ops and the call)
  + the training loss (`loss`), for the stage holding the last op

where a value crossing a boundary is charged once to the stage that sends it and once to each
stage that receives it, whatever the number of readers inside; values that require grad count
twice (the activation forward, its gradient backward). Between stages that mixed-pipe puts on
one device a value is handed over in memory, free (`device_times`, and the manifest's figures;
mpipe's search itself prices stages one by one). A value read several stages later is
sent straight to each stage that reads it (not forwarded stage to stage), so the cost of a
stage depends only on its own interval, which is what makes the dynamic program exact.

Model inputs cost no transfer: every device whose stages read one loads it with the batch (a
stage after the first still holds it, as a value it received). The model's outputs are read by the last stage (the loss
is computed there), so an output made earlier is sent to it, and the last stage pays the loss.
`stage_call` changes no ranking of splits into a given number of stages (every stage pays it
once), but it makes small stages cost what they do, and a device that runs several stages
(mpipe) pays it for each; the loss moves work off the last stage.

Some boundaries are forbidden (`no_cut`): inside a value that holds several tensors (a tuple
from `chunk`, say), or an object the runtime cannot send (a dict a leaf module returns), between
its producer and its last reader; between the value an in-place op
mutates (followed back through views) and that op, so that every reader sees the mutation; and
between the first and last op that touch a buffer forward updates in place (a step counter, an
EMA), since each device holds its own copy of a buffer.

Partitioners that do not cut the program order into contiguous runs (metis) price a stage from
the same definition over any set of ops (`member_cost`), and keep ops that draw random numbers
in stage order (`random`), so that the stages, run one after another, draw what the model draws.

A stage must also fit the memory of its device (memory.py: parameters, gradients, optimizer
state, activations in flight); a stage that recomputes (ftc/passes/recompute.py) keeps fewer
activations and pays its forward again in backward (`stage_time`). The answer of a partitioner
is a `Partition`: the stage of every op, the device of every stage, which stages recompute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ftc.ir import Cost, FtcError, Graph, Node, OtherMeta, Ref, ScalarMeta, SeqMeta, TensorMeta, meta_nbytes, meta_tensors
from ftc.passes.cleanup import draws_random

from .memory import Footprint, MemorySettings, StageMemory, StateUse, add_rectangle, interval_sums, summed

# Ops whose output may share memory with their first argument: an in-place op on the output
# also changes the input, so the mutation span reaches back to the first non-view producer.
VIEW_OPS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "swapaxes",
    "swapdims", "permute", "movedim", "t", "expand", "expand_as", "narrow", "select", "squeeze",
    "unsqueeze", "as_strided", "chunk", "split", "split_with_sizes", "tensor_split", "unbind",
    "diagonal", "unfold", "contiguous", "detach", "getitem", "__getitem__", "slice", "alias",
    "real", "imag", "view_as_real", "view_as_complex", "_unsafe_view",
}  # fmt: skip

SCALAR_BYTES = 8


def is_view_op(target: str) -> bool:
    parts = target.split(".")
    # "torch.ops.aten.view.default" -> "view"; "operator.getitem" -> "getitem"; "view" -> "view"
    name = parts[-2] if target.startswith("torch.ops.") else parts[-1]
    return name in VIEW_OPS


def comm_bytes(meta) -> int:
    """Bytes moved for one value across a boundary, forward and backward."""
    if isinstance(meta, TensorMeta):
        return meta.nbytes * (2 if meta.requires_grad and meta.is_float else 1)
    if isinstance(meta, ScalarMeta):
        return SCALAR_BYTES
    if isinstance(meta, SeqMeta):
        return sum(comm_bytes(item) for item in meta.items)
    return 0


def gradient_bytes(meta) -> int:
    """The part of comm_bytes that moves backward: gradients of floating tensors that require grad."""
    return sum(t.nbytes for t in meta_tensors(meta) if t.requires_grad and t.is_float)


def may_draw_random(node: Node, modules: dict[str, str]) -> bool:
    """Whether running the node may draw random numbers: a random function, a dropout module,
    or a module of the model's own (LEAF_MODULES) whose code ftc does not see."""
    if node.op != "call_module":
        return draws_random(node.target)
    cls = modules.get(node.target, "")
    return draws_random(cls) or draws_random(node.target) or not cls.startswith("torch.nn.")


@dataclass
class Transfer:
    value: str
    producer: int  # op position; model inputs are at 0 (the first stage)
    consumers: list[int]  # sorted, distinct op positions that read it (outputs: the last op)
    nbytes: int  # moved across a boundary, forward and backward (comm_bytes)
    value_bytes: int = 0  # the value itself at the compile batch size (a receiving recomputing stage keeps it)
    grad_bytes: int = 0  # the part of nbytes that moves backward (gradient_bytes)
    from_data: bool = False  # a model input: every device that reads it loads it with the batch, none sends it


@dataclass(frozen=True)
class FixedCost:
    """Seconds a stage pays once, whatever ops it holds: in its forward and in its backward."""

    fwd: float = 0.0
    bwd: float = 0.0

    @property
    def total(self) -> float:
        return self.fwd + self.bwd

    @classmethod
    def of(cls, cost: Cost | None) -> FixedCost:
        return cls(cost.fwd_time, cost.bwd_time) if cost is not None else cls()


@dataclass(frozen=True)
class KindCost:
    """What a stage pays once for holding any of the ops at `positions` (one kind of op)."""

    positions: np.ndarray  # sorted op positions of the kind
    cost: FixedCost


@dataclass
class Problem:
    ops: list[str]  # compute node names in program order
    time: np.ndarray  # forward + backward seconds of each op
    transfers: list[Transfer]
    no_cut: np.ndarray  # no_cut[k]: no stage boundary between ops k and k+1
    bandwidth: float  # bytes per second
    fwd_time: np.ndarray | None = None  # forward seconds of each op (None: zero)
    footprint: Footprint = field(default_factory=lambda: Footprint(MemorySettings(), np.zeros(0), []))
    random: np.ndarray | None = None  # random[k]: op k may draw random numbers (None: none does)
    name: str = "model"
    # The model's top-level block each op belongs to ("blocks.3" for an item of a ModuleList or
    # Sequential, "wte" for another child, "" for the root's own ops), for the uniform baseline.
    units: list[str] = field(default_factory=list)
    stage_call: FixedCost = FixedCost()  # paid by every stage (Graph.stage_cost)
    loss: FixedCost = FixedCost()  # paid by the stage holding the last op (Graph.loss_cost)
    kinds: list[KindCost] = field(default_factory=list)  # paid by a stage holding any op of the kind
    # Why ops must share a stage: (first op, last op, the reason), for errors to name.
    glue: list[tuple[int, int, str]] = field(default_factory=list)
    # The parameter each op changes in place in forward ("" for none: an EMA teacher's update, an
    # Embedding's max_norm rows): a stage holding such an op cannot recompute, since the second
    # forward would change it again, and a copy per micro-batch to replay it would cost more
    # memory than recomputation saves.
    rewrites: list[str] = field(default_factory=list)

    def recomputable(self, members: np.ndarray) -> bool:
        """Whether a stage holding the ops of a boolean mask may recompute."""
        return not any(self.rewrites[k] for k in np.flatnonzero(members)) if self.rewrites else True

    def recomputable_table(self) -> np.ndarray | bool:
        """R[i, j]: whether the interval of ops i..j-1 may recompute (True: every interval)."""
        if not any(self.rewrites):
            return True
        return interval_sums(np.array([bool(name) for name in self.rewrites], dtype=float)) == 0

    @property
    def size(self) -> int:
        return len(self.ops)

    @property
    def forward(self) -> np.ndarray:
        """Forward seconds of each op: what a recomputing stage runs again in its backward."""
        return self.fwd_time if self.fwd_time is not None else np.zeros(self.size)

    @property
    def saved(self) -> np.ndarray:
        """Bytes each op saves for backward, per micro-batch."""
        return self.footprint.saved if self.footprint.saved.size else np.zeros(self.size)

    def member_cost(self, members: np.ndarray, device: np.ndarray | None = None) -> float:
        """Cost of the stage holding the ops of a boolean mask (any set, contiguous or not);
        `device`: the ops of every stage on its device (see member_comm)."""
        return float(self.time[members].sum()) + sum(self.member_comm(members, device)) + self.fixed(members).total

    def member_comm(self, members: np.ndarray, device: np.ndarray | None = None) -> tuple[float, float]:
        """Seconds the stage holding the ops of a boolean mask spends sending and receiving, in
        its forward (values) and in its backward (their gradients). With `device`, the ops of
        every stage on the stage's device (mixed-pipe), a value that stays on the device is
        free: the runtime hands it over in memory."""
        moved = backward = 0
        for t in self.transfers:
            inside = members[t.producer]
            readers = members[t.consumers]
            if device is not None and device[t.producer] and device[t.consumers].all():
                continue
            sends = inside and not readers.all()
            receives = not inside and readers.any() and (device is None or not device[t.producer])
            if sends or receives:
                moved += t.nbytes
                backward += t.grad_bytes
        return (moved - backward) / self.bandwidth, backward / self.bandwidth

    def fixed(self, members: np.ndarray) -> FixedCost:
        """The fixed costs of the stage holding the ops of a boolean mask (see the module doc)."""
        paid = [self.stage_call]
        if members[self.size - 1]:
            paid.append(self.loss)
        paid.extend(kind.cost for kind in self.kinds if members[kind.positions].any())
        return FixedCost(sum(cost.fwd for cost in paid), sum(cost.bwd for cost in paid))

    def member_received(self, members: np.ndarray) -> int:
        """Bytes of the values the stage holding the ops of a boolean mask receives."""
        return sum(t.value_bytes for t in self.transfers if not members[t.producer] and members[t.consumers].any())

    def stage_time(self, members: np.ndarray, recompute: bool, device: np.ndarray | None = None) -> float:
        """member_cost, plus the forward again in backward when the stage recomputes."""
        return self.member_cost(members, device) + self.recompute_time(members, recompute)

    def device_times(self, result: Partition) -> np.ndarray:
        """Seconds each device of a partition spends per batch: the stage_time of its stages."""
        times = np.zeros(max(result.devices) + 1)
        for s, device in enumerate(result.devices):
            times[device] += self.stage_time(result.members(s), result.recompute[s], result.device_members(device))
        return times

    def recompute_time(self, members: np.ndarray, recompute: bool) -> float:
        """The re-forward a recomputing stage pays in backward: its ops' forward (the loss and
        the stage call's fixed costs are paid once)."""
        return float(self.forward[members].sum()) if recompute else 0.0

    def stage_memory(self, members: np.ndarray, position: int, stages: int, recompute: bool) -> StageMemory:
        """Memory of the stage holding the ops of a boolean mask at `position` of `stages`."""
        held, trainable = self.footprint.state_bytes(members)
        in_flight = self.footprint.settings.in_flight(position, stages)
        saved = int(self.saved[members].sum())
        share = self.footprint.settings.share(stages)
        largest = float(self.largest[members].max()) if members.any() else 0.0
        parameter = int(self.footprint.largest_parameter(self.size)[members].max()) if members.any() else 0
        loss_saved, outputs = 0.0, 0.0
        if members[self.size - 1]:  # the stage that computes the loss
            loss_saved = self.footprint.loss_saved
            outputs = self.footprint.loss_outputs(members)
        stash = self.footprint.settings.stash_copies(position, stages)
        transient = float(self.transient[members].sum())
        return self.footprint.memory(held, trainable, saved, self.member_received(members), in_flight, recompute,
                                     share, self.member_sent(members), largest, parameter, loss_saved, outputs,
                                     stash, transient, self.footprint.partial_gradients(members))  # fmt: skip

    @property
    def transient(self) -> np.ndarray:
        """Bytes each op makes in forward that nothing saves, per compile batch."""
        return self.footprint.transient if self.footprint.transient.size else np.zeros(self.size)

    @property
    def largest(self) -> np.ndarray:
        """Bytes of each op's output's gradient, per compile batch."""
        return self.footprint.largest if self.footprint.largest.size else np.zeros(self.size)

    def member_sent(self, members: np.ndarray) -> int:
        """Bytes of the values the stage holding the ops of a boolean mask sends to other stages."""
        return sum(t.value_bytes for t in self.transfers
                   if not t.from_data and members[t.producer] and not members[t.consumers].all())  # fmt: skip

    def sent_table(self) -> np.ndarray:
        """S[i, j] = bytes of the values the stage of ops i..j-1 sends, for all intervals: a value
        made inside that a later op outside reads."""
        n = self.size
        diff = np.zeros((n + 2, n + 2))
        for t in self.transfers:
            last = max(t.consumers)
            if last > t.producer and not t.from_data:
                # intervals [i, j) with i <= producer < j <= last
                add_rectangle(diff, 0, t.producer, t.producer + 1, last, t.value_bytes)
        return summed(diff, n)

    def largest_table(self) -> np.ndarray:
        """L[i, j] = the largest op output's gradient bytes among ops i..j-1, for all intervals."""
        return _interval_max(self.largest)

    def largest_parameter_table(self) -> np.ndarray:
        """P[i, j] = bytes of the largest trainable tensor ops i..j-1 read, for all intervals."""
        return _interval_max(self.footprint.largest_parameter(self.size))

    def received_table(self) -> np.ndarray:
        """R[i, j] = bytes of the values the stage of ops i..j-1 receives, for all intervals."""
        n = self.size
        diff = np.zeros((n + 2, n + 2))
        for t in self.transfers:
            previous = t.producer
            for c in (c for c in t.consumers if c > t.producer):
                add_rectangle(diff, previous + 1, c, c + 1, n, t.value_bytes)
                previous = c
        return summed(diff, n)

    def max_stages(self) -> int:
        return 1 + int((~self.no_cut[: self.size - 1]).sum()) if self.size else 0

    def stage_cost(self, start: int, end: int) -> float:
        """Cost of the stage holding ops start..end-1, straight from the definition."""
        members = np.zeros(self.size, dtype=bool)
        members[start:end] = True
        return self.member_cost(members)

    def interval_costs(self) -> np.ndarray:
        """C[i, j] = stage_cost(i, j) for all 0 <= i < j <= N, in O(N^2 + edges) with numpy.

        Each transfer adds its bytes over rectangles of (i, j): as sender for i <= producer <
        j <= last reader; as receiver for first-reader-at-or-after-i < j, one rectangle per gap
        between consecutive readers. A 2-D difference array sums the rectangles."""
        n = self.size
        diff = np.zeros((n + 2, n + 2))
        for t in self.transfers:
            weight = t.nbytes / self.bandwidth
            later = [c for c in t.consumers if c > t.producer]
            if not later:
                continue
            add_rectangle(diff, 0, t.producer, t.producer + 1, later[-1], weight)
            previous = t.producer
            for c in later:
                add_rectangle(diff, previous + 1, c, c + 1, n, weight)
                previous = c
        # A kind's cost, like a received value's: [i, j) holds an op of the kind when its first
        # op of the kind at or after i comes before j.
        for kind in self.kinds:
            previous = -1
            for p in kind.positions:
                add_rectangle(diff, previous + 1, p, p + 1, n, kind.cost.total)
                previous = p
        moved = summed(diff, n)
        costs = interval_sums(self.time) + moved + self.stage_call.total
        costs[:, n] += self.loss.total
        return costs


def improves(candidate: tuple[float, float], best: tuple[float, float]) -> bool:
    """For local search over (bottleneck, sum of squared costs): a lower bottleneck, or the same
    one and a lower sum of squares, beyond rounding, so that rounding in running sums cannot
    undo and redo a move forever."""
    margin = 1e-9
    if candidate[0] < best[0] * (1 - margin):
        return True
    return candidate[0] <= best[0] * (1 + margin) and candidate[1] < best[1] * (1 - margin)


@dataclass
class Partition:
    """A partitioner's answer: the stage of every op, numbered in a topological order of the
    stages, the device of each stage, and which stages recompute."""

    stage_of: np.ndarray  # stage of each op position
    devices: list[int]
    recompute: list[bool]

    @property
    def num_stages(self) -> int:
        return len(self.devices)

    def members(self, stage: int) -> np.ndarray:
        return self.stage_of == stage

    def device_members(self, device: int) -> np.ndarray:
        """The ops of every stage on `device`."""
        return np.isin(self.stage_of, [s for s, d in enumerate(self.devices) if d == device])

    @classmethod
    def contiguous(cls, size: int, starts: list[int], recompute: list[bool]) -> Partition:
        """Stage k holds ops starts[k] .. starts[k+1]-1 and runs on device k."""
        stage_of = np.zeros(size, dtype=int)
        for start in starts[1:]:
            stage_of[start:] += 1
        return cls(stage_of, list(range(len(starts))), list(recompute))


def _interval_max(values: np.ndarray) -> np.ndarray:
    """M[i, j] = max(values[i:j]) for all intervals (0 for the empty ones)."""
    n = len(values)
    table = np.zeros((n + 1, n + 1))
    for i in range(n):
        table[i, i + 1 :] = np.maximum.accumulate(values[i:])
    return table


def build_problem(graph: Graph, bandwidth_gbps: float, memory: MemorySettings = MemorySettings()) -> Problem:
    ops = [node.name for node in graph.nodes if node.is_compute]
    if not ops:
        raise FtcError(f"model {graph.name!r} has no operations to partition")
    position = {name: k for k, name in enumerate(ops)}
    for node in graph.nodes:
        if node.op == "input":
            position[node.name] = 0
    last = len(ops) - 1
    readers: dict[str, set[int]] = {}
    for node in graph.nodes:
        if node.is_compute:
            for name in node.refs():
                if name in position:  # get_attr values are re-read by each stage, never sent
                    readers.setdefault(name, set()).add(position[node.name])
    for ref in graph.outputs.values:
        if ref.name in position:
            readers.setdefault(ref.name, set()).add(last)
    by_name = graph.by_name()
    transfers = []
    for name, consumers in readers.items():
        meta, from_data = by_name[name].meta, by_name[name].op == "input"
        moved, gradient = (0, 0) if from_data else (comm_bytes(meta), gradient_bytes(meta))
        transfers.append(Transfer(name, position[name], sorted(consumers), moved, meta_nbytes(meta), gradient, from_data))
    no_cut = np.zeros(len(ops), dtype=bool)
    glue: list[tuple[int, int, str]] = []

    def forbid(first: int, final: int, reason: str) -> None:
        no_cut[first:final] = True
        if final > first:
            glue.append((first, final, reason))

    for t in transfers:
        meta = by_name[t.value].meta
        if (isinstance(meta, SeqMeta) and meta_tensors(meta)) or _holds_object(meta):
            what = "an object the runtime cannot send" if _holds_object(meta) else "several tensors"
            forbid(t.producer, t.consumers[-1], f"{t.value} holds {what} and stays with its readers")
        elif isinstance(meta, TensorMeta) and meta.unbatched_dims and not t.from_data:
            forbid(t.producer, t.consumers[-1], f"{t.value}'s size {meta.shape} changes with the batch size but not "
                                                "in proportion to it, so it stays with its readers")  # fmt: skip
    mutated_state: dict[str, list[str]] = {}  # state -> the ops that write it
    for node in graph.nodes:
        if node.is_compute and node.mutates is not None and node.mutates < len(node.args):
            root = _view_root(node.args[node.mutates], by_name)
            if root is not None and by_name[root].op == "input":
                # Every stage reads a model input from the data as it was: the mutation and every
                # op that reads the input (or a view of it) share one stage.
                touching = [position[n.name] for n in graph.nodes
                            if n.is_compute and any(_view_root(Ref(r), by_name) == root for r in n.refs())]  # fmt: skip
                forbid(min(touching), max(touching), f"{node.name} changes model input {root} in place, so it stays "
                                                     "with every op that reads the input")  # fmt: skip
            elif root is not None and root in position:
                forbid(position[root], position[node.name], f"{node.name} changes {root} in place")
            elif root is not None and by_name[root].op == "get_attr":
                mutated_state.setdefault(graph.canonical(by_name[root].target), []).append(node.name)
        if node.is_compute:
            for state in node.updates:
                mutated_state.setdefault(state, []).append(node.name)
    # A buffer (or parameter) that forward updates stays in one stage with every op that reads
    # it (a get_attr of it, or a call of a leaf module that holds it): stages on other devices
    # would hold copies that miss the update.
    held_names = [(name, graph.canonical(name)) for name in graph.state]
    held_names = [(name, state) for name, state in held_names if state in mutated_state]  # with aliases
    readers_of_state: dict[str, list[int]] = {}
    for node in graph.nodes:
        if not node.is_compute or not mutated_state:
            continue
        read = {graph.canonical(by_name[name].target) for name in node.refs() if by_name[name].op == "get_attr"}
        if node.op == "call_module":
            read |= {state for name, state in held_names if name.startswith(f"{node.target}.")}
        for state in read & mutated_state.keys():
            readers_of_state.setdefault(state, []).append(position[node.name])
    # One reason for the tensors of one module that the same ops write (a BatchNorm's statistics).
    spans: dict[tuple[int, int, tuple[str, ...]], list[str]] = {}
    for state, positions in readers_of_state.items():
        spans.setdefault((min(positions), max(positions), tuple(mutated_state[state])), []).append(state)
    for (first, final, writers), states in spans.items():
        forbid(first, final,
               f"{', '.join(states)} {'is' if len(states) == 1 else 'are'} changed in place by forward "
               f"({', '.join(_source_of(by_name[w]) for w in writers)}), so every op that reads "
               f"{'it' if len(states) == 1 else 'them'} stays with {'that op' if len(writers) == 1 else 'those ops'} "
               f"({ops[first]} .. {ops[final]})")  # fmt: skip
    rewrites = [""] * len(ops)
    for state, writers in mutated_state.items():
        held = graph.state.get(state)
        if held is not None and held.kind == "parameter":
            for writer in writers:
                rewrites[position[writer]] = rewrites[position[writer]] or state
    time = np.array([by_name[name].cost.fwd_time + by_name[name].cost.bwd_time for name in ops])
    fwd_time = np.array([by_name[name].cost.fwd_time for name in ops])
    random = np.array([may_draw_random(by_name[name], graph.modules) for name in ops], dtype=bool)
    footprint = Footprint(
        memory,
        np.array([_saved_bytes(by_name[name]) for name in ops]),
        _state_uses(graph, position),
        np.array([float(gradient_bytes(by_name[name].meta)) for name in ops]),
        float(graph.loss_cost.peak_memory or 0) if graph.loss_cost is not None else 0.0,
        [(position[ref.name], float(meta_nbytes(by_name[ref.name].meta)))
         for ref in {ref.name: ref for ref in graph.outputs.values}.values() if ref.name in position],
        all(by_name[name].cost.peak_memory is None for name in ops),
        np.array([_transient_bytes(by_name[name]) for name in ops]),
    )
    units = [_unit(by_name[name], graph.modules) for name in ops]
    kind_positions: dict[str, list[int]] = {}
    for k, name in enumerate(ops):
        kind_positions.setdefault(graph.kind(by_name[name]), []).append(k)
    kinds = [KindCost(np.array(kind_positions[kind]), FixedCost.of(cost))
             for kind, cost in graph.kind_costs.items() if kind in kind_positions and cost.fwd_time + cost.bwd_time]  # fmt: skip
    return Problem(
        ops, time, transfers, no_cut, bandwidth_gbps * 1e9, fwd_time, footprint, random, graph.name, units,
        FixedCost.of(graph.stage_cost), FixedCost.of(graph.loss_cost), kinds, glue, rewrites,
    )  # fmt: skip


def _source_of(node: Node) -> str:
    """The op as the model's source calls it, and where."""
    call = f"self.{node.target}(...)" if node.op == "call_module" else f"{node.target}(...)"
    return f"{call} at {node.source}" if node.source else call


def _holds_object(meta) -> bool:
    """Whether a value holds something the runtime cannot send (a dict a leaf module returns):
    its producer and readers share a stage."""
    if isinstance(meta, SeqMeta):
        return any(_holds_object(item) for item in meta.items)
    return isinstance(meta, OtherMeta)


CONTAINERS = ("torch.nn.modules.container.ModuleList", "torch.nn.modules.container.Sequential")


def _unit(node: Node, modules: dict[str, str]) -> str:
    path = node.target if node.op == "call_module" else node.module_path
    parts = path.split(".") if path else []
    if len(parts) > 1 and modules.get(parts[0]) in CONTAINERS:
        return ".".join(parts[:2])
    return parts[0] if parts else ""


def _saved_bytes(node: Node) -> float:
    if node.cost.peak_memory is not None:
        return float(node.cost.peak_memory)
    if is_view_op(node.target):
        return 0.0
    return float(gradient_bytes(node.meta))


def _transient_bytes(node: Node) -> float:
    """What a node makes in forward that nothing saves: 0 where the IR's estimate takes every
    output as saved; a profile that counted saved bytes but not these (a save-memory
    measurement, a profile cached before it counted them) is charged every output again."""
    if node.cost.peak_memory is None:
        return 0.0
    if node.cost.transient_memory is not None:
        return float(node.cost.transient_memory)
    return 0.0 if is_view_op(node.target) else float(gradient_bytes(node.meta))


def _state_uses(graph: Graph, position: dict[str, int]) -> list[StateUse]:
    """Every parameter and buffer forward reads, with the positions of the ops that read it."""
    by_name = graph.by_name()
    readers: dict[str, set[int]] = {}
    for node in graph.nodes:
        if not node.is_compute:
            continue
        names = [by_name[ref].target for ref in node.refs() if by_name[ref].op == "get_attr"]
        if node.op == "call_module":
            prefix = node.target + "."
            names += [name for name in graph.state if name.startswith(prefix)]
        for name in names:
            if name in graph.state:
                readers.setdefault(name, set()).add(position[node.name])
    uses = []
    for name, positions in readers.items():
        tensor = graph.state[name]
        trainable = tensor.kind == "parameter" and tensor.meta.requires_grad and tensor.meta.is_float
        uses.append(StateUse(name, tensor.meta.nbytes, trainable, sorted(positions)))
    return uses


def _view_root(arg, by_name) -> str | None:
    """The value whose memory an argument shares: follow view ops back to their source."""
    if not isinstance(arg, Ref):
        return None
    name = arg.name
    while True:
        node = by_name[name]
        if not (node.is_compute and is_view_op(node.target) and node.args and isinstance(node.args[0], Ref)):
            return name
        name = node.args[0].name
