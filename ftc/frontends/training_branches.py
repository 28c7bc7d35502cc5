"""The model's own branches on `self.training`, read from its source, for torch.export.

fx records each read of the flag (fx.py), but export gives no hook on it: the traced graph keeps
what training mode computed there, silently. So the forwards of the model's own classes (defined
in the model file or beside it) are parsed, and every read of the flag other than as a call's
argument is named; a flag passed to a function of the model's own is followed into it. A
library's branches are found otherwise, by running forward in both modes (eval_mode.py)."""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path
from typing import Any

import torch

from ftc.runtime.model_file import ModelFile


def training_branches(model: torch.nn.Module, model_file: ModelFile, followed: set[type] = frozenset()) -> list[str]:
    """'file.py:LINE' of the places in the forwards of the model's own classes (defined in the
    model file or beside it) that read `self.training` other than as an argument of a call: a
    branch, `and`/`or`, arithmetic. export, unlike fx, gives no hook on the read, so this reads
    the source; the traced graph keeps what training mode computed there. A flag passed to a
    function of the model's own (timm's `drop_path(x, p, self.training)`) is followed into it:
    that function's branch on its parameter is such a place too. The classes in `followed`,
    whose modules the stages call whole, are left out."""
    model_dir = model_file.path.resolve().parent
    places: list[str] = []
    for cls in dict.fromkeys(type(m) for m in model.modules() if type(m) not in followed):
        forward = cls.__dict__.get("forward")
        if forward is not None:
            _flag_reads(forward, _is_self_training, model_dir, places, depth=0)
    return places


def _is_self_training(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "training" and isinstance(node.value, ast.Name)
            and node.value.id == "self" and isinstance(node.ctx, ast.Load))  # fmt: skip


def _own_source(function: Any, model_dir: Path) -> tuple[Path, ast.AST, int] | None:
    """The file, parsed source and first line of a function defined beside the model file."""
    try:
        path = Path(inspect.getsourcefile(function)).resolve()
        if not path.is_relative_to(model_dir) or path.is_relative_to(Path(torch.__file__).parent):
            return None
        lines, first = inspect.getsourcelines(function)
        return path, ast.parse(textwrap.dedent("".join(lines))), first
    except (OSError, TypeError, SyntaxError):
        return None


def _flag_reads(function: Any, is_flag: Any, model_dir: Path, places: list[str], depth: int) -> None:
    """Add to `places` where `function` reads the training flag (`is_flag` tells its reads) other
    than as an argument of a call; an argument of a call of the model's own Python function is
    followed into that function's parameter (up to 4 calls deep)."""
    source = _own_source(function, model_dir)
    if source is None:
        return
    path, tree, first = source
    argument_of: dict[int, tuple[ast.Call, int | str]] = {}
    for call in ast.walk(tree):
        if isinstance(call, ast.Call):
            argument_of.update({id(a): (call, i) for i, a in enumerate(call.args)})
            argument_of.update({id(k.value): (call, k.arg) for k in call.keywords if k.arg})
    # export writes a traced attention dropout back as `p if self.training else 0.0` (aten.py),
    # so the flag that chose it there follows the stage's mode.
    attention_dropout = {id(inner) for call in ast.walk(tree) if isinstance(call, ast.Call)
                         and _called_name(call.func) == "scaled_dot_product_attention"
                         for value in [*call.args[4:5], *(k.value for k in call.keywords if k.arg == "dropout_p")]
                         for inner in ast.walk(value)}  # fmt: skip
    for node in sorted((n for n in ast.walk(tree) if is_flag(n)), key=lambda n: (n.lineno, n.col_offset)):
        if id(node) in attention_dropout:
            continue
        if id(node) in argument_of:
            call, position = argument_of[id(node)]
            callee = _resolve_callee(call.func, function)
            parameter = _parameter_name(callee, position)
            if parameter is not None and depth < 4:
                _flag_reads(callee, lambda n, name=parameter: isinstance(n, ast.Name) and n.id == name
                            and isinstance(n.ctx, ast.Load), model_dir, places, depth + 1)  # fmt: skip
            continue
        place = f"{path.name}:{first + node.lineno - 1}"
        if place not in places:
            places.append(place)


def _called_name(expression: ast.expr) -> str | None:
    """`f` for a call of `f` or of `a.b.f`."""
    return expression.attr if isinstance(expression, ast.Attribute) else getattr(expression, "id", None)


def _resolve_callee(expression: ast.expr, function: Any) -> Any:
    """The object a call's `f` or `a.b.f` names in the function's module globals (None when it
    names something else, such as a method of `self`)."""
    names: list[str] = []
    while isinstance(expression, ast.Attribute):
        names.append(expression.attr)
        expression = expression.value
    if not isinstance(expression, ast.Name):
        return None
    scope = getattr(function, "__globals__", {})
    if expression.id not in scope:
        return None
    value = scope[expression.id]
    for name in reversed(names):
        value = getattr(value, name, None)
    return value


def _parameter_name(callee: Any, position: int | str) -> str | None:
    """The name of the parameter of a plain Python function that an argument binds to."""
    if not inspect.isfunction(callee):
        return None
    try:
        parameters = list(inspect.signature(callee).parameters.values())
    except (TypeError, ValueError):
        return None
    if isinstance(position, str):
        return position if any(p.name == position for p in parameters) else None
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional[position].name if position < len(positional) else None
