"""Exact rewrites of export's lowered ops into the shorter code a person writes.

torch.export records every step: `x[:, None, None, None]` is three unsqueezes, `x[None, :, :4]`
an unsqueeze and a slice, a mask helper's `.to(result.device)` a `to` of a tensor that is
already there, `torch.arange(n) + 0` an addition of nothing. Lowered one op per statement, such
code is several times longer than the source it came from (a Hugging Face causal mask took 35
lines). Each rewrite here computes exactly what the ops it replaces computed (the same values,
views of the same memory where they were views, the same gradients), whatever the sizes:

- a chain of unsqueezes, slices and integer selections, each read only by the next, is one
  basic index (`x[:, None, :4]`), which makes the same view;
- `x.to(dtype=torch.bool, device=device)` of a bool tensor on the stage's device is x (Tensor.to
  returns the tensor itself when nothing changes), and so is any `x.to(device, dtype=...)` of a
  tensor of that dtype there;
- `t.detach_()` of a tensor a torch.tensor call just made and nothing else reads is t (it has no
  gradient history to cut);
- `t + 0`, for an integer tensor t that an arange just made and nothing else reads, is t;
- `x + 0` and `x * 1` (a loop's sum started at Python's 0: `skips = 0` then `skips = skips + s`),
  where the result has x's dtype, shape and strides, is x, where no op from there on writes a
  tensor in place: the addition made a new tensor, and only an in-place write to x, to the
  result or to a view of either could tell the two apart. Under no_grad the result has no
  gradient history where x may have one, so an op there stays. The one value that differs is
  a float zero's sign (`-0.0 + 0` is `0.0`), which compares equal;
- `True & m` and `False | m` (a 0-dim bool made for it, as mask helpers start their loops), for
  a bool m that a comparison just made and nothing else reads, is m;
- a second unsqueeze, expand or basic index equal to an earlier one (the same op on the same
  values) is the earlier one, and so is a second equal arange where nothing mutates a tensor
  in place after the first;
- `v = x[:, 0]; v.fill_(2)` and `v = x[:, 1:]; v.copy_(y)`, where nothing else reads the view
  or what the write returns, are `x[:, 0] = 2` and `x[:, 1:] = y`, as the model wrote them
  (Python's index assignment is that copy into that view: the same values and gradients).

- `c = self.const_0.clone(); t = c.detach_()`, where each step is all that reads the one before,
  is `t = torch.tensor([0.5, 1.0], device=device)`, as the model wrote it: export records
  `torch.tensor(...)` of Python numbers as a fresh copy of a lifted constant, detached (a new tensor
  with the same values and dtype, which nothing's gradient reaches), and the constant is dropped
  where nothing else reads it. The dtype is written where torch.tensor would not infer it.

`values` gives the traced value (a FakeTensor, or a Python or symbolic number) of each node the
lowering made from one ATen op, by the node's name; a node without one is left as it is.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq

from ftc.ir import Constant, Node, Ref, TorchExpr, map_refs

STAGE_DEVICE = TorchExpr("device")
# The device export traces on, which the stage's device stands for (export.TRACE_DEVICE).
TRACE_DEVICE_TYPE = "cpu"
COMPARISONS = {f"operator.{name}" for name in ("eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor")}
# Ops that compute the same result from the same arguments and write nothing.
REPEATABLE = {("call_function", "torch.arange"), ("call_method", "unsqueeze"), ("call_method", "expand"),
              ("call_function", "operator.getitem")}  # fmt: skip


def tidy(
    nodes: list[Node], outputs: list[Ref], values: dict[str, Any], constants: dict[str, Constant]
) -> tuple[list[Node], list[Ref]]:
    """The nodes with the rewrites above made, and the outputs renamed where a value became
    another; `constants` loses those that became torch.tensor calls."""
    state = _Tidy(nodes, outputs, values)
    state.write_literals(constants)
    state.merge_index_chains()
    state.assign_views()
    state.drop_no_ops()
    state.merge_repeats()
    return state.nodes, state.outputs


class _Tidy:
    """The nodes being rewritten, with an index of each value's node and of its readers kept up to
    date by every edit: a rewrite looks up and changes what it touches only, so a model of many
    thousand ops (a recurrence unrolled over a long sequence) tidies in time linear in its size."""

    def __init__(self, nodes: list[Node], outputs: list[Ref], values: dict[str, Any]):
        self.nodes = list(nodes)
        self.outputs = list(outputs)
        self.values = values
        self.by_name = {node.name: node for node in self.nodes}
        # value name -> its readers, by id, in the order they were found
        self.readers: dict[str, dict[int, Node]] = {node.name: {} for node in self.nodes}
        for node in self.nodes:
            for name in node.refs():
                self.readers.setdefault(name, {})[id(node)] = node
        self.removed: set[int] = set()  # ids of the nodes edits took out, until `compact`

    # -- bookkeeping ---------------------------------------------------------------------

    def live(self) -> list[Node]:
        """The nodes in program order, as a list edits may not disturb."""
        self.compact()
        return list(self.nodes)

    def compact(self) -> None:
        if self.removed:
            self.nodes = [node for node in self.nodes if id(node) not in self.removed]
            self.removed.clear()

    def only_reader(self, name: str, reader: Node) -> bool:
        """Whether `reader` is all that reads value `name`: no other node, no output."""
        found = self.readers.get(name, {})
        return len(found) == 1 and id(reader) in found and all(o.name != name for o in self.outputs)

    def set_args(self, node: Node, args: tuple, kwargs: dict) -> None:
        for name in node.refs():
            self.readers.get(name, {}).pop(id(node), None)
        node.args, node.kwargs = args, kwargs
        for name in node.refs():
            self.readers.setdefault(name, {})[id(node)] = node

    def remove(self, node: Node) -> None:
        """Takes out `node`, which nothing reads any more."""
        self.set_args(node, (), {})
        self.readers.pop(node.name, None)
        del self.by_name[node.name]
        self.removed.add(id(node))

    def redirect(self, old: str, new: str) -> None:
        """Every read of value `old` (its readers' and the outputs') reads `new`."""
        swap = lambda ref: Ref(new) if ref.name == old else ref  # noqa: E731
        moved = self.readers.pop(old, {})
        for reader in moved.values():
            reader.args, reader.kwargs = map_refs(reader.args, swap), map_refs(reader.kwargs, swap)
        self.readers.setdefault(new, {}).update(moved)
        self.readers[old] = {}
        self.outputs = [swap(ref) for ref in self.outputs]

    def replace(self, old: str, new: str) -> None:
        """Every read of value `old` reads `new`; the node `old` goes."""
        self.redirect(old, new)
        self.remove(self.by_name[old])

    def rename(self, node: Node, name: str) -> None:
        """`node`'s value is called `name`, which no live node has, from here on."""
        old = node.name
        del self.by_name[old]
        node.name = name
        self.by_name[name] = node
        self.readers.setdefault(name, {})
        self.redirect(old, name)
        del self.readers[old]

    def tensor(self, arg: Any) -> torch.Tensor | None:
        value = self.values.get(arg.name) if isinstance(arg, Ref) else None
        return value if isinstance(value, torch.Tensor) else None

    def made_by(self, arg: Any) -> Node | None:
        return self.by_name.get(arg.name) if isinstance(arg, Ref) else None

    # -- tensors made from Python numbers ------------------------------------------------

    def write_literals(self, constants: dict[str, Constant]) -> None:
        """`self.const_0.clone().detach_()` -> `torch.tensor([...], device=device)`."""
        reads_of_constant: dict[str, int] = {}
        for node in self.nodes:
            if node.op == "get_attr":
                reads_of_constant[node.target] = reads_of_constant.get(node.target, 0) + 1
        for detach in self.live():
            if (detach.op, detach.target, detach.kwargs) != ("call_method", "detach_", {}) or len(detach.args) != 1:
                continue
            clone = self.made_by(detach.args[0])
            if clone is None or (clone.op, clone.target, clone.kwargs) != ("call_method", "clone", {}) \
                    or len(clone.args) != 1 or not self.only_reader(clone.name, detach):  # fmt: skip
                continue
            source = self.made_by(clone.args[0])
            if source is None or source.op != "get_attr" or source.target not in constants \
                    or not self.only_reader(source.name, clone):  # fmt: skip
                continue
            constant = constants[source.target]
            if not all(math.isfinite(number) for number in _numbers(constant.data)):
                continue  # inf and nan have no literal; the buffer keeps them
            dtype = getattr(torch, constant.dtype)
            kwargs = {} if torch.tensor(constant.data).dtype == dtype else {"dtype": TorchExpr(f"torch.{constant.dtype}")}
            detach.op, detach.target = "call_function", "torch.tensor"
            self.set_args(detach, (constant.data,), {**kwargs, "device": STAGE_DEVICE})
            detach.mutates = None
            if detach.label in ("", "detach_"):
                detach.label = "tensor"  # where the model names no variable, after the call, not export's op
            self.remove(clone)
            self.remove(source)
            reads_of_constant[source.target] -= 1
            if not reads_of_constant[source.target]:
                del constants[source.target]
        self.compact()

    # -- index chains --------------------------------------------------------------------

    def basic_index(self, node: Node) -> tuple[Ref, list] | None:
        """(the tensor, the index as one item per dimension of it plus the Nones) of an
        unsqueeze or a basic index (slices, integers, None) of a tensor whose rank is known."""
        if node.kwargs or len(node.args) != 2 or not isinstance(node.args[0], Ref):
            return None
        source, rank = node.args[0], getattr(self.tensor(node.args[0]), "ndim", None)
        if rank is None or not self.unchanged(node):
            return None
        if node.op == "call_method" and node.target == "unsqueeze" and isinstance(node.args[1], int):
            dim = node.args[1] + rank + 1 if node.args[1] < 0 else node.args[1]
            if not 0 <= dim <= rank:
                return None
            return source, [slice(None)] * dim + [None] + [slice(None)] * (rank - dim)
        if node.op == "call_function" and node.target == "operator.getitem":
            items = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            if not all(self.basic_item(item) for item in items) or sum(item is Ellipsis for item in items) > 1 or not items:
                return None
            taken = sum(item is not None and item is not Ellipsis for item in items)
            if taken > rank:
                return None
            rest = [slice(None)] * (rank - taken)
            at = next((k for k, item in enumerate(items) if item is Ellipsis), None)
            if at is None:
                return source, [*items, *rest]
            return source, [*items[:at], *rest, *items[at + 1 :]]
        return None

    def basic_item(self, item: Any) -> bool:
        """A slice, an integer (or a traced size), None or `...`: what basic indexing takes."""
        if item is None or item is Ellipsis or (isinstance(item, int) and not isinstance(item, bool)):
            return True
        if isinstance(item, Ref):
            return isinstance(self.values.get(item.name), (int, torch.SymInt))
        if isinstance(item, slice):
            return all(part is None or self.basic_item(part) and part is not Ellipsis
                       for part in (item.start, item.stop, item.step))  # fmt: skip
        return False

    def unchanged(self, node: Node) -> bool:
        return node.mutates is None and not node.updates

    def merge_index_chains(self) -> None:
        """`x.unsqueeze(1).unsqueeze(2)` -> `x[:, None, None]`, `x.unsqueeze(0)[:, :, :4]` ->
        `x[None, :, :4]`: each step read only by the next. In program order, each node as far
        back as its chain goes; again until a pass merges nothing."""
        changed = True
        while changed:
            changed = False
            for node in self.live():
                while id(node) not in self.removed and self.merge_into_source(node):
                    changed = True
        self.compact()

    def merge_into_source(self, node: Node) -> bool:
        """Makes `node` one basic index with the basic index it indexes, if that is all it is read
        by; the value is named as the chain's first step was (`unsqueeze` for three)."""
        outer = self.basic_index(node)
        inner_node = self.made_by(outer[0]) if outer else None
        inner = self.basic_index(inner_node) if inner_node is not None else None
        if inner is None or not self.only_reader(inner_node.name, node):
            return False
        if inner_node.grad_enabled != node.grad_enabled:
            return False
        items = _compose(inner[1], outer[1])
        if items is None:
            return False
        while len(items) > 1 and items[-1] == slice(None) and items[-2] is not None:
            items.pop()  # `x[:, :4]`, not `x[:, :4, :, :]`; but `x[None, None, :]` shows where x goes
        node.op, node.target = "call_function", "operator.getitem"
        self.set_args(node, (inner[0], items[0] if len(items) == 1 else tuple(items)), {})
        first, renamed = inner_node.name, node.name
        self.remove(inner_node)
        self.rename(node, first)
        node.label = inner_node.label or re.sub(r"_\d+$", "", first)
        self.values[first] = self.values.get(renamed)
        return True

    # -- index assignments ---------------------------------------------------------------

    def assign_views(self) -> None:
        """`v = x[index]; v.fill_(value)` (or `v.copy_(value)`) -> `x[index] = value`, where
        the write is all that reads the view and nothing reads what it returns."""
        outputs = {ref.name for ref in self.outputs}
        for view in self.live():
            indexed = self.basic_index(view) if view.target == "operator.getitem" else None
            written = self.readers.get(view.name, {})
            if indexed is None or len(written) != 1 or view.name in outputs:
                continue
            (write,) = written.values()
            if write.op != "call_method" or write.target not in ("fill_", "copy_") or write.kwargs \
                    or len(write.args) != 2 or write.args[0] != Ref(view.name) or write.mutates != 0 \
                    or write.updates or self.readers.get(write.name) or write.name in outputs \
                    or write.grad_enabled != view.grad_enabled:  # fmt: skip
                continue
            write.op, write.target = "call_function", "operator.setitem"
            self.set_args(write, (view.args[0], view.args[1], write.args[1]), {})
            self.values[write.name] = self.values.get(view.args[0].name)  # x[index] = value is x
            self.remove(view)
        self.compact()

    # -- values that are their input -----------------------------------------------------

    def drop_no_ops(self) -> None:
        """In program order; again until a pass drops nothing."""
        changed = True
        while changed:
            changed = False
            nodes = self.live()
            # a rewrite here only ever drops writes, so a pass may keep this for its length
            last_write = max((k for k, node in enumerate(nodes) if not self.unchanged(node)), default=-1)
            for k, node in enumerate(nodes):
                if id(node) in self.removed:
                    continue
                if self.fold_detach(node):
                    changed = True
                    continue
                if k > last_write and self.is_identity_arithmetic(node):
                    self.replace(node.name, node.args[0].name)
                    changed = True
                    continue
                found = self.no_op_of(node)
                if found is not None:
                    kept, made_for_it = found
                    self.replace(node.name, kept)
                    for made in made_for_it:
                        self.remove(made)
                    changed = True
        self.compact()

    def fold_detach(self, node: Node) -> bool:
        """`t = torch.tensor(n, ...); count = t.detach_()` -> `count = torch.tensor(n, ...)`, the
        value named as the model named it."""
        if (node.op, node.target, node.kwargs, len(node.args)) != ("call_method", "detach_", {}, 1):
            return False
        made = self.made_by(node.args[0])
        if made is None or (made.op, made.target) != ("call_function", "torch.tensor") \
                or not self.only_reader(made.name, node):  # fmt: skip
            return False
        node.op, node.target, node.mutates = made.op, made.target, None
        self.set_args(node, made.args, made.kwargs)
        self.values[node.name] = self.values.get(made.name)
        self.remove(made)
        return True

    def is_identity_arithmetic(self, node: Node) -> bool:
        """Whether `node` is `x + 0` or `x * 1` with a result of x's dtype, shape and strides,
        made with gradients enabled (the caller sees that nothing writes in place after it)."""
        identity = {"operator.add": 0, "operator.mul": 1}.get(node.target)
        if node.op != "call_function" or identity is None or node.kwargs or len(node.args) != 2:
            return False
        literal = node.args[1]
        if type(literal) not in (int, float) or literal != identity:
            return False
        if not node.grad_enabled or not self.unchanged(node):
            return False
        x, result = self.tensor(node.args[0]), self.values.get(node.name)
        if x is None or not isinstance(result, torch.Tensor) or x.dtype != result.dtype:
            return False
        same = sym_eq((*x.shape, *x.stride()), (*result.shape, *result.stride()))
        return statically_known_true(same)

    def no_op_of(self, node: Node) -> tuple[str, list[Node]] | None:
        """The value `node` computes when it is one of its inputs, as the module doc says, and
        the nodes made only for `node` that go with it."""
        if not self.unchanged(node) or not node.args or not isinstance(node.args[0], Ref):
            return None
        x = self.tensor(node.args[0])
        # x.to(dtype=x.dtype, device=device) of a tensor on the stage's device
        if node.op == "call_method" and node.target == "to" and node.args[1:] in ((), (STAGE_DEVICE,)) and x is not None:
            wanted = {"dtype": TorchExpr(str(x.dtype)), "device": STAGE_DEVICE}
            if set(node.kwargs) <= set(wanted) and all(node.kwargs[k] == wanted[k] for k in node.kwargs) \
                    and x.device.type == TRACE_DEVICE_TYPE:  # fmt: skip
                return node.args[0].name, []
            return None

        if node.op != "call_function" or node.kwargs or len(node.args) != 2:
            return None
        # t + 0 of an integer tensor an arange just made
        if node.target == "operator.add" and node.args[1] == 0 and type(node.args[1]) is int and x is not None:
            made = self.made_by(node.args[0])
            if made is not None and (made.op, made.target) == ("call_function", "torch.arange") \
                    and not x.dtype.is_floating_point and not x.is_complex() and x.dtype != torch.bool \
                    and self.only_reader(made.name, node):  # fmt: skip
                return made.name, []
            return None
        # True & m, False | m of a bool m a comparison just made
        for constant, other in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            fill = {"operator.and_": "new_ones", "operator.or_": "new_zeros"}.get(node.target)
            made, m = self.made_by(constant), self.made_by(other)
            if fill is None or made is None or m is None or not self.only_reader(made.name, node):
                continue
            scalar = made.op == "call_method" and made.target == fill and made.args[1:] == ([],) \
                and made.kwargs == {"dtype": TorchExpr("torch.bool")}  # fmt: skip
            mask = self.tensor(Ref(m.name))
            if scalar and mask is not None and mask.dtype == torch.bool and m.op == "call_function" \
                    and m.target in COMPARISONS and self.only_reader(m.name, node):  # fmt: skip
                return m.name, [made]
        return None

    # -- repeats -------------------------------------------------------------------------

    def merge_repeats(self) -> None:
        """A second unsqueeze/expand/basic index equal to an earlier one is the earlier one (two
        equal views of one tensor read the same memory, whatever writes it), and so is a second
        equal arange where no op after the first mutates anything (an in-place write to one of
        two fresh tensors would tell them apart)."""
        nodes = self.live()
        last_write = max((k for k, node in enumerate(nodes) if not self.unchanged(node)), default=-1)
        seen: dict[str, str] = {}
        outputs = {ref.name for ref in self.outputs}
        for k, node in enumerate(nodes):
            if (node.op, node.target) not in REPEATABLE or node.name in outputs:
                continue
            if node.name not in self.values:
                continue
            if node.op == "call_function" and node.target == "torch.arange" and k <= last_write:
                continue  # a fresh tensor: an in-place write after it would tell two apart
            if node.target == "operator.getitem" and self.basic_index(node) is None:
                continue  # views only (an advanced index copies), of tensors (not of a tuple or a size)
            key = repr((node.op, node.target, node.args, node.kwargs, node.grad_enabled))
            if key in seen:
                self.replace(node.name, seen[key])
            else:
                seen[key] = node.name
        self.compact()


def _compose(first: list, second: list) -> list | None:
    """One index that does what indexing with `first`, then with `second`, does; None where
    there is none (a slice of a slice, of a new dimension)."""
    kept = [k for k, item in enumerate(first) if not _selects(item)]  # first's result dims
    if sum(item is not None for item in second) != len(kept):
        return None
    inserts: dict[int, list] = {}
    replaced: dict[int, Any] = {}
    dim = 0
    for item in second:
        at = kept[dim] if dim < len(kept) else len(first)
        if item is None:
            inserts.setdefault(at, []).append(None)
            continue
        dim += 1
        if item == slice(None):
            continue
        if first[at] != slice(None):
            return None
        replaced[at] = item
    items = []
    for k, item in enumerate(first):
        items.extend(inserts.get(k, []))
        items.append(replaced.get(k, item))
    items.extend(inserts.get(len(first), []))
    return items


def _selects(item: Any) -> bool:
    """An index item that takes one position and drops the dimension."""
    return item is not None and not isinstance(item, slice)


def _numbers(data: Any) -> list:
    """The numbers of a nested list, flat."""
    return [n for item in data for n in _numbers(item)] if isinstance(data, list) else [data]
