"""The pipeline IR: a model's dataflow graph with tensor metadata, costs and stage assignment.

A Graph is a list of Nodes in program order (the order the model's forward ran them), which is
a topological order that also keeps in-place mutations in their original place. Each node
produces one value, named after the node. Arguments refer to other values through `Ref`.

Node ops:
  input          a model input (positional parameter of forward, or dict key)
  get_attr       a parameter, buffer or tensor attribute of the model by qualified name, or a
                 small tensor literal created inside forward (a key of `Graph.constants`)
  call_module    a leaf module called by qualified name
  call_function  a function, by the Python expression that names it ("torch.cat", "F.gelu", ...)
  call_method    a method called on the first argument ("view", "transpose", ...)

The IR imports nothing of ours and not torch: dtypes and other torch objects appear as
`TorchExpr`, the Python expression that produces them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Union

FORMAT = "ftc-ir/1"

OPS = ("input", "get_attr", "call_module", "call_function", "call_method")
COMPUTE_OPS = ("call_module", "call_function", "call_method")

DTYPE_BYTES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1,
    "complex128": 16, "complex64": 8,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}  # fmt: skip


@dataclass(frozen=True)
class Ref:
    """A reference to the value a node produces."""

    name: str


@dataclass(frozen=True)
class TorchExpr:
    """A torch object kept as the Python expression that produces it, e.g. "torch.float32"."""

    expr: str


Arg = Any  # None | bool | int | float | str | Ref | TorchExpr | slice | Ellipsis | tuple | list | dict


@dataclass
class TensorMeta:
    shape: list[int]
    dtype: str
    requires_grad: bool = False
    # The dimension that grows with the batch size (size = shape[batch_dim] / batch_size per
    # sample); None when the tensor does not depend on the batch size. Micro-batches are slices
    # along it.
    batch_dim: int | None = None
    # Further dimensions that grow with the batch, as the second of in-batch logits `a @ b.T`
    # ([B, B]): a micro-batch's value compares its own samples only, so these shrink with it too.
    other_batch_dims: list[int] = field(default_factory=list)
    # Dimensions that change with the batch size but not in proportion to it, as a buffer's slice
    # `queue[:-B]` ([32 - B, D]): no micro-batch size tells their size, so no stage receives them.
    unbatched_dims: list[int] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES.get(self.dtype, 4)

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith(("float", "bfloat", "complex"))


@dataclass
class ScalarMeta:
    """A Python number or bool; `value` is what it was at the compile batch size."""

    type: str  # "int" | "float" | "bool"
    value: int | float | bool
    batch_dependent: bool = False


@dataclass
class SeqMeta:
    """A tuple, list or torch.Size of values."""

    type: str  # "tuple" | "list" | "size"
    items: list[Meta]


@dataclass
class OtherMeta:
    """None, or a Python object the IR does not look into (its type name)."""

    type: str


Meta = Union[TensorMeta, ScalarMeta, SeqMeta, OtherMeta]


def meta_tensors(meta: Meta | None) -> list[TensorMeta]:
    """Every tensor inside a value's metadata, in order."""
    if isinstance(meta, TensorMeta):
        return [meta]
    if isinstance(meta, SeqMeta):
        return [t for item in meta.items for t in meta_tensors(item)]
    return []


def meta_nbytes(meta: Meta | None) -> int:
    return sum(t.nbytes for t in meta_tensors(meta))


@dataclass
class Cost:
    """What a node costs. FLOPs and bytes are analytic; times and memory are filled by a profile.

    bwd_flops: FLOPs of this node's backward (gradients of its floating inputs and parameters).
    param_bytes: bytes of the parameters and buffers this node reads (its module's, or the one
      it fetches); a stage's total counts each tensor once.
    fwd_time / bwd_time: seconds, predicted from the analytic model or measured.
    peak_memory: bytes of the storages this node's forward saves for backward (each storage
      counted for the first node that saves it); None: not profiled, take every output as saved.
    transient_memory: bytes of the storages this node's forward makes that nothing saves for
      backward; a stage's forward keeps them until it returns (stage code keeps every value it
      names until then). None: not profiled.
    """

    fwd_flops: int = 0
    bwd_flops: int = 0
    param_bytes: int = 0
    fwd_time: float = 0.0
    bwd_time: float = 0.0
    peak_memory: int | None = None
    transient_memory: int | None = None


@dataclass
class Node:
    name: str
    op: str
    target: str
    args: tuple = ()
    kwargs: dict[str, Arg] = field(default_factory=dict)
    # Qualified name of the module whose forward ran this node ("" for the root) and its class.
    module_path: str = ""
    module_class: str = ""
    # Where the model's source made this node, "file.py:line", when the frontend knows it: the
    # file by its path in the model file's folder, or, for a library's code (the files of the
    # model's module classes), below its sys.path entry ("transformers/models/gpt2/
    # modeling_gpt2.py:187"); never an absolute path, so ir.json is the same on every machine.
    source: str = ""
    # The lines of the model's code that called, frame by frame, the function `source` is in,
    # outermost first, named as `source` is: an op of GPT's Block.forward carries
    # ["gpt.py:73"], the `x = block(x)` that called it; the naming pass names a value a
    # function returns after the caller's variable.
    callers: list[str] = field(default_factory=list)
    # The argument this node mutates in place (its index in args), or None.
    mutates: int | None = None
    # Parameters and buffers (their first names, tied aliases resolved) the op writes in place
    # where no argument says so: a leaf BatchNorm's running statistics, an Embedding's max_norm.
    updates: list[str] = field(default_factory=list)
    # What the value is called in the model's source (or after the op that made it), without
    # the suffix that makes `name` unique model-wide; stage code names local values after it.
    label: str = ""
    # False where the model ran this op under torch.no_grad(); stage code does the same.
    grad_enabled: bool = True
    meta: Meta | None = None
    cost: Cost = field(default_factory=Cost)
    stage: int | None = None

    @property
    def is_compute(self) -> bool:
        return self.op in COMPUTE_OPS

    def refs(self) -> list[str]:
        """Names of the values this node reads, in argument order, each once."""
        seen: dict[str, None] = {}
        for arg in (*self.args, *self.kwargs.values()):
            for name in arg_refs(arg):
                seen.setdefault(name, None)
        return list(seen)


def unique_name(base: str, taken: set[str]) -> str:
    """`base`, or `base_1`, `base_2`, ... whichever is not in `taken`; the result is added to it.
    An in-place op's name keeps one underscore: `add_`, `add_1`."""
    stem = base[:-1] if base.endswith("_") and not base.endswith("__") else base
    name, k = base, 1
    while name in taken:
        name = f"{stem}_{k}"
        k += 1
    taken.add(name)
    return name


def arg_refs(arg: Arg) -> list[str]:
    if isinstance(arg, Ref):
        return [arg.name]
    if isinstance(arg, (tuple, list)):
        return [name for item in arg for name in arg_refs(item)]
    if isinstance(arg, dict):
        return [name for item in arg.values() for name in arg_refs(item)]
    if isinstance(arg, slice):
        return arg_refs((arg.start, arg.stop, arg.step))
    return []


def map_refs(arg: Arg, fn) -> Arg:
    """Rebuild an argument with every Ref replaced by fn(ref)."""
    if isinstance(arg, Ref):
        return fn(arg)
    if isinstance(arg, tuple):
        return tuple(map_refs(item, fn) for item in arg)
    if isinstance(arg, list):
        return [map_refs(item, fn) for item in arg]
    if isinstance(arg, dict):
        return {key: map_refs(item, fn) for key, item in arg.items()}
    if isinstance(arg, slice):
        return slice(*(map_refs(part, fn) for part in (arg.start, arg.stop, arg.step)))
    return arg


@dataclass
class StateTensor:
    """A parameter or buffer of the original model (used in forward or not)."""

    kind: str  # "parameter" | "buffer"
    meta: TensorMeta
    persistent: bool = True  # buffers only: whether it is in state_dict()
    # A tied alias (`head.weight = embed.weight`): the first name the same tensor has in
    # named_parameters / named_buffers order, whose value this name always equals; else None.
    alias_of: str | None = None


@dataclass
class Constant:
    """A tensor literal created inside forward, small enough to write into the stage code."""

    data: Any  # nested lists of numbers
    dtype: str


@dataclass
class Outputs:
    """The structure of the model's output: one tensor, a tuple or list of them, or a dict of them."""

    kind: str  # "value" | "tuple" | "list" | "dict"
    values: list[Ref]
    keys: list[str] = field(default_factory=list)  # for kind == "dict"


@dataclass
class Graph:
    name: str
    nodes: list[Node]
    outputs: Outputs
    state: dict[str, StateTensor] = field(default_factory=dict)
    # Qualified module name -> class ("torch.nn.Linear", "gpt.Block"); "" is the root.
    modules: dict[str, str] = field(default_factory=dict)
    constants: dict[str, Constant] = field(default_factory=dict)
    frontend: str = "fx"
    batch_size: int = 1
    num_stages: int = 0
    # The device (rank) each stage runs on; several stages may share one.
    stage_devices: list[int] = field(default_factory=list)
    # Costs a profile fills beside the nodes' (fwd_time/bwd_time, FLOPs where counted): what
    # calling one stage costs beyond its nodes (its forward call, its backward's engine start),
    # paid by every stage; and the training loss, loss_fn on the model's outputs, which the
    # runtime computes on the device of the stage that holds them (None: no loss profiled).
    stage_cost: Cost = field(default_factory=Cost)
    loss_cost: Cost | None = None
    # Op kind (Graph.kind) -> what a stage pays once for holding any op of that kind, beyond
    # the ops' own costs: a stage that a device runs between other work finds the code and data
    # of its first op of each kind out of the caches, where in the whole model a later op of the
    # kind finds them warm. Measured profiles fill it; empty: no such cost.
    kind_costs: dict[str, Cost] = field(default_factory=dict)
    # Model-file places ('gpt.py:42') that branch on `self.training` (`if self.training:`):
    # the graph keeps the branch the traced (training) mode took, whatever mode a stage runs in.
    training_branches: list[str] = field(default_factory=list)
    # The batch sizes forward works for, lowest and highest, where something bounds them (a
    # MoCo queue sliced by the batch, `self.queue[:-B]`, needs B <= its length); None: any.
    batch_range: tuple[int, int] | None = None
    # What the frontend changed or chose that a reader of the stage code should know, one line
    # each: why --frontend auto used export (fx's error), checkpoint calls traced as plain calls.
    trace_notes: list[str] = field(default_factory=list)

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def by_name(self) -> dict[str, Node]:
        return {node.name: node for node in self.nodes}

    def renamed(self, renames: dict[str, str]) -> Graph:
        """The graph with the values in `renames` (old name -> new) renamed where they are made
        and wherever they are read."""

        def rename(ref: Ref) -> Ref:
            return Ref(renames.get(ref.name, ref.name))

        nodes = [
            replace(node, name=renames.get(node.name, node.name), args=map_refs(node.args, rename),
                    kwargs=map_refs(node.kwargs, rename))
            for node in self.nodes
        ]  # fmt: skip
        outputs = replace(self.outputs, values=[rename(ref) for ref in self.outputs.values])
        return replace(self, nodes=nodes, outputs=outputs)

    def canonical(self, state: str) -> str:
        """The first name of a tied parameter or buffer, the one its aliases point to (any other
        name as it is)."""
        held = self.state.get(state)
        return held.alias_of or state if held is not None else state

    def kind(self, node: Node) -> str:
        """What runs a compute node's code: the class of the module it calls, or its op and
        target ("call_function:F.relu", "call_method:view")."""
        if node.op == "call_module":
            return self.modules.get(node.target, node.target)
        return f"{node.op}:{node.target}"

    @property
    def inputs(self) -> list[str]:
        return [node.name for node in self.nodes if node.op == "input"]

    def users(self) -> dict[str, list[str]]:
        """Value name -> names of the nodes that read it, in program order."""
        users: dict[str, list[str]] = {node.name: [] for node in self.nodes}
        for node in self.nodes:
            for name in node.refs():
                users.setdefault(name, []).append(node.name)
        return users

    def stage_nodes(self, stage: int) -> list[Node]:
        return [node for node in self.nodes if node.stage == stage]
