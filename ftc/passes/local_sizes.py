"""Sizes a stage reads off its own tensors rather than receives.

`batch = x.size(0)` is made where the model takes it, often at the top of forward (torch.export
takes every use of the batch size, `out.shape[0]` several layers on included, off the input that
first had it). A later stage that reads it then received a Python int from the stage that made
it, and its code read `def forward(self, batch, out)`. Where the reading stage has a tensor whose
dimension is that size, it takes the size itself: `batch = out.size(0)`, next to where it is read.

A size is export's `x.size(d)`, or what fx records for `x.size(d)`, `x.shape[d]` and
`x.size()[d]` (an item of the getattr of `shape`, or of the call of `size` without a
dimension; `batch, steps = x.shape` too). A dimension is that size when it is the same
dimension of the same value, or when both are batch dimensions (TensorMeta.batch_dim) of one
length at the compile batch size: a batch dimension is the batch size times a number of rows per
sample, so two of one length are equal at every batch size. A stage takes the size off a tensor
it already has (receives, or computes before the read), so it receives no new value.
"""

from __future__ import annotations

from dataclasses import replace

from ftc.ir import Graph, Meta, Node, Ref, TensorMeta, map_refs, unique_name


def take_sizes_locally(graph: Graph) -> Graph:
    """`graph` (stages assigned) where each stage takes off its own tensors the sizes it reads;
    a size node no stage reads any more where it was made moves to the first stage it serves."""
    nodes = [replace(node) for node in graph.nodes]
    by_name = {node.name: node for node in nodes}
    position = {node.name: k for k, node in enumerate(nodes)}
    outputs = {ref.name for ref in graph.outputs.values}
    taken = set(by_name)
    refs = {node.name: node.refs() for node in nodes}
    readers: dict[str, list[Node]] = {}
    for node in nodes:
        for name in refs[node.name]:
            readers.setdefault(name, []).append(node)
    held = _Held(nodes, refs, by_name, position)

    placed: dict[str, list[Node]] = {}  # reader name -> size nodes to put just before it
    moved: dict[str, str] = {}  # size node moved -> the reader it is put before
    for size in list(nodes):
        found = _size_of(size, by_name)
        if found is None:
            continue
        tensor, dim = found
        by_stage: dict[int, list[Node]] = {}
        for reader in readers.get(size.name, []):
            by_stage.setdefault(reader.stage, []).append(reader)
        sources = {}
        for stage in sorted(set(by_stage) - {size.stage}):
            first = min(by_stage[stage], key=lambda reader: position[reader.name])
            source = _local_source(tensor, dim, first, held, by_name)
            if source is not None:
                sources[stage] = first, source
        # it goes from where it was made unless that stage, the model's outputs or a stage that
        # has no tensor to take it off reads it
        movable = not (size.stage in by_stage or size.name in outputs or len(sources) < len(by_stage))
        for stage, (first, (source_name, source_dim)) in sources.items():
            stage_readers = by_stage[stage]
            if movable:  # made in the first stage that reads it instead
                local, movable = size, False
                moved[size.name] = first.name
            else:
                local = replace(size, name=unique_name(size.label or size.name, taken), cost=replace(size.cost))
            # fx's item of a shape (`x.shape[d]`) is taken as `x.size(d)`, unless its shape follows it
            local.op, local.target, local.args, local.kwargs = "call_method", "size", (Ref(source_name), source_dim), {}
            local.stage = stage
            placed.setdefault(first.name, []).append(local)
            swap = lambda ref, old=size.name, new=local.name: Ref(new) if ref.name == old else ref  # noqa: E731
            for reader in stage_readers:
                reader.args, reader.kwargs = map_refs(reader.args, swap), map_refs(reader.kwargs, swap)
    for shape in nodes:
        if _is_shape(shape) and shape.name not in outputs and readers.get(shape.name):
            _follow_its_items(shape, readers[shape.name], moved, placed)

    ordered = []
    for node in nodes:
        ordered.extend(placed.get(node.name, []))
        if node.name not in moved:
            ordered.append(node)
    return replace(graph, nodes=ordered)


class _Held:
    """What each stage has without receiving more: the values it receives, and those it computes,
    each in program order; for the search of a batch dimension of a length, the first of each in
    program order per stage and length, so that a search reads no stage's whole list."""

    def __init__(self, nodes: list[Node], refs: dict[str, list[str]], by_name: dict[str, Node], position: dict[str, int]):
        self.by_name, self.position = by_name, position
        self.received: dict[int, set[str]] = {}
        self.first_computed: dict[tuple[int, int], str] = {}  # (stage, batch length) -> name
        for node in nodes:
            if not node.is_compute:
                continue
            length = _batch_length(node.meta)
            if length is not None:
                self.first_computed.setdefault((node.stage, length), node.name)
            self.received.setdefault(node.stage, set()).update(
                name for name in refs[node.name] if by_name[name].stage != node.stage or by_name[name].op == "input"
            )
        self.first_received: dict[tuple[int, int], str] = {}
        for stage, names in self.received.items():
            for name in sorted(names, key=position.__getitem__):
                length = _batch_length(by_name[name].meta)
                if length is not None:
                    self.first_received.setdefault((stage, length), name)

    def has(self, stage: int, name: str, reader: Node) -> bool:
        """Whether the stage has value `name` where `reader` runs: it receives it, or computes it
        before."""
        made = self.by_name.get(name)  # a size taken locally already is not in the table
        if made is None:
            return False
        computed_before = made.is_compute and made.stage == stage and self.position[name] < self.position[reader.name]
        return computed_before or name in self.received.get(stage, ())

    def first_batched(self, stage: int, length: int, reader: Node) -> str | None:
        """The first value in program order that the stage has where `reader` runs whose batch
        dimension has `length` rows."""
        found = [self.first_received.get((stage, length)), self.first_computed.get((stage, length))]
        found = [name for name in found if name is not None and self.has(stage, name, reader)]
        return min(found, key=self.position.__getitem__, default=None)


def _follow_its_items(shape: Node, items: list[Node], moved: dict[str, str], placed: dict[str, list[Node]]) -> None:
    """Where every item of fx's `shape = x.shape` (or `x.size()`) moved to a later stage, the
    shape, which no one reads where it was made any more, moves with the first of them: taken
    off that item's tensor, and read by the items that stage takes off the same tensor, as the
    source read it (`shape = out.shape`, `batch = shape[0]`). The partition's ops stay the
    graph's, so a node moves rather than goes."""
    if not all(item.name in moved for item in items):
        return
    first = items[0]  # in program order, as the graph's nodes are
    source = first.args[0]
    shape.args, shape.stage = (source, *shape.args[1:]), first.stage
    moved[shape.name] = moved[first.name]
    batch = placed[moved[first.name]]
    batch.insert(batch.index(first), shape)
    for item in items:
        if (item.stage, item.args[0]) == (first.stage, source):
            item.op, item.target, item.args = "call_function", "operator.getitem", (Ref(shape.name), item.args[1])


def _batch_length(meta: Meta | None) -> int | None:
    if isinstance(meta, TensorMeta) and meta.batch_dim is not None:
        return meta.shape[meta.batch_dim]
    return None


def _is_shape(node: Node) -> bool:
    """Whether the node is fx's `x.shape` or `x.size()`, the whole shape of a tensor."""
    if node.kwargs or not node.args or not isinstance(node.args[0], Ref):
        return False
    if (node.op, node.target) == ("call_function", "getattr"):
        return node.args[1:] == ("shape",)
    return (node.op, node.target) == ("call_method", "size") and len(node.args) == 1


def _size_of(node: Node, by_name: dict[str, Node]) -> tuple[str, int] | None:
    """(tensor, dimension) whose size `node` is, as `x.size(d)`, or fx's item of `x.shape` or of
    `x.size()`, of a tensor x of known rank; the dimension counted from the front."""
    if (node.op, node.target) == ("call_method", "size") and not node.kwargs and len(node.args) == 2:
        tensor, dim = node.args
    elif (node.op, node.target) == ("call_function", "operator.getitem") and not node.kwargs \
            and len(node.args) == 2 and isinstance(node.args[0], Ref) and _is_shape(by_name[node.args[0].name]):  # fmt: skip
        tensor, dim = by_name[node.args[0].name].args[0], node.args[1]
    else:
        return None
    meta = by_name[tensor.name].meta if isinstance(tensor, Ref) else None
    if not isinstance(meta, TensorMeta) or type(dim) is not int or not -len(meta.shape) <= dim < len(meta.shape):
        return None
    return tensor.name, dim % len(meta.shape)


def _local_source(tensor: str, dim: int, first: Node, held: _Held, by_name: dict[str, Node]) -> tuple[str, int] | None:
    """(a tensor `first`'s stage has where `first`, the size's first reader there, runs, its
    dimension equal to the size): the tensor the size is of; else one that `first` reads; else
    the first in program order."""
    stage = first.stage
    if held.has(stage, tensor, first):
        return tensor, dim
    meta = by_name[tensor].meta
    if meta.batch_dim != dim:
        return None
    length = meta.shape[dim]
    read = (name for name in first.refs() if held.has(stage, name, first) and _batch_length(by_name[name].meta) == length)
    source = next(read, None) or held.first_batched(stage, length, first)
    if source is None:
        return None
    return source, by_name[source].meta.batch_dim
