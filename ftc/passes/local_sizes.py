"""Sizes a stage reads off its own tensors rather than receives.

`batch = x.size(0)` is made where the model takes it, often at the top of forward (torch.export
takes every use of the batch size, `out.shape[0]` several layers on included, off the input that
first had it). A later stage that reads it then received a Python int from the stage that made
it, and its code read `def forward(self, batch, out)`. Where the reading stage has a tensor whose
dimension is that size, it takes the size itself: `batch = out.size(0)`, next to where it is read.

A dimension is that size when it is the same dimension of the same value, or when both are batch
dimensions (TensorMeta.batch_dim) of one length at the compile batch size: a batch dimension is
the batch size times a number of rows per sample, so two of one length are equal at every batch
size. A stage takes the size off a tensor it already has (receives, or computes before the read),
so it receives no new value.
"""

from __future__ import annotations

from dataclasses import replace

from ftc.ir import Graph, Node, Ref, TensorMeta, map_refs, unique_name


def take_sizes_locally(graph: Graph) -> Graph:
    """`graph` (stages assigned) where each stage takes off its own tensors the sizes it reads;
    a size node no stage reads any more where it was made moves to the first stage it serves."""
    nodes = [replace(node) for node in graph.nodes]
    by_name = {node.name: node for node in nodes}
    position = {node.name: k for k, node in enumerate(nodes)}
    outputs = {ref.name for ref in graph.outputs.values}
    taken = set(by_name)
    readers: dict[str, list[Node]] = {}
    for node in nodes:
        for name in node.refs():
            readers.setdefault(name, []).append(node)

    # what each stage has without receiving more: what it receives, and what it computes
    received: dict[int, set[str]] = {}
    computed: dict[int, list[Node]] = {}
    for node in nodes:
        if node.is_compute:
            computed.setdefault(node.stage, []).append(node)
            received.setdefault(node.stage, set()).update(
                name for name in node.refs() if by_name[name].stage != node.stage or by_name[name].op == "input"
            )

    placed: dict[str, list[Node]] = {}  # reader name -> size nodes to put just before it
    moved: set[str] = set()
    for size in list(nodes):
        dim = _size_dim(size, by_name)
        if dim is None:
            continue
        by_stage: dict[int, list[Node]] = {}
        for reader in readers.get(size.name, []):
            by_stage.setdefault(reader.stage, []).append(reader)
        sources = {}
        for stage in sorted(set(by_stage) - {size.stage}):
            first = min(by_stage[stage], key=lambda reader: position[reader.name])
            before = {node.name for node in computed.get(stage, []) if position[node.name] < position[first.name]}
            available = (received.get(stage, set()) | before) - {size.name}
            source = _local_source(size, dim, first, available, by_name, position)
            if source is not None:
                sources[stage] = first, source
        # it goes from where it was made unless that stage, the model's outputs or a stage that
        # has no tensor to take it off reads it
        movable = not (size.stage in by_stage or size.name in outputs or len(sources) < len(by_stage))
        for stage, (first, (source_name, source_dim)) in sources.items():
            stage_readers = by_stage[stage]
            if movable:  # made in the first stage that reads it instead
                local, movable = size, False
                moved.add(size.name)
            else:
                local = replace(size, name=unique_name(size.label or size.name, taken), cost=replace(size.cost))
            local.args, local.stage = (Ref(source_name), source_dim), stage
            placed.setdefault(first.name, []).append(local)
            swap = lambda ref, old=size.name, new=local.name: Ref(new) if ref.name == old else ref  # noqa: E731
            for reader in stage_readers:
                reader.args, reader.kwargs = map_refs(reader.args, swap), map_refs(reader.kwargs, swap)

    ordered = []
    for node in nodes:
        ordered.extend(placed.get(node.name, []))
        if node.name not in moved:
            ordered.append(node)
    return replace(graph, nodes=ordered)


def _size_dim(node: Node, by_name: dict[str, Node]) -> int | None:
    """The dimension `node` takes the size of, as `x.size(d)` of a tensor x of known rank."""
    if (node.op, node.target) != ("call_method", "size") or node.kwargs or len(node.args) != 2:
        return None
    tensor, dim = node.args
    meta = by_name[tensor.name].meta if isinstance(tensor, Ref) else None
    if not isinstance(meta, TensorMeta) or type(dim) is not int or not -len(meta.shape) <= dim < len(meta.shape):
        return None
    return dim % len(meta.shape)


def _local_source(
    size: Node, dim: int, first: Node, available: set[str], by_name: dict[str, Node], position: dict[str, int]
) -> tuple[str, int] | None:
    """(one of the `available` tensors, its dimension equal to the size): the tensor the size is
    of; else one that `first`, the size's first reader, reads; else the first in program order."""
    tensor = size.args[0].name
    if tensor in available:
        return tensor, dim
    meta = by_name[tensor].meta
    if meta.batch_dim != dim:
        return None
    for name in [*first.refs(), *sorted(available, key=position.__getitem__)]:
        other = by_name[name].meta
        if name in available and isinstance(other, TensorMeta) and other.batch_dim is not None \
                and other.shape[other.batch_dim] == meta.shape[dim]:  # fmt: skip
            return name, other.batch_dim
    return None
