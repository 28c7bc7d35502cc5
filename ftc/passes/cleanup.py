"""Dead-code elimination that keeps every side effect of the original forward.

A node goes only when nothing reads its value, it is not a model output, and running it could
not matter: it mutates nothing, calls no module (a module may update its buffers, as BatchNorm
does) and draws no random numbers (dropping a dropout would shift every later random draw, so
stage code would no longer match the model).
"""

from __future__ import annotations

from dataclasses import replace

from ftc.ir import Graph

# scaled_dot_product_attention draws its attention dropout when dropout_p > 0; so do the
# torch.nn layers with a dropout setting (nn.MultiheadAttention, the recurrent layers and the
# Transformer layers) and the recurrent functions (torch.lstm(..., dropout=p, train=True)).
RANDOM_MARKERS = (
    "dropout", "rand", "bernoulli", "multinomial", "normal", "uniform", "poisson", "exponential",
    "scaled_dot_product_attention", "multiheadattention", "lstm", "gru", "rnn", "transformer",
)  # fmt: skip


def draws_random(target: str) -> bool:
    short = target.lower().rsplit(".", 2)
    return any(marker in part for part in short for marker in RANDOM_MARKERS)


def eliminate_dead_code(graph: Graph) -> Graph:
    outputs = {ref.name for ref in graph.outputs.values}
    readers = {node.name: 0 for node in graph.nodes}
    for node in graph.nodes:
        for name in node.refs():
            readers[name] += 1
    kept = []
    for node in reversed(graph.nodes):
        removable = (
            node.op in ("get_attr", "call_function", "call_method")
            and readers[node.name] == 0
            and node.name not in outputs
            and node.mutates is None
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
