"""The partitioning problem over a graph's program order, and its stage cost model.

Stages are contiguous runs of the compute ops in program order, which is a topological order
that also keeps in-place mutations where the model put them. A stage's cost is

    compute (forward + backward time of its ops)
  + (bytes it receives + bytes it sends) / bandwidth

where a value crossing a boundary is charged once to the stage that sends it and once to each
stage that receives it, whatever the number of readers inside; values that require grad count
twice (the activation forward, its gradient backward). A value read several stages later is
sent straight to each stage that reads it (not forwarded stage to stage), so the cost of a
stage depends only on its own interval, which is what makes the dynamic program exact.

Model inputs live on the first stage. The model's outputs are read by the last stage (the loss
is computed there), so an output made earlier is sent to it.

Some boundaries are forbidden (`no_cut`): inside a value that holds several tensors (a tuple
from `chunk`, say) between its producer and its last reader; between the value an in-place op
mutates (followed back through views) and that op, so that every reader sees the mutation; and
between the first and last op that touch a buffer forward updates in place (a step counter, an
EMA), since each device holds its own copy of a buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ftc.ir import FtcError, Graph, Ref, ScalarMeta, SeqMeta, TensorMeta, meta_tensors

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


@dataclass
class Transfer:
    value: str
    producer: int  # op position; model inputs are at 0 (the first stage)
    consumers: list[int]  # sorted, distinct op positions that read it (outputs: the last op)
    nbytes: int


@dataclass
class Problem:
    ops: list[str]  # compute node names in program order
    time: np.ndarray  # forward + backward seconds of each op
    transfers: list[Transfer]
    no_cut: np.ndarray  # no_cut[k]: no stage boundary between ops k and k+1
    bandwidth: float  # bytes per second

    @property
    def size(self) -> int:
        return len(self.ops)

    def max_stages(self) -> int:
        return 1 + int((~self.no_cut[: self.size - 1]).sum()) if self.size else 0

    def stage_cost(self, start: int, end: int) -> float:
        """Cost of the stage holding ops start..end-1, straight from the definition."""
        compute = float(self.time[start:end].sum())
        moved = 0
        for t in self.transfers:
            inside = start <= t.producer < end
            if inside and any(c >= end for c in t.consumers):
                moved += t.nbytes
            if not inside and t.producer < start and any(start <= c < end for c in t.consumers):
                moved += t.nbytes
        return compute + moved / self.bandwidth

    def interval_costs(self) -> np.ndarray:
        """C[i, j] = stage_cost(i, j) for all 0 <= i < j <= N, in O(N^2 + edges) with numpy.

        Each transfer adds its bytes over rectangles of (i, j): as sender for i <= producer <
        j <= last reader; as receiver for first-reader-at-or-after-i < j, one rectangle per gap
        between consecutive readers. A 2-D difference array sums the rectangles."""
        n = self.size
        diff = np.zeros((n + 2, n + 2))

        def add(i1: int, i2: int, j1: int, j2: int, weight: float) -> None:
            if i1 > i2 or j1 > j2:
                return
            diff[i1, j1] += weight
            diff[i1, j2 + 1] -= weight
            diff[i2 + 1, j1] -= weight
            diff[i2 + 1, j2 + 1] += weight

        for t in self.transfers:
            weight = t.nbytes / self.bandwidth
            later = [c for c in t.consumers if c > t.producer]
            if not later:
                continue
            add(0, t.producer, t.producer + 1, later[-1], weight)
            previous = t.producer
            for c in later:
                add(previous + 1, c, c + 1, n, weight)
                previous = c
        moved = diff.cumsum(axis=0).cumsum(axis=1)[: n + 1, : n + 1]
        prefix = np.concatenate([[0.0], np.cumsum(self.time)])
        return prefix[None, :] - prefix[:, None] + moved


def build_problem(graph: Graph, bandwidth_gbps: float) -> Problem:
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
    transfers = [
        Transfer(name, position[name], sorted(consumers), comm_bytes(by_name[name].meta))
        for name, consumers in readers.items()
    ]
    no_cut = np.zeros(len(ops), dtype=bool)

    def forbid(first: int, final: int) -> None:
        no_cut[first:final] = True

    for t in transfers:
        meta = by_name[t.value].meta
        if isinstance(meta, SeqMeta) and meta_tensors(meta):
            forbid(t.producer, t.consumers[-1])
    mutated_state = set()
    for node in graph.nodes:
        if node.is_compute and node.mutates is not None and node.mutates < len(node.args):
            root = _view_root(node.args[node.mutates], by_name)
            if root is not None and root in position:
                forbid(position[root], position[node.name])
            elif root is not None and by_name[root].op == "get_attr":
                mutated_state.add(by_name[root].target)
    # A buffer (or parameter) that forward updates stays in one stage with every op that reads
    # it: stages on other devices would hold copies that miss the update.
    readers_of_state: dict[str, list[int]] = {}
    for node in graph.nodes:
        if node.is_compute:
            for name in node.refs():
                if by_name[name].op == "get_attr" and by_name[name].target in mutated_state:
                    readers_of_state.setdefault(by_name[name].target, []).append(position[node.name])
    for positions in readers_of_state.values():
        forbid(min(positions), max(positions))
    time = np.array([by_name[name].cost.fwd_time + by_name[name].cost.bwd_time for name in ops])
    return Problem(ops, time, transfers, no_cut, bandwidth_gbps * 1e9)


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
