"""Value metadata: run the IR on the meta device at two batch sizes and record each value's
shape, dtype and requires_grad, and which dimension follows the batch size.

Running at batch sizes B and 2B is how we tell the batch dimension from the others: a dimension
that doubles scales with the batch (B, or B*T after a flatten); the runtime rescales it for
micro-batches of any size.

Repeats of an op (same op, settings and argument metadata: a transformer's blocks) get stand-in
outputs of the metadata the first one gave (ftc/repeats.py) instead of running again.
"""

from __future__ import annotations

import re
from dataclasses import replace
from functools import partial
from typing import Any

import torch

from ftc.interpreter import Interpreter, library_op
from ftc.ir import FtcError, Graph, Meta, Node, OtherMeta, ScalarMeta, SeqMeta, TensorMeta
from ftc.repeats import Repeats, repeat_key

from .common import dtype_name
from .saved_changes import SavedChanges
from .state_writes import StateWrites


META_ONLY_FIX = (
    "ftc runs the model on the meta device (shapes only): avoid data-dependent Python "
    "(.item(), .tolist(), branching on values), or put that code in a LEAF_MODULES class"
)
# Where `module` (the path of the module whose forward made the failing node) is known: which
# module to list, for export keeps a leaf whole only where it is called as module(...) with
# tensors and returns tensors (a MoE router returning its sizes as ints is no such module).
META_ONLY_FIX_IN = (
    META_ONLY_FIX + " that ftc then runs as written: {module} or a module around it, called as module(...) with "
    "tensor arguments and returning tensors"
)
# What torch says when code needs tensor values, or an op lacks a meta kernel: meta-only failures.
VALUE_ERROR_TYPES = {"GuardOnDataDependentSymNode", "DataDependentOutputException", "DynamicOutputShapeException"}
VALUE_ERROR_WORDS = re.compile(r"\bmeta\b|data-dependent|data-independent")
# What torch says when an op's output shape depends on values (a boolean-mask index goes through
# nonzero): torch's own text then advises a private config flag, which is no fix for the user.
VALUE_SHAPE_TYPES = {"DataDependentOutputException", "DynamicOutputShapeException"}
VALUE_SHAPE_WORDS = re.compile(r"nonzero|masked_select|unique|repeat_interleave|data-independent implementation")
# What torch says when `.view` needs strides its input lacks.
VIEW_STRIDES_WORDS = "view size is not compatible with input tensor's size and stride"
VALUE_SHAPE_FIX = (
    "the meta device has shapes but no values, so it cannot size such a result: put the module that makes it "
    "in LEAF_MODULES (ftc then runs that module for real to learn its output shapes), or compute densely "
    "(torch.where, gather, scatter_add, multiplying by a mask) so that shapes do not depend on values"
)


def fails_only_on_meta(exc: Exception) -> bool:
    """Whether `exc` is a failure of the meta device, as opposed to one on any device."""
    return type(exc).__name__ in VALUE_ERROR_TYPES or VALUE_ERROR_WORDS.search(str(exc).lower()) is not None


def _value_shaped(exc: Exception) -> bool:
    """Whether `exc` says an op's output shape depends on tensor values."""
    if type(exc).__name__ in VALUE_SHAPE_TYPES:
        return True
    return fails_only_on_meta(exc) and VALUE_SHAPE_WORDS.search(str(exc)) is not None


# What torch says when an operator of a library or of the model's own has no fake (meta) kernel:
# torch.library.custom_op's words, a Library op's on meta tensors, and export's fake tensors' (an
# exception whose text is the op's name, "mylib.twice.default").
_NO_FAKE_KERNEL = re.compile(
    r"no fake impl registered for <CustomOpDef\((\w+::\w+)\)>"
    r"|^(\w+::\w+): attempted to run this operator with Meta tensors, but there was no fake impl"
)


# What torch says when one of its own operators has no meta kernel, its overload named
# ("aten::_ctc_loss.Tensor").
_NO_META_KERNEL = re.compile(r"^(aten::[\w.]+): attempted to run this operator with Meta tensors")


def _torch_op_without_meta_kernel(exc: Exception) -> str | None:
    """The ATen operator that `exc` says has no meta kernel (torch.istft runs `aten::equal` on its
    window, F.ctc_loss `aten::_ctc_loss`); None for any other failure."""
    found = _NO_META_KERNEL.search(str(exc).strip())
    return found.group(1) if found else None


def missing_fake_kernel(exc: Exception) -> FtcError | None:
    """The error for a library's or the model's own operator that cannot run on the meta device
    for want of a fake kernel, which torch.library leaves to the operator's author; None for
    any other failure."""
    said = str(exc).strip()
    found = _NO_FAKE_KERNEL.search(said)
    op = next(name for name in found.groups() if name) if found else None
    if op is None and type(exc).__name__ == "UnsupportedOperatorException":
        op = library_op(f"torch.ops.{said}")
    if op is None or library_op("torch.ops." + op.replace("::", ".")) is None:
        return None
    decorator = f"@{op.partition('::')[2]}.register_fake" if "CustomOpDef" in said else f'@torch.library.register_fake("{op}")'
    return FtcError(
        f"the operator {op} has no fake kernel, which ftc needs: it runs the model on the meta device "
        "(shapes, no data) to trace and profile it",
        f"register one where the operator is defined (`{decorator}`): a function of the same arguments that "
        "returns empty tensors of the outputs' shapes and dtypes (`torch.empty_like(x)`, `x.new_empty(shape)`)",
    )


def plain_failure_fix(inputs: dict[str, Any]) -> str:
    """The fix for forward failing on example_inputs() on any device (a shape mismatch, say)."""
    shapes = ", ".join(f"{name} {list(t.shape)}" for name, t in inputs.items() if isinstance(t, torch.Tensor))
    return (
        f"forward fails with the input shapes example_inputs() gives ({shapes}) on any device, not only on the "
        "meta device: run the model on example_inputs() in plain PyTorch to see the error, and fix the model or "
        "example_inputs()"
    )


def _view_of_kernel_layout(node: Node, exc: Exception) -> bool:
    """Whether `node` is a `.view` that failed for its input's strides alone."""
    return node.op == "call_method" and node.target == "view" and VIEW_STRIDES_WORDS in str(exc)


class _Propagator(Interpreter):
    """Runs the graph on the meta device; `writes`, where given, watches the state ops write.

    With `reshape_views` (a graph torch.export traced), a `.view` that fails on the meta device
    for its input's strides runs as `.reshape`, and `reshaped` names it. Export ran the view on
    the strides the traced device's kernels give (CPU's scaled_dot_product_attention returns
    [B, H, S, D] laid out as [B, S, H, D], so the source's `.transpose(1, 2).contiguous()` was
    no copy, and export records none); other kernels (the meta device's, another backend's) lay
    it out otherwise. `.reshape` is the recorded view where the strides allow one and the
    source's copy where they do not, so the stage code computes the same on every device."""

    def __init__(self, graph: Graph, model: torch.nn.Module, writes: StateWrites | None = None,
                 saved: SavedChanges | None = None, reshape_views: bool = False):  # fmt: skip
        super().__init__(graph, model, device="meta")
        self.repeats = Repeats(model)
        self.writes = writes
        self.saved = saved
        self.reshape_views = reshape_views
        self.reshaped: set[str] = set()
        self._reshaped_keys: set = set()

    def runs_for_real(self, node: Node, real: torch.nn.Module) -> None:
        if self.writes is not None:
            self.writes.runs_as(real)

    def run_node(self, node: Node, args: tuple, kwargs: dict) -> Any:
        key = repeat_key(node, self.model, args, kwargs)
        replayed, out = self.repeats.replay(key)
        if replayed:
            if self.writes is not None:
                self.writes.replayed(node, key, args, kwargs)
            if key in self._reshaped_keys:
                self.reshaped.add(node.name)
            return out
        execute = partial(super().run_node, node, args, kwargs)
        if self.saved is not None:
            self.saved.node = node
        try:
            out = execute() if self.writes is None else self.writes.run(node, key, args, kwargs, execute)
        except FtcError:
            raise
        except Exception as exc:
            if not (self.reshape_views and _view_of_kernel_layout(node, exc)):
                self._refuse(node, exc)
            out = super().run_node(replace(node, target="reshape"), args, kwargs)
            self.reshaped.add(node.name)
            if key is not None:
                self._reshaped_keys.add(key)
        if self.saved is not None:
            self.saved.check(node, args, kwargs)
        self.repeats.record(key, node, (args, kwargs), out)
        return out

    def _refuse(self, node: Node, exc: Exception) -> None:
        """Raise the error that explains why `node` failed on the meta device."""
        where = node.source or node.module_path or "forward"
        unfakeable = missing_fake_kernel(exc)
        if unfakeable is not None:
            raise FtcError(f"node {node.name!r} ({where}): {unfakeable.message}", unfakeable.hint) from exc
        torch_op = _torch_op_without_meta_kernel(exc)
        if torch_op is not None:
            module = (f"{node.module_path} ({node.module_class}) or a module around it" if node.module_path
                      else "a module of its own")  # fmt: skip
            raise FtcError(
                f"node {node.name!r} ({where}) runs torch's {torch_op}, which has no meta kernel (torch has none for "
                "some ops, among them ops that read tensor values: torch.istft checks its window), and ftc runs the "
                "model on the meta device (shapes, no data) to trace and profile it",
                f"put that call in a LEAF_MODULES class, which ftc then runs as written: {module}, called as "
                "module(...) with tensor arguments and returning tensors",
            ) from exc
        if _value_shaped(exc):
            raise FtcError(
                f"node {node.name!r} ({where}) makes a tensor whose shape depends on tensor values "
                "(boolean-mask indexing `x[mask]`, nonzero, masked_select, unique, repeat_interleave with "
                "tensor repeats and no output_size): "
                f"{type(exc).__name__} on the meta device",
                VALUE_SHAPE_FIX,
            ) from exc
        if _view_of_kernel_layout(node, exc):
            raise FtcError(
                f"node {node.name!r} ({where}) failed on the meta device: `.view` of a tensor whose strides do not "
                "allow it there. Where forward runs in plain PyTorch, the view relies on how the kernel that "
                "made its input lays it out in memory, which differs by device and backend "
                "(scaled_dot_product_attention's output is laid out otherwise on the CPU than on the meta device)",
                "write `.reshape(...)` there (or `.contiguous().view(...)`), which gives the same values on every "
                "device and copies only where the strides call for it",
            ) from exc
        inputs = {name: self.env[name] for name in self.graph.inputs}
        raise FtcError(
            f"node {node.name!r} ({where}) failed on the meta device: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            (META_ONLY_FIX_IN.format(module=f"{node.module_path} ({node.module_class})") if node.module_path
             else META_ONLY_FIX) if fails_only_on_meta(exc) else plain_failure_fix(inputs),  # fmt: skip
        ) from exc


def annotate_meta(graph: Graph, model: torch.nn.Module, batch: tuple | dict, double_batch: tuple | dict,
                  reshape_views: bool = False) -> Graph:  # fmt: skip
    """Fill node.meta for every node, and node.updates (ftc/frontends/state_writes.py). `batch` and
    `double_batch` are meta-device example inputs at the compile batch size and at twice it. With
    `reshape_views` (export's graphs), a view that relied on a kernel's strides becomes a reshape
    (_Propagator)."""
    # One run tells the state ops write and the saved values they change: the batch size changes
    # neither.
    writes, saved = StateWrites(graph, model), SavedChanges(graph)
    single = _Propagator(graph, model, writes, saved, reshape_views)
    double = _Propagator(graph, model, reshape_views=reshape_views)
    with saved.hooks():
        single.run(batch)
    double.run(double_batch)
    reshaped = single.reshaped | double.reshaped
    nodes = [
        replace(node, meta=value_meta(single.env[node.name], double.env[node.name]),
                updates=writes.updates.get(node.name, []),
                target="reshape" if node.name in reshaped else node.target)
        for node in graph.nodes
    ]  # fmt: skip
    return replace(graph, nodes=nodes)


def value_meta(value: Any, doubled: Any) -> Meta:
    if isinstance(value, torch.Tensor):
        grown, changed = [], []
        if isinstance(doubled, torch.Tensor) and doubled.dim() == value.dim():
            grown = [dim for dim, (a, b) in enumerate(zip(value.shape, doubled.shape)) if a > 0 and b == 2 * a]
            changed = [dim for dim, (a, b) in enumerate(zip(value.shape, doubled.shape)) if a != b and dim not in grown]
        return TensorMeta(list(value.shape), dtype_name(value.dtype), bool(value.requires_grad),
                          grown[0] if grown else None, grown[1:], changed)  # fmt: skip
    if isinstance(value, (bool, int, float)) or isinstance(value, torch.SymInt):
        kind = "bool" if isinstance(value, bool) else "int" if isinstance(value, (int, torch.SymInt)) else "float"
        return ScalarMeta(kind, value, batch_dependent=value != doubled)
    if isinstance(value, (tuple, list)):
        kind = "size" if isinstance(value, torch.Size) else type(value).__name__
        if kind not in ("size", "tuple", "list"):
            kind = "tuple"
        other = doubled if isinstance(doubled, (tuple, list)) and len(doubled) == len(value) else value
        return SeqMeta(kind, [value_meta(a, b) for a, b in zip(value, other)])
    return OtherMeta(type(value).__name__)
