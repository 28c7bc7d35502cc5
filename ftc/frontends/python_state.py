"""Numbers that forward keeps on a module as plain Python attributes (`self.calls += 1`, a
temperature annealed by a step count, a Performer's redraw counter).

A tracer runs forward's Python once, so such a value is read once, while tracing, and fixed in the
stage code as a constant, while the model's own forward reads a new value at every call: the
stages would train with other numbers than the model, silently (a counter that anneals a softmax
temperature: losses 1.6e-3 apart in 3 steps). The trace watches assignments that change a number
held by a module, made by the model's own code, and stops, naming the attribute and the line.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch

from ftc.ir import FtcError
from ftc.runtime.model_file import ModelFile

from .common import CodeFiles, user_source

NUMBERS = (bool, int, float)


@contextlib.contextmanager
def python_state_refused(model_file: ModelFile) -> Iterator[None]:
    """While tracing, the model's code changing a number held as a module attribute raises an
    FtcError naming it (the `training` flag aside: train() and eval() set it)."""
    original = torch.nn.Module.__setattr__
    code = CodeFiles(model_file)

    def setattr_watched(module: torch.nn.Module, name: str, value) -> None:
        held = module.__dict__.get(name)
        changed = name != "training" and type(held) in NUMBERS and type(value) in NUMBERS and held != value
        # torch's own code may keep numbers on its modules; the model's code may not.
        if changed and code.own(sys._getframe(1).f_code.co_filename):
            where = user_source(model_file, code)
            raise FtcError(
                f"{model_file.path}: forward changes {type(module).__qualname__}.{name}, a Python "
                f"{type(held).__name__}, from {held!r} to {value!r} at {where}: the stage code fixes the value the "
                "trace read, while the model reads a new one at each call, so the stages would train with other "
                "numbers than the model",
                f"keep {name} in a tensor buffer (self.register_buffer({name!r}, torch.tensor({held!r})) in "
                f"__init__, then self.{name}.add_(1) or .copy_(value) in forward), whose updates become ops of the stage "
                "code",
            )
        original(module, name, value)

    torch.nn.Module.__setattr__ = setattr_watched
    try:
        yield
    finally:
        torch.nn.Module.__setattr__ = original
