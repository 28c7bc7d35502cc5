"""A model's own train() that sets a module's mode apart from the model's (a frozen BatchNorm, a
dropout kept on in eval mode), where the stages cannot follow it.

The stages follow such an override wherever they call the module (its flag is its own, set by the
model's train()), but where stage code came from a traced forward that read `self.training`, it
reads the stage's one flag, which follows the model's own: there the stages compute in the model's
mode, not the module's. Say so when compiling, naming the class and the module.
"""

from __future__ import annotations

from typing import Any

import torch

from ftc.ir import Graph, TorchExpr


def own_train_warnings(graph: Graph, model: torch.nn.Module) -> list[str]:
    """One line per module whose mode the model's train() sets apart from the model's, where the
    stage code reads the stage's mode for it; empty when the stages follow the model exactly."""
    readers: dict[str, list[str]] = {}  # module path -> where stage code reads the stage's mode for it
    for node in graph.nodes:
        if node.is_compute and _reads_training((node.args, node.kwargs)):
            readers.setdefault(node.module_path, []).append(node.source or node.name)
    apart: dict[str, bool] = {}  # module path -> the model's mode in which it differs
    for training in (False, True):  # ending in training mode, where the trace left the model
        model.train(training)
        for path in readers:
            if model.get_submodule(path).training != model.training:
                apart.setdefault(path, training)
    return [
        f"{type(model).__name__}.train() puts {path or 'the model'} ({type(model.get_submodule(path)).__name__}) "
        f"in {'eval' if training else 'train'} mode while the model is in {'train' if training else 'eval'} mode, but "
        f"the stage code from its forward ({', '.join(dict.fromkeys(readers[path]))}) reads the stage's own mode, "
        "the model's: the stages compute there as the model's mode says, not as that module's does\n"
        "  fix: compile with --frontend fx and list the module's class in LEAF_MODULES, so the stages call it whole"
        for path, training in apart.items()
    ]


def _reads_training(arg: Any) -> bool:
    if isinstance(arg, TorchExpr):
        return "self.training" in arg.expr
    if isinstance(arg, (tuple, list)):
        return any(_reads_training(a) for a in arg)
    if isinstance(arg, dict):
        return any(_reads_training(a) for a in arg.values())
    return False
