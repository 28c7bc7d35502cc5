"""Code in forward that changes gradients, which no frontend can keep: a custom
torch.autograd.Function and a gradient hook on a tensor (`h.register_hook(fn)`).

Both tracers run a Function's forward and record the ops it does, not the Function: torch.fx
under the no_grad that `Function.apply` sets (the stage code would cut the gradient there), and
torch.export as plain differentiable ops (the stage code would compute autograd's gradient, not
the Function's backward). A tensor's hook is a Python callable on one run's tensor, which fx
drops as an op without users and export does not record. Either way the stages would train with
other gradients than the model, so the trace stops at the call and names it; a LEAF_MODULES
module that does it is kept whole by fx and runs as it is.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from ftc.ir import FtcError
from ftc.runtime.model_file import ModelFile

from .common import user_source

# Tensor methods that attach a gradient callable to one tensor.
GRADIENT_HOOKS = ("register_hook", "register_post_accumulate_grad_hook")

LEAF_FIX = (
    "do it inside a torch.nn.Module, list that module's class in LEAF_MODULES and compile with --frontend fx "
    "or auto: fx keeps a leaf module whole, so it runs as it is"
)


def hook_refused(model_file: ModelFile, method: str, where: str) -> FtcError:
    return FtcError(
        f"{model_file.path}: forward calls Tensor.{method} at {where}: the stage code cannot carry a gradient "
        "hook on a tensor (the tracers drop it, so the stages would compute other gradients than the model)",
        LEAF_FIX + "; or hook a module (register_full_backward_hook) or a parameter outside forward",
    )


@contextlib.contextmanager
def gradient_code_refused(model_file: ModelFile):
    """While tracing, calling a Function defined outside torch, or a tensor hook from the model
    file's code, raises an FtcError naming it."""
    base = torch.autograd.Function
    original_apply = base.__dict__["apply"]
    original_hooks = {method: getattr(torch.Tensor, method) for method in GRADIENT_HOOKS}
    model_dir = str(model_file.path.resolve().parent)

    def refuse_function(cls, *args, **kwargs):
        if not cls.__module__.split(".")[0] == "torch":
            where = user_source(model_file) or model_file.path.name
            raise FtcError(
                f"{model_file.path}: forward calls the custom autograd.Function {cls.__qualname__} at {where}: "
                "neither torch.fx nor torch.export keeps its backward (they trace its forward's ops, so the "
                "stages would compute other gradients than the model)",
                LEAF_FIX,
            )
        return original_apply.__func__(cls, *args, **kwargs)

    def refuse_hook(method: str):
        original = original_hooks[method]

        def hook(self, *args, **kwargs):
            # torch's own code (a module's backward hooks) may hook tensors; the model's may not.
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(model_dir) and not Path(caller).is_relative_to(Path(torch.__file__).parent):
                raise hook_refused(model_file, method, user_source(model_file) or model_file.path.name)
            return original(self, *args, **kwargs)

        return hook

    base.apply = classmethod(refuse_function)
    for method in GRADIENT_HOOKS:
        setattr(torch.Tensor, method, refuse_hook(method))
    try:
        yield
    finally:
        base.apply = original_apply
        for method, original in original_hooks.items():
            setattr(torch.Tensor, method, original)
