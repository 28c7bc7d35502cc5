"""Custom torch.autograd.Function calls in forward, which no frontend can keep.

Both tracers run a Function's forward and record the ops it does, not the Function: torch.fx
under the no_grad that `Function.apply` sets (the stage code would cut the gradient there), and
torch.export as plain differentiable ops (the stage code would compute autograd's gradient, not
the Function's backward). Either way the stages would train with other gradients than the
model, so the trace stops at the call and names it; a LEAF_MODULES module that makes the call
is kept whole by fx and runs the Function as it is.
"""

from __future__ import annotations

import contextlib

import torch

from ftc.ir import FtcError
from ftc.runtime.model_file import ModelFile

from .common import user_source


@contextlib.contextmanager
def custom_functions_refused(model_file: ModelFile):
    """While tracing, calling a Function defined outside torch raises an FtcError naming it."""
    base = torch.autograd.Function
    original = base.__dict__["apply"]

    def refuse(cls, *args, **kwargs):
        if not cls.__module__.split(".")[0] == "torch":
            where = user_source(model_file) or model_file.path.name
            raise FtcError(
                f"{model_file.path}: forward calls the custom autograd.Function {cls.__qualname__} at {where}: "
                "neither torch.fx nor torch.export keeps its backward (they trace its forward's ops, so the "
                "stages would compute other gradients than the model)",
                "make the call inside a torch.nn.Module, list that module's class in LEAF_MODULES and compile "
                "with --frontend fx or auto: fx keeps a leaf module whole, so the Function runs as it is",
            )
        return original.__func__(cls, *args, **kwargs)

    base.apply = classmethod(refuse)
    try:
        yield
    finally:
        base.apply = original
