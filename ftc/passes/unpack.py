"""Items of a container taken out right after the container is made.

The partitioners cut the program order, and a value the runtime cannot send (a dict a leaf
module returns) must share a stage with every op that reads it. torch.fx places `r["aux"]`
where the model reads it, perhaps at the very end, and that one late read would glue everything
between into one stage. Taking an item out of a dict, list or tuple gives the very object stored
there, so taking it earlier gives the same value, unless the container changes in between: a
container that some op mutates keeps its reads where they are.
"""

from __future__ import annotations

from dataclasses import replace

from ftc.ir import Graph, Node, OtherMeta, Ref, SeqMeta

GETITEM = "operator.getitem"
CONTAINER_TYPES = ("dict", "OrderedDict", "list", "tuple")
# What changes a dict or list in place besides the ops that say so (Node.mutates).
CHANGING_METHODS = {
    "append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse", "update", "setdefault", "popitem",
    "__setitem__", "__delitem__", "__iadd__",
}  # fmt: skip
CHANGING_FUNCTIONS = {"operator.setitem", "operator.delitem", "operator.iadd", "operator.iconcat"}


def unpack_containers_early(graph: Graph) -> Graph:
    by_name = graph.by_name()
    mutated = set()
    for node in graph.nodes:
        changes = (
            (node.op == "call_method" and node.target in CHANGING_METHODS)
            or (node.op == "call_function" and node.target in CHANGING_FUNCTIONS)
        )
        index = 0 if changes else node.mutates
        if index is not None and index < len(node.args) and isinstance(node.args[index], Ref):
            mutated.add(node.args[index].name)
    early: dict[str, list[Node]] = {}  # container -> its item reads, to place right after it
    moved = set()
    for node in graph.nodes:
        if _reads_an_item(node, by_name) and node.args[0].name not in mutated:
            (container,) = node.refs()
            early.setdefault(container, []).append(node)
            moved.add(node.name)
    if not moved:
        return graph
    nodes: list[Node] = []

    def place(node: Node) -> None:
        nodes.append(node)
        for item in early.get(node.name, []):
            place(item)  # an item that is itself a container brings its own reads along

    for node in graph.nodes:
        if node.name not in moved:
            place(node)
    return replace(graph, nodes=nodes)


def _reads_an_item(node: Node, by_name: dict[str, Node]) -> bool:
    """`container[key]` with a constant key on a dict, list or tuple; not on a tensor, whose
    indexing may copy, nor on another object, whose __getitem__ may compute."""
    if node.op != "call_function" or node.target != GETITEM or node.kwargs or len(node.args) != 2:
        return False
    container, key = node.args
    if not isinstance(container, Ref) or isinstance(key, Ref) or len(node.refs()) != 1:
        return False
    meta = by_name[container.name].meta
    return isinstance(meta, SeqMeta) or (isinstance(meta, OtherMeta) and meta.type in CONTAINER_TYPES)
