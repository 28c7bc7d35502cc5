"""What each stage holds: its ops, the values it receives and sends, and the original
submodules, parameters and buffers it adopts.

A stage adopts what its ops use under the original qualified names, so its state_dict() keys are
the model's keys for that slice. Where a stage uses everything under a module it adopts the
module whole; otherwise it builds `torch.nn.ModuleDict` containers down to the parts it uses.
Parameters and buffers that forward never reads still belong to some stage (the one that adopts
their nearest relatives, else the first), so that the stages' keys together are the model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ftc.ir import Graph, Node


@dataclass
class Adoption:
    """One entry of a stage's module tree: the original module, parameter or buffer at `path`,
    or (`children` non-empty / `container`) a ModuleDict standing in for a partly used module."""

    path: str
    kind: str  # "module" | "parameter" | "buffer" | "container"
    persistent: bool = True
    children: list[Adoption] = field(default_factory=list)


@dataclass
class StagePlan:
    index: int
    device: int
    nodes: list[Node]
    inputs: list[str]
    outputs: list[str]
    adopted: list[Adoption]  # top level of the stage's module tree
    state: list[str]  # state_dict keys (and non-persistent buffers) the stage holds
    constants: list[str]


def _covered(path: str, items: set[str]) -> bool:
    parts = path.split(".")
    return any(".".join(parts[:k]) in items for k in range(1, len(parts) + 1))


def plan_stages(graph: Graph) -> list[StagePlan]:
    by_name = graph.by_name()
    position = {node.name: k for k, node in enumerate(graph.nodes)}
    stage_of = {node.name: node.stage for node in graph.nodes}
    graph_outputs = {ref.name for ref in graph.outputs.values}

    used: list[set[str]] = [set() for _ in range(graph.num_stages)]
    constants: list[set[str]] = [set() for _ in range(graph.num_stages)]
    readers: dict[str, set[int]] = {}
    for node in graph.nodes:
        if not node.is_compute:
            continue
        if node.op == "call_module":
            used[node.stage].add(node.target)
        for name in node.refs():
            source = by_name[name]
            if source.op == "get_attr":
                (constants if source.target in graph.constants else used)[node.stage].add(source.target)
            else:
                readers.setdefault(name, set()).add(node.stage)

    # A parameter, buffer or constant the model returns as it is (`return h, self.temperature`)
    # is returned by the last stage, which computes the loss.
    returned_state = [name for name in graph_outputs if by_name[name].op == "get_attr"]
    for name in returned_state:
        target = by_name[name].target
        (constants if target in graph.constants else used)[graph.num_stages - 1].add(target)

    _place_unread_state(graph, used)

    tree = _ModuleTree.of(graph)
    plans = []
    for stage in range(graph.num_stages):
        nodes = [node for node in graph.nodes if node.is_compute and node.stage == stage]
        inputs = sorted(
            {name for name, stages in readers.items() if stage in stages and stage_of[name] != stage}
            | {node.name for node in graph.nodes if node.op == "input" and stage in readers.get(node.name, ())},
            key=position.__getitem__,
        )
        outputs = [
            node.name
            for node in nodes
            if readers.get(node.name, set()) - {stage} or node.name in graph_outputs
        ]
        if stage == graph.num_stages - 1:
            outputs += sorted(returned_state, key=position.__getitem__)
        plans.append(
            StagePlan(
                index=stage,
                device=graph.stage_devices[stage],
                nodes=nodes,
                inputs=inputs,
                outputs=outputs,
                adopted=_adoption_tree(graph, tree, used[stage]),
                state=sorted(name for name in graph.state if _covered(name, used[stage])),
                constants=sorted(constants[stage]),
            )
        )
    return plans


def _place_unread_state(graph: Graph, used: list[set[str]]) -> None:
    """Give every parameter or buffer no stage adopts to the stage that adopts the most of its
    closest enclosing module (the first stage when none does)."""
    for name in graph.state:
        if any(_covered(name, items) for items in used):
            continue
        parts = name.split(".")
        home = 0
        for k in range(len(parts) - 1, -1, -1):
            prefix = ".".join(parts[:k])
            counts = [sum(1 for item in items if not prefix or item == prefix or item.startswith(prefix + ".")) for items in used]
            if max(counts) > 0:
                home = counts.index(max(counts))
                break
        used[home].add(name)


def module_children(graph: Graph) -> dict[str, list[str]]:
    """Module path -> its child modules' paths, in registration order."""
    children: dict[str, list[str]] = {}
    for path in graph.modules:
        if path:
            children.setdefault(path.rpartition(".")[0], []).append(path)
    return children


@dataclass
class _ModuleTree:
    """The model's module hierarchy, as adoption needs it; the same for every stage."""

    children: dict[str, list[str]]  # module path -> child module paths
    tensors_of: dict[str, list[str]]  # module path -> its own parameters and buffers
    needs: dict[str, set[str]]  # module path -> the leaf modules called and tensors under it

    @classmethod
    def of(cls, graph: Graph) -> _ModuleTree:
        children = module_children(graph)
        tensors_of: dict[str, list[str]] = {}
        for name in graph.state:
            tensors_of.setdefault(name.rpartition(".")[0], []).append(name)
        leaves = {node.target for node in graph.nodes if node.op == "call_module"}
        needs: dict[str, set[str]] = {path: set() for path in graph.modules}
        for item in leaves | set(graph.state):
            parts = item.split(".")
            for k in range(1, len(parts) + 1):
                prefix = ".".join(parts[:k])
                if prefix in needs:
                    needs[prefix].add(item)
        return cls(children, tensors_of, needs)


def _adoption_tree(graph: Graph, tree: _ModuleTree, items: set[str]) -> list[Adoption]:
    def build(module_path: str) -> list[Adoption]:
        entries = []
        for name in tree.tensors_of.get(module_path, []):
            if _covered(name, items):
                tensor = graph.state[name]
                entries.append(Adoption(name, tensor.kind, tensor.persistent))
        for child in tree.children.get(module_path, []):
            need = tree.needs.get(child, set())
            if not need or not any(_covered(item, items) for item in need):
                continue
            if child in items or all(_covered(item, items) for item in need):
                entries.append(Adoption(child, "module"))
            else:
                entries.append(Adoption(child, "container", children=build(child)))
        return entries

    return build("")
