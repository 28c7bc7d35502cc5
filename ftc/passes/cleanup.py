"""Dead-code elimination that keeps every side effect of the original forward.

A node goes only when nothing reads its value, it is not a model output, and running it could
not matter: it mutates nothing, updates no state of the model (export's batch norm writes the
running statistics its schema does not declare: Node.updates), draws no random numbers
(dropping a dropout would shift every later random draw, so stage code would no longer match
the model) and calls no module but a torch.nn layer made of torch.nn layers that no hook of the
model watches (a module of the model's own, or a parametrization, may do anything). A WaveNet's
last residual convolution, whose output its forward drops, ran in the stage code as a bare
statement.
"""

from __future__ import annotations

from dataclasses import replace

from ftc.ir import Graph, Node

# scaled_dot_product_attention draws its attention dropout when dropout_p > 0; so do the
# torch.nn layers with a dropout setting (nn.MultiheadAttention, the recurrent layers and the
# Transformer layers) and the recurrent functions (torch.lstm(..., dropout=p, train=True)).
RANDOM_MARKERS = (
    "dropout", "rand", "bernoulli", "multinomial", "normal", "uniform", "poisson", "exponential",
    "scaled_dot_product_attention", "multiheadattention", "lstm", "gru", "rnn", "transformer", "rrelu",
)  # fmt: skip


def draws_random(target: str) -> bool:
    short = target.lower().rsplit(".", 2)
    return any(marker in part for part in short for marker in RANDOM_MARKERS)


def eliminate_dead_code(graph: Graph, hooked: frozenset[str] = frozenset()) -> Graph:
    """`graph` without the nodes whose running cannot matter; `hooked` names the modules that a
    hook watches, theirs or a submodule's."""
    outputs = {ref.name for ref in graph.outputs.values}
    readers = {node.name: 0 for node in graph.nodes}
    for node in graph.nodes:
        for name in node.refs():
            readers[name] += 1
    copies = {node.name for node in graph.nodes if node.op == "call_method" and node.target == "clone"}
    kept = []
    for node in reversed(graph.nodes):
        removable = (
            readers[node.name] == 0
            and node.name not in outputs
            and (node.op in ("get_attr", "call_function", "call_method") or _plain_layer_call(graph, node, hooked))
            and not node.updates
            and (node.mutates is None or _changes_only_an_unread_copy(node, copies, readers, outputs))
            and not draws_random(node.target)
        )
        if removable:
            for name in node.refs():
                readers[name] -= 1
        else:
            kept.append(node)
    used_constants = {node.target for node in kept if node.op == "get_attr"}
    constants = {name: c for name, c in graph.constants.items() if name in used_constants}
    return replace(graph, nodes=kept[::-1], constants=constants)


def _plain_layer_call(graph: Graph, node: Node, hooked: frozenset[str]) -> bool:
    """Whether `node` calls a torch.nn layer whose call does nothing but compute its value."""
    if node.op != "call_module" or node.target in hooked:
        return False
    layers = [cls for path, cls in graph.modules.items() if path == node.target or path.startswith(f"{node.target}.")]
    return bool(layers) and all(cls.startswith("torch.nn.modules.") and not draws_random(cls) for cls in layers)


def _changes_only_an_unread_copy(node: Node, copies: set[str], readers: dict[str, int], outputs: set[str]) -> bool:
    """Whether the value `node` changes in place is a copy (`clone`, never a view of another
    value) that nothing else reads: export records each `torch.tensor(3)` of forward as a copy
    detached in place (`c = k.clone(); c.detach_()`), and the change then matters to nothing."""
    target = node.args[node.mutates] if node.mutates < len(node.args) else None
    name = getattr(target, "name", None)
    return name in copies and readers[name] == 1 and name not in outputs


def hooked_modules(model) -> frozenset[str]:
    """The paths of the model's modules that a hook watches, a hook of theirs or of a submodule's."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return frozenset(
        path
        for path, module in model.named_modules(remove_duplicate=False)
        if any(getattr(inner, kind, None) for inner in module.modules() for kind in kinds)
    )
