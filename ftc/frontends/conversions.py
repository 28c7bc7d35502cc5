"""A module's `.to(...)` called in forward while a tracer runs it.

transformers' Switch Transformers and NLLB-MoE routers cast their classifier at every call
(`self.classifier = self.classifier.to(self.dtype)`), which changes nothing once the model has
that dtype. Under torch.export the parameters are fake tensors, which Module._apply swaps for the
converted ones even when the conversion returns them as they are, and the swap fails ("_apply():
Couldn't swap Linear.weight"). A conversion that changes no tensor is the module as it is, so
tracing takes it so; one that would change a tensor is refused by name: the trace would hold the
converted module while the stages adopt the module build_model() made.
"""

from __future__ import annotations

import contextlib
import linecache
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensor

from ftc.ir import FtcError

from .common import FTC_FILES, TORCH_FILES, callers


@contextlib.contextmanager
def unchanging_conversions_kept():
    """While tracing, a module conversion (`module.to(dtype)`, `.float()`, `.cpu()`) that returns
    every parameter and buffer as it is leaves the module untouched; one that changes a fake
    tensor (torch.export's parameters) is refused, naming the class and the line."""
    apply = torch.nn.Module._apply

    def conversion(module: torch.nn.Module, fn, recurse: bool = True) -> torch.nn.Module:
        tensors = [t for m in (module.modules() if recurse else [module]) for t in _own_tensors(m)]
        with torch.no_grad():
            changed = [t for t in tensors if fn(t) is not t]
        if not changed:
            return module
        if any(isinstance(t, FakeTensor) for t in changed):
            raise _conversion_refused(module, changed[0], fn)
        return apply(module, fn, recurse)

    torch.nn.Module._apply = conversion
    try:
        yield
    finally:
        torch.nn.Module._apply = apply


def _own_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [t for t in [*module._parameters.values(), *module._buffers.values()] if t is not None]


def _conversion_refused(module: torch.nn.Module, tensor: torch.Tensor, fn) -> FtcError:
    with torch.no_grad():
        converted = fn(tensor)
    change, cure = (
        (f"from {tensor.dtype} to {converted.dtype}", converted.dtype)
        if converted.dtype != tensor.dtype
        else (f"from {tensor.device} to {converted.device}", f"'{converted.device}'")
    )
    return FtcError(
        f"forward converts a {type(module).__name__} ({change}){_caller()}: "
        "torch.export traces forward once, and the stages adopt the module as build_model() makes it, so they "
        "would run it unconverted",
        "convert that module in build_model(), after building the model, as forward converts it "
        f"(module.to({cure})), so that forward's conversion changes nothing",
    )


def _caller() -> str:
    """' at file.py:LINE: source' of the innermost frame on the stack outside torch and ftc."""
    frame = next(callers(sys._getframe(2), TORCH_FILES + FTC_FILES), None)
    if frame is None:
        return ""
    source = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    return f" at {frame.f_code.co_filename}:{frame.f_lineno}: {source}"
