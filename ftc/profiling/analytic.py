"""Analytic profile on the meta device: FLOPs, bytes and a roofline time per node, no weights.

Forward and backward FLOPs are counted by torch.utils.flop_counter while each node runs on meta
tensors; the backward is the real autograd graph of that one node (gradients of its floating
inputs that require grad and of its module's parameters), so it is counted, not estimated.
FlopCounter counts matmul-like ops only, and has no formula for grouped matmuls, in which
mixture-of-experts layers spend nearly all their time (torch's `_grouped_mm`, transformers'
`grouped_mm_fallback`, which its MoE layers call under export): `flop_formulas` adds them, else
the experts would cost only their memory traffic and the partitioner would pile them up; elementwise ops, norms and embeddings cost memory
traffic instead, so a node's time is the roofline max(FLOPs / peak, bytes / memory bandwidth).
Memory traffic is the bytes of the tensors a node reads and writes (views move nothing), plus
the weights of a module it calls (an embedding reads only the rows it looks up, its output);
its backward is taken as twice the tensors' traffic (read the output gradient and the saved
inputs, write the input gradients) plus twice the weights (read them for the input gradient,
write their gradients; an embedding writes its whole table's gradient), which is an estimate.

Eager PyTorch also pays a fixed cost for every ATen op it dispatches (Python, the dispatcher,
autograd's bookkeeping, a kernel launch) whatever the op computes; on small tensors that cost
is the whole time. So the profile counts the ATen ops each node dispatches, in its forward and
in its own backward (on the meta device, with the same cut as the FLOPs), and a node's time is

    roofline + ops * DeviceModel.op_overhead_us

Beyond its nodes, every stage pays for being called (its forward call, its backward's engine
start: DeviceModel.stage_overhead_us, Graph.stage_cost), and the last stage pays the training
loss, the model file's loss_fn on the model's outputs, counted the same way, each of its ATen
ops with its own traffic (ftc/profiling/loss.py, Graph.loss_cost).

Activation memory (Cost.peak_memory) is what autograd saves for backward, as the measured
profile counts it (ftc/profiling/saved_bytes.py): the storages each node's forward saves
(torch.autograd.graph.saved_tensors_hooks on the meta device), parameters and buffers left out,
each storage counted once model-wide, for the first node that saves it. Meta storages have no
address, but torch keeps one storage object per storage while it lives, so views and in-place
results are known by that object. A ReLU after a convolution saves its output, which the next
convolution saves again as its input: one storage; the convolution's output, which nothing
saves, is not held at all.

Transformer blocks repeat: the same op on arguments of the same shapes costs the same, so one
profile counts each distinct (op, module settings, argument metadata) once and reuses the counts
for its repeats, which stand-in outputs (ftc/repeats.py) spare from running at all. A repeat
saves the same things in the same places (its n-th input, its m-th output, a tensor of its
own), which it charges unless an earlier node saved that storage already.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ftc.frontends.meta import fails_only_on_meta
from ftc.interpreter import Interpreter
from ftc.ir import Cost, Graph, Node
from ftc.passes.partition.problem import is_view_op
from ftc.repeats import Repeats, repeat_key, tensors_in
from ftc.runtime.model_file import ModelFile

from .loss import as_leaves, loss_target


@dataclass(frozen=True)
class DeviceModel:
    """The device the analytic times assume. Defaults are one CPU core of a current server.

    The fixed costs were measured on one core of this project's machine (an Intel Xeon server
    core, torch 2.13, one thread, thread CPU time, fastest of 15 tries): stages of K tiny blocks
    (Linear 16->16, LayerNorm, GELU, ReLU, a residual add; batch 8, so the roofline is under 1%)
    ran forward and backward for K = 1 and 32; the time per block over the ATen ops counted per
    block (7 forward, 13 backward) gave 7.7-10.7 us per op over three runs, and the 1-block
    stage less its ops' share gave 20-49 us per stage, as did a stage that only returns a view
    of its input (38 us forward and backward, 6 us of it forward). The same core reaches about
    0.1 TFLOP/s on a 512x512 matmul and 9-17 GB/s copying 16 MB, the two figures above."""

    tflops: float = 0.1  # peak floating-point throughput, TFLOP/s
    memory_gbps: float = 10.0  # memory bandwidth, GB/s
    op_overhead_us: float = 8.0  # microseconds each dispatched ATen op costs beyond its roofline
    stage_overhead_us: float = 30.0  # microseconds of calling a stage, forward and backward

    def time(self, flops: int, nbytes: int, ops: int = 0) -> float:
        roofline = max(flops / (self.tflops * 1e12), nbytes / (self.memory_gbps * 1e9))
        return roofline + ops * self.op_overhead_us / 1e6

    def stage_cost(self) -> Cost:
        """What calling a stage costs, all of it charged to the backward, whose engine start
        is most of it (6 of the 38 us above were the forward)."""
        return Cost(bwd_time=self.stage_overhead_us / 1e6)


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched on meta tensors while it is active, and the bytes of the
    tensors they read and write (view ops, which move nothing, count as ops but add no bytes).
    Ops on real tensors are left out: a module that only runs for real (interpreter.run_on_cpu)
    runs on random stand-in values, which may decide which ops its Python dispatches, and drawing
    them is no cost of the model. Counting meta ops only keeps the profile deterministic; such a
    module counts the ops that bring its outputs back to meta (its FLOPs are counted in full)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = tensors_in((args, kwargs, out))
        if any(t.device.type == "meta" for t in tensors):
            self.ops += 1
            if not is_view_op(func.__name__.split(".")[0]):
                self.nbytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


@dataclass(frozen=True)
class NodeCounts:
    """What the analytic profile counts for one node."""

    fwd_flops: int
    bwd_flops: int
    nbytes: int  # forward memory traffic
    fwd_ops: int  # ATen ops dispatched
    bwd_ops: int
    bwd_nbytes: int = 0  # backward memory traffic


def _traffic(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> int:
    written = [t for t in outputs if not t._is_view() and all(t is not i for i in inputs)]
    if not written:
        return 0
    return sum(t.numel() * t.element_size() for t in (*inputs, *written))


# Layers that read only the rows of their weight that they look up.
_SPARSE_READERS = (torch.nn.Embedding, torch.nn.EmbeddingBag)


def _weight_bytes(node: Node, model: torch.nn.Module) -> tuple[int, int]:
    """What a called module's own trainable weights add to its forward and backward traffic."""
    if node.op != "call_module":
        return 0, 0
    module = model.get_submodule(node.target)
    weights = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return (0 if isinstance(module, _SPARSE_READERS) else weights), 2 * weights


def _cut(value: Any, leaves: list[torch.Tensor]) -> Any:
    """A copy of the arguments cut from the autograd graph, so that a backward covers one node.
    Inputs that require grad become new leaves (collected in `leaves`), cloned so that in-place
    ops may still write to them."""
    if isinstance(value, torch.Tensor):
        if not value.requires_grad:
            return value.detach()
        leaf = value.detach().requires_grad_()
        leaves.append(leaf)
        return leaf.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_cut(item, leaves) for item in value)
    if isinstance(value, dict):
        return {key: _cut(item, leaves) for key, item in value.items()}
    return value


# Where a tensor a node saves for backward lives: ("input", i) the storage of the node's i-th input
# tensor, ("output", i) of its i-th output tensor, ("own", bytes) a storage of its own making.
SavedRole = tuple[str, int]


class _SavedStorages:
    """The storages autograd saves, each charged once, to the first node that saves it."""

    def __init__(self, model: torch.nn.Module):
        self.state = {id(t.untyped_storage()) for t in (*model.parameters(), *model.buffers())}
        # A node runs on copies of its inputs cut from the graph (_cut), so what it returns in
        # place or as a view lives in a copy's storage: id(copy's storage) -> (copy's, original's),
        # both kept so that no id is reused while the run lasts.
        self.origin: dict[int, tuple[Any, Any]] = {}
        self.charged: dict[int, Any] = {}  # id(storage) -> storage, kept for the same reason
        self.made: dict[str, dict[int, Any]] = {}  # node -> the storages its outputs are new in

    def resolve(self, tensor: torch.Tensor) -> Any:
        """The storage a tensor lives in, in the model's own run (not a cut copy's)."""
        storage = tensor.untyped_storage()
        while id(storage) in self.origin:
            storage = self.origin[id(storage)][1]
        return storage

    def record_made(self, name: str, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        """Remember the storages a node's outputs live in that none of its inputs shares (not a
        view, not an in-place result) and that are no parameter or buffer."""
        reused = {id(self.resolve(t)) for t in inputs} | self.state
        self.made[name] = {id(s): s for s in map(self.resolve, outputs) if id(s) not in reused}

    def transient(self, name: str) -> int:
        """Bytes of the storages the node made that no node saved (call after the whole run)."""
        return sum(s.nbytes() for key, s in self.made.get(name, {}).items() if key not in self.charged)

    def cut(self, args: tuple, kwargs: dict, leaves: list[torch.Tensor]) -> tuple[tuple, dict]:
        """_cut of a node's arguments, remembering which storage each copy stands for."""
        cut_args, cut_kwargs = _cut(args, leaves), _cut(kwargs, leaves)
        for original, copy in zip(tensors_in((args, kwargs)), tensors_in((cut_args, cut_kwargs))):
            if copy.untyped_storage() is not original.untyped_storage():
                self.origin[id(copy.untyped_storage())] = (copy.untyped_storage(), original.untyped_storage())
        return cut_args, cut_kwargs

    def roles(self, saved: list[Any], inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> tuple[SavedRole, ...]:
        """Where the storages a node saved (`saved`, from its pack hook) live; parameters and
        buffers of the model left out."""
        roles: dict[int, SavedRole] = {}
        for storage in saved:
            if id(storage) in roles or id(storage) in self.state:
                continue
            found = [("input", i) for i, t in enumerate(inputs) if t.untyped_storage() is storage]
            found += [("output", i) for i, t in enumerate(outputs) if t.untyped_storage() is storage]
            roles[id(storage)] = found[0] if found else ("own", storage.nbytes())
        return tuple(roles.values())

    def charge(self, roles: tuple[SavedRole, ...], inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> int:
        """Bytes of the storages a node saves in `roles` that no earlier node saved."""
        total = 0
        for kind, index in roles:
            if kind == "own":
                total += index
                continue
            storage = self.resolve((inputs if kind == "input" else outputs)[index])
            if id(storage) not in self.state and id(storage) not in self.charged:
                self.charged[id(storage)] = storage
                total += storage.nbytes()
        return total


class _Counter(Interpreter):
    def __init__(self, graph: Graph, model: torch.nn.Module):
        super().__init__(graph, model, device="meta")
        self.costs: dict[str, NodeCounts] = {}
        self.counted: dict[Hashable, NodeCounts] = {}  # repeat_key -> counts
        self.repeats = Repeats(model)
        self.storages = _SavedStorages(model)
        self.saved_roles: dict[Hashable, tuple[SavedRole, ...]] = {}  # repeat_key -> where it saves
        self.saved: dict[str, int] = {}  # node -> bytes of the storages it saves first

    def run_node(self, node: Node, args: tuple, kwargs: dict) -> Any:
        if not node.is_compute:
            return super().run_node(node, args, kwargs)
        key = repeat_key(node, self.model, args, kwargs)
        inputs = tensors_in((args, kwargs))
        if key in self.counted:
            self.costs[node.name] = self.counted[key]
            replayed, out = self.repeats.replay(key)
            if not replayed:
                # views and other outputs that need the real op: run it, uncounted
                out = super().run_node(node, *self.storages.cut(args, kwargs, []))
            self.saved[node.name] = self.storages.charge(self.saved_roles[key], inputs, tensors_in(out))
            self.storages.record_made(node.name, inputs, tensors_in(out))
            return out
        # One run on inputs cut from the graph gives the forward's FLOPs and bytes and a
        # backward that covers this node alone. On the meta device the cut copies carry all
        # the later nodes need (shapes, dtypes, requires_grad).
        roles = self._saved_roles(node, args, kwargs)
        leaves: list[torch.Tensor] = []
        args, kwargs = self.storages.cut(args, kwargs, leaves)
        with flop_counter() as counter, OpCounter() as dispatched:
            out = super().run_node(node, args, kwargs)
        fwd_flops = counter.get_total_flops()
        self.saved[node.name] = self.storages.charge(roles, inputs, tensors_in(out))
        self.storages.record_made(node.name, inputs, tensors_in(out))
        nbytes = _traffic(tensors_in((args, kwargs)), tensors_in(out))
        backward = self._backward(node, out, leaves)
        if backward is None:
            # A module that only runs for real (interpreter.run_on_cpu) has no autograd graph
            # on the meta device to count; its backward is taken as twice its forward, as for
            # a linear layer. It may read tensor values, so its repeats are counted anew.
            backward, key = (2 * fwd_flops, 2 * dispatched.ops), None
        fwd_weights, bwd_weights = _weight_bytes(node, self.model)
        self.costs[node.name] = NodeCounts(
            fwd_flops, backward[0], nbytes + fwd_weights, dispatched.ops, backward[1], 2 * nbytes + bwd_weights
        )
        if key is not None:
            self.counted[key] = self.costs[node.name]
            self.saved_roles[key] = roles
            self.repeats.record(key, node, (args, kwargs), out)
        return out

    def _saved_roles(self, node: Node, args: tuple, kwargs: dict) -> tuple[SavedRole, ...]:
        """Where the tensors the node saves for backward live, from a run of its own on other cut
        copies: pack hooks change which ops autograd dispatches (a saved output is not detached),
        so the counted run goes without them."""
        args, kwargs = self.storages.cut(args, kwargs, [])
        saved: list[Any] = []

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            saved.append(tensor.untyped_storage())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = super().run_node(node, args, kwargs)
        return self.storages.roles(saved, tensors_in((args, kwargs)), tensors_in(out))

    def _backward(self, node: Node, out: Any, leaves: list[torch.Tensor]) -> tuple[int, int] | None:
        """FLOPs and ATen ops of the node's own backward (None: no autograd graph to count)."""
        params = []
        if node.op == "call_module":
            params = [p for p in self.model.get_submodule(node.target).parameters() if p.requires_grad]
        outputs = [t for t in tensors_in(out) if t.requires_grad]
        if any(t.grad_fn is None for t in outputs):
            return None
        targets = leaves + params
        if not outputs or not targets:
            return 0, 0
        grads = [torch.ones_like(t) for t in outputs]  # made by whoever sends them, not counted
        try:
            with flop_counter() as counter, OpCounter() as dispatched:
                torch.autograd.grad(outputs, targets, grads, allow_unused=True)
        except Exception as exc:
            # A backward that needs values, as that of an assignment through a boolean mask
            # (`h[mask] = v`, Kosmos-2's image embeddings: v's gradient is `grad[mask]`, sized by
            # nonzero), cannot run on the meta device: it is taken as twice the forward, as for a module
            # that runs for real.
            if not fails_only_on_meta(exc):
                raise
            return None
        return counter.get_total_flops(), dispatched.ops


def profile_analytic(
    graph: Graph, model: torch.nn.Module, batch: tuple | dict, device: DeviceModel, model_file: ModelFile | None = None
) -> Graph:
    """Annotate every compute node's Cost, the stage call's and (with the model file that has
    a loss_fn) the loss's. `model` and `batch` live on the meta device."""
    counter = _Counter(graph, model)
    outputs = counter.run(batch)
    loss_cost = _loss_cost(model_file, outputs, graph.batch_size, device) if model_file is not None else None
    state_bytes = {name: t.meta.nbytes for name, t in graph.state.items()}
    nodes = []
    for node in graph.nodes:
        cost = Cost()
        if node.op == "get_attr":
            cost.param_bytes = state_bytes.get(node.target, 0)
        elif node.is_compute:
            counts = counter.costs[node.name]
            cost.fwd_flops, cost.bwd_flops = counts.fwd_flops, counts.bwd_flops
            cost.fwd_time = device.time(counts.fwd_flops, counts.nbytes, counts.fwd_ops)
            backward = counts.bwd_flops or counts.bwd_ops or _needs_grad(node)
            cost.bwd_time = device.time(counts.bwd_flops, counts.bwd_nbytes, counts.bwd_ops) if backward else 0.0
            cost.peak_memory = counter.saved[node.name]
            cost.transient_memory = counter.storages.transient(node.name)
            if node.op == "call_module":
                prefix = node.target + "."
                cost.param_bytes = sum(b for name, b in state_bytes.items() if name.startswith(prefix))
        nodes.append(replace(node, cost=cost))
    return replace(graph, nodes=nodes, stage_cost=device.stage_cost(), loss_cost=loss_cost)


def _loss_cost(model_file: ModelFile, outputs: Any, batch_size: int, device: DeviceModel) -> Cost | None:
    """The loss on the model's (meta) outputs, forward and backward, counted per ATen op: a loss
    function is several ops (log_softmax, a gather, a mean ...), so its traffic is each op's
    reads and writes (None: no loss, ftc/profiling/loss.py)."""
    leaves = as_leaves(outputs)
    target = loss_target(model_file, leaves, batch_size, "meta")
    if target is None:
        return None
    # What the loss saves for backward beyond its inputs (the outputs and targets, which the
    # runtime holds anyway): the engine keeps it from the loss's forward to its backward.
    given = {id(t.untyped_storage()) for t in (*tensors_in(leaves), *tensors_in(target))}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()  # torch keeps this object while the storage lives
        if id(storage) not in given:
            saved[id(storage)] = storage.nbytes()
        return tensor

    with flop_counter() as fwd_flops, OpCounter() as fwd_ops:
        loss = model_file.loss_fn(leaves, target)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model_file.loss_fn(leaves, target)  # apart: the hooks change which ops autograd dispatches
    inputs = [t for t in tensors_in(leaves) if t.requires_grad]
    with flop_counter() as bwd_flops, OpCounter() as bwd_ops:
        torch.autograd.grad(loss, inputs, allow_unused=True)
    return Cost(
        fwd_flops=fwd_flops.get_total_flops(),
        bwd_flops=bwd_flops.get_total_flops(),
        fwd_time=device.time(fwd_flops.get_total_flops(), fwd_ops.nbytes, fwd_ops.ops),
        bwd_time=device.time(bwd_flops.get_total_flops(), bwd_ops.nbytes, bwd_ops.ops),
        peak_memory=sum(saved.values()),
    )


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, with the formulas it lacks (flop_formulas)."""
    return FlopCounterMode(display=False, custom_mapping=flop_formulas())


def flop_formulas() -> dict[Any, Any]:
    """FLOP formulas for the grouped matmuls that are registered in this process (transformers'
    ops only once its MoE code is imported), by op packet, as FlopCounterMode takes them."""
    formulas: dict[Any, Any] = {torch.ops.aten._grouped_mm: _grouped_mm_flops}
    library = torch.ops.transformers
    if hasattr(library, "grouped_mm_fallback"):  # (input [S, K], weight [E, K, N], offs) -> [S, N]
        formulas[library.grouped_mm_fallback] = lambda x, w, *_, out_shape=None, **__: 2 * x[0] * x[1] * w[2]
    if hasattr(library, "grouped_mm_fallback_backward"):  # both gradients: twice the forward
        formulas[library.grouped_mm_fallback_backward] = lambda x, w, *_, out_shape=None, **__: 4 * x[0] * x[1] * w[2]
    return formulas


def _grouped_mm_flops(a: list[int], b: list[int], *_: Any, out_shape: list[int] | None = None, **__: Any) -> int:
    """aten._grouped_mm: each output element sums over K products, where K is the inner size,
    except for 2-D by 2-D, whose groups split the inner dimension (out [G, M, N] from
    [M, K_total] @ [K_total, N])."""
    if len(a) == 2 and len(b) == 2:
        return 2 * a[0] * a[1] * b[1]
    return 2 * a[-1] * int(torch.Size(out_shape).numel()) if out_shape is not None else 0


def _needs_grad(node: Node) -> bool:
    return bool(getattr(node.meta, "requires_grad", False))
