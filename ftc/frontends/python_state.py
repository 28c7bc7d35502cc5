"""Module state that forward changes as Python, not as tensor ops: a number kept as a plain
attribute (`self.calls += 1`, a temperature annealed by a step count, a Performer's redraw
counter), and a parameter made in forward (a hand-written lazy layer's `if self.weight is None:
self.weight = nn.Parameter(torch.randn(d, x.shape[-1]))`).

A tracer runs forward's Python once. A number is read once, while tracing, and fixed in the stage
code as a constant, while the model's own forward reads a new value at every call (a counter that
anneals a softmax temperature: losses 1.6e-3 apart in 3 steps). A parameter made in forward is
not the model's (the model ranks build has none) and fx records its making as ops, so the stages
drew a new random weight at every step and never trained it (losses 2.7e-2 apart in 3 steps).
Either way the stages would train other numbers than the model, silently; the trace watches the
model's own code assign such attributes while forward runs, and stops, naming the attribute and
the line.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch

from ftc.ir import FtcError
from ftc.runtime.model_file import ModelFile

from .common import FTC_FILES, CodeFiles, callers, user_source

NUMBERS = (bool, int, float)


@contextlib.contextmanager
def python_state_refused(model_file: ModelFile) -> Iterator[None]:
    """While tracing, the model's code changing a number held as a module attribute (the
    `training` flag aside: train() and eval() set it), or making a parameter, raises an FtcError
    naming it."""
    original_setattr = torch.nn.Module.__setattr__
    original_parameter = torch.nn.Parameter.__new__
    code = CodeFiles(model_file)

    def setattr_watched(module: torch.nn.Module, name: str, value) -> None:
        held = module.__dict__.get(name)
        changed = name != "training" and type(held) in NUMBERS and type(value) in NUMBERS and held != value
        # torch's own code may keep numbers on its modules; the model's code may not.
        if changed and _called_from(code):
            raise FtcError(
                f"{model_file.path}: forward changes {type(module).__qualname__}.{name}, a Python "
                f"{type(held).__name__}, from {held!r} to {value!r} at {user_source(model_file, code)}: the stage code "
                "fixes the value the trace read, while the model reads a new one at each call, so the stages would "
                "train with other numbers than the model",
                f"keep {name} in a tensor buffer (self.register_buffer({name!r}, torch.tensor({held!r})) in "
                f"__init__, then self.{name}.add_(1) or .copy_(value) in forward), whose updates become ops of the "
                "stage code",
            )
        original_setattr(module, name, value)

    def parameter_watched(cls, *args, **kwargs):
        if _called_from(code):
            raise FtcError(
                f"{model_file.path}: forward makes a parameter at {user_source(model_file, code)}: the model that "
                "build_model() returns has no such parameter, and the stage code would make a new one at every call "
                "(fx records its making as ops), never trained, so the stages would train other numbers than the model",
                "make every parameter in __init__; for a size known only from the input, use torch.nn's Lazy layers "
                "and run one forward in build_model()",
            )
        return original_parameter(cls, *args, **kwargs)

    torch.nn.Module.__setattr__ = setattr_watched
    torch.nn.Parameter.__new__ = parameter_watched
    try:
        yield
    finally:
        torch.nn.Module.__setattr__ = original_setattr
        torch.nn.Parameter.__new__ = original_parameter


def _called_from(code: CodeFiles) -> bool:
    """Whether the code that called the watched function, past ftc's own frames (another watcher
    of assignments wraps this one: buffer_assignments.py), is the model's own."""
    caller = next(callers(sys._getframe(2), FTC_FILES), None)
    return caller is not None and code.own(caller.f_code.co_filename)
