"""Run an IR graph against a model, node by node (the torch.fx Interpreter pattern, for our IR).

The frontends use it to propagate metadata on the meta device and the profiles to count and
time each node. Subclasses override `run_node` to observe or wrap each step.
"""

from __future__ import annotations

import builtins
import copy
import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from ftc.ir import FtcError, Graph, Node, Ref, TorchExpr, map_refs

# Names a node target may start with; the same names generated stage code imports.
TARGET_NAMESPACE = {"torch": torch, "F": F, "operator": operator, "math": math, "builtins": builtins}
# The operator namespaces torch registers itself (the dispatcher's after `import torch`, and the
# higher-order ops'); any other is a library's or the model's own (torch.library.custom_op).
TORCH_OP_NAMESPACES = frozenset(
    "_c10d_functional _c10d_functional_autograd _dtensor _native _quantized _test aten c10d debug_mode_ops"
    " debugprims export higher_order inductor inductor_prims mkl mkldnn mkldnn_prepacked onednn prims profiler"
    " quantization quantized rngprims sparse static_runtime symm_mem".split()
)


def library_op(target: str) -> str | None:
    """"mylib::scaled_tanh" for a target that calls an operator of a library or of the model's
    own ("torch.ops.mylib.scaled_tanh.default"); None for torch's operators and anything else."""
    if not target.startswith("torch.ops."):
        return None
    parts = target.removeprefix("torch.ops.").split(".")
    if len(parts) not in (2, 3) or parts[0] in TORCH_OP_NAMESPACES or not all(p.isidentifier() for p in parts):
        return None
    return f"{parts[0]}::{parts[1]}"


def resolve_function(target: str) -> Any:
    """The callable a call_function target names ("torch.cat", "F.gelu", "operator.add", "getattr")."""
    head = target.split(".", 1)[0]
    if head not in TARGET_NAMESPACE and not hasattr(builtins, head):
        raise FtcError(f"function target {target!r} is not under torch, F, operator, math or builtins")
    return eval(target, dict(TARGET_NAMESPACE), {})  # the target is a dotted name, checked above


def tensor_constant(data: Any, dtype: str, device: torch.device | str | None = None) -> torch.Tensor:
    return torch.tensor(data, dtype=getattr(torch, dtype), device=device)


def fetch_attr(model: torch.nn.Module, target: str) -> Any:
    """A parameter, buffer or plain attribute of `model` by qualified name."""
    module_path, _, attr = target.rpartition(".")
    return getattr(model.get_submodule(module_path), attr)


class Interpreter:
    def __init__(self, graph: Graph, model: torch.nn.Module, device: torch.device | str | None = None):
        self.graph = graph
        self.model = model
        self.device = device
        self.functions: dict[str, Any] = {}  # call_function target -> callable
        self.objects: dict[str, Any] = {}  # TorchExpr -> torch object
        self.env: dict[str, Any] = {}

    def run(self, inputs: tuple | dict) -> Any:
        """Run the graph on one batch (positional tuple or keyword dict); return the output."""
        names = self.graph.inputs
        if isinstance(inputs, dict):
            missing = [name for name in names if name not in inputs]
            if missing:
                raise FtcError(f"inputs lack {missing}; the graph takes {names}")
            values = [inputs[name] for name in names]
        else:
            if len(inputs) != len(names):
                raise FtcError(f"{len(inputs)} inputs given; the graph takes {len(names)}: {names}")
            values = list(inputs)
        self.env = dict(zip(names, values))
        for node in self.graph.nodes:
            if node.op == "input":
                continue
            read = lambda ref: self.lookup(ref, node)  # noqa: E731
            self.env[node.name] = self.run_node(node, map_refs(node.args, read), map_refs(node.kwargs, read))
        outputs = [self.env[ref.name] for ref in self.graph.outputs.values]
        if self.graph.outputs.kind == "value":
            return outputs[0]
        if self.graph.outputs.kind == "dict":
            return dict(zip(self.graph.outputs.keys, outputs))
        return outputs if self.graph.outputs.kind == "list" else tuple(outputs)

    def lookup(self, ref: Ref, reader: Node) -> Any:
        """The value `reader` gets for `ref`."""
        return self.env[ref.name]

    def run_node(self, node: Node, args: tuple, kwargs: dict) -> Any:
        return self.execute(node, args, kwargs)

    def execute(self, node: Node, args: tuple, kwargs: dict) -> Any:
        if not node.grad_enabled:
            with torch.no_grad():
                return self._execute(node, args, kwargs)
        return self._execute(node, args, kwargs)

    def _execute(self, node: Node, args: tuple, kwargs: dict) -> Any:
        args = tuple(self.torch_objects(arg) for arg in args)
        kwargs = {key: self.torch_objects(value) for key, value in kwargs.items()}
        if node.op == "get_attr":
            if node.target in self.graph.constants:
                constant = self.graph.constants[node.target]
                return tensor_constant(constant.data, constant.dtype, self.device)
            return fetch_attr(self.model, node.target)
        if node.op == "call_module":
            module = self.model.get_submodule(node.target)
            try:
                return module(*args, **kwargs)
            except Exception:
                if self.device != "meta":
                    raise
                real = cpu_copy(module)
                self.runs_for_real(node, real)
                valueless = [name for name, buffer in module.named_buffers() if buffer.is_meta and not buffer.is_floating_point()]
                return run_on_cpu(real, args, kwargs, f"{node.target} ({type(module).__name__})", valueless)
        if node.op == "call_method":
            receiver, *rest = args
            return getattr(receiver, node.target)(*rest, **kwargs)
        if node.op == "call_function":
            fn = self.functions.get(node.target)
            if fn is None:
                fn = self.functions[node.target] = resolve_function(node.target)
            result = fn(*args, **kwargs)
            if node.target == "operator.setitem" and isinstance(args[0], torch.Tensor):
                return args[0]  # `x[mask] = 0.0` (export's index_put_): the value is x, written
            return result
        raise FtcError(f"IR node {node.name!r}: cannot run op {node.op!r}")

    def runs_for_real(self, node: Node, real: torch.nn.Module) -> None:
        """Called before a meta-device module runs as `real`, its CPU copy (run_on_cpu): for
        interpreters that watch what it does."""

    def torch_objects(self, arg: Any) -> Any:
        """Turn TorchExpr placeholders (dtypes, devices, ...) back into torch objects."""
        if isinstance(arg, TorchExpr):
            if arg.expr == "device":  # the device the stage runs on
                return torch.device(self.device or "cpu")
            if arg.expr == "self.training":  # the stage's mode: the model's, when run whole
                return self.model.training
            if "self.training" in arg.expr:  # an expression of the mode (ftc/frontends/aten.py)
                return eval(arg.expr, dict(TARGET_NAMESPACE), {"self": self.model})
            if arg.expr not in self.objects:  # written by a frontend from a torch object
                self.objects[arg.expr] = eval(arg.expr, dict(TARGET_NAMESPACE), {})
            return self.objects[arg.expr]
        if isinstance(arg, (tuple, list)):
            return type(arg)(self.torch_objects(item) for item in arg)
        if isinstance(arg, dict):
            return {key: self.torch_objects(value) for key, value in arg.items()}
        if isinstance(arg, slice):
            return slice(*(self.torch_objects(part) for part in (arg.start, arg.stop, arg.step)))
        return arg


def copy_module(module: torch.nn.Module) -> torch.nn.Module:
    """copy.deepcopy of a module, also where it holds a tensor computed from a parameter as a
    plain attribute (torch.nn.utils.prune's `weight`, which its forward pre-hook recomputes),
    which deepcopy refuses: such a tensor is copied detached."""
    memo = {}
    for submodule in module.modules():
        for value in vars(submodule).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(module, memo)


def cpu_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A CPU copy of a meta-device module with random weights (buffers 1, integer ones 0; a buffer
    that holds values, not on the meta device, keeps them), for run_on_cpu. One module is
    materialized at a time, so this works for models of any size whose single leaf modules fit in
    memory."""
    copied = copy_module(module)
    known = {name: buffer for name, buffer in copied.named_buffers() if not buffer.is_meta}
    real = copied.to_empty(device="cpu")
    with torch.no_grad():
        for param in real.parameters():
            param.normal_(0.0, 0.02)
        for name, buffer in real.named_buffers():
            if name in known:
                buffer.copy_(known[name])
            else:
                buffer.fill_(1 if buffer.is_floating_point() else 0)
    return real


def run_on_cpu(real: torch.nn.Module, args: tuple, kwargs: dict, name: str, valueless: list[str]) -> Any:
    """Run `real`, the cpu_copy of a meta-device module, on inputs of the right shapes; return
    its outputs as meta tensors. `valueless`: the module's integer buffers that had no values to
    copy (0 in `real`), named if it fails.

    For modules whose Python reads tensor values (`if x.sum() > 0:`), which LEAF_MODULES may
    hold: the meta device knows shapes only. Integer inputs are all 0 (a valid index into any
    dimension) and, where the module refuses that, all 1 (sequence lengths and counts must be
    positive: pack_padded_sequence refuses a length of 0)."""

    def stand_in(integer: int) -> Any:
        def materialize(value: Any) -> Any:
            if not isinstance(value, torch.Tensor) or value.device.type != "meta":
                return value
            if value.is_floating_point():
                return torch.randn(value.shape, dtype=value.dtype).requires_grad_(value.requires_grad)
            return torch.full(value.shape, integer, dtype=value.dtype)

        return materialize

    def to_meta(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        return value.detach().to("meta").requires_grad_(value.requires_grad)

    failure = None
    for integer in (0, 1):
        try:
            return tree_map(to_meta, real(*tree_map(stand_in(integer), args), **tree_map(stand_in(integer), kwargs)))
        except Exception as exc:
            failure = exc
    if type(real).__module__.startswith("torch.nn."):  # a torch layer reads shapes, not values: its error stands
        raise failure
    # transformers' Encodec and Mimi convolutions pad by 0-d int64 buffers (`padding_total`,
    # `stride`): built on the meta device, they hold no values unless the frontend gave them theirs
    # (frontends._leaf_sizes), and the stand-in 0 breaks the pad.
    buffers = ""
    if valueless:
        shown = ", ".join(valueless[:4]) + (f" and {len(valueless) - 4} more" if len(valueless) > 4 else "")
        buffers = (f"; its integer buffers ({shown}) are 0 in that copy, as the model is built on the meta device, "
                   "which keeps no values: where forward computes sizes from them, no tracer can follow it")  # fmt: skip
    raise FtcError(
        f"module {name} cannot run on the meta device, and run on the CPU, as ftc then runs it, it fails: "
        f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}{buffers}",
        "the meta device knows shapes only, so ftc learns this module's output shapes by running it with random "
        "weights and stand-in inputs of the right shapes (random floats; integers all 0, then all 1), not "
        "example_inputs()'s values: make its forward accept such inputs (or, if it fails on example_inputs() "
        "too, fix it there first)"
        + ("; compute sizes from Python ints (module attributes) rather than buffers" if valueless else ""),
    ) from failure
