"""A buffer that forward assigns a new tensor (`self.low = self.low * m + low * (1 - m)`, as
transformers' I-BERT QuantAct keeps its running range), under torch.export.

export records the new tensor's ops but not the assignment: the program's signature holds no
write of the buffer, so the stages computed the new value and dropped it, and the buffer kept
its first value at every step (`ftc check` found the state apart; compile and training said
nothing). While export traces, such an assignment is made an in-place copy into the buffer,
which export records as a write the stages make; one whose tensor has another shape or dtype,
which no copy can make, is refused, naming the buffer and the line.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ftc.ir import FtcError
from ftc.runtime.model_file import ModelFile

from .common import CodeFiles, user_source


@contextlib.contextmanager
def buffer_assignments_as_copies(model: torch.nn.Module, model_file: ModelFile, code: CodeFiles) -> Iterator[None]:
    """While the block runs, `module.name = tensor` for a buffer of `model` copies the tensor into
    the buffer (`module.name.copy_(tensor)`)."""
    paths = {id(module): path for path, module in model.named_modules()}
    setattr_ = torch.nn.Module.__setattr__

    def assign(module: torch.nn.Module, name: str, value) -> None:
        buffers = module.__dict__.get("_buffers", {})
        buffer = buffers.get(name)
        if id(module) not in paths or not isinstance(value, torch.Tensor) or buffer is None or value is buffer:
            setattr_(module, name, value)
            return
        if value.shape != buffer.shape or value.dtype != buffer.dtype:
            qualified = f"{paths[id(module)]}.{name}".lstrip(".")
            raise FtcError(
                f"{user_source(model_file, code) or model_file.path}: forward assigns buffer {qualified} "
                f"({buffer.dtype}, shape {tuple(buffer.shape)}) a tensor of {value.dtype}, shape {tuple(value.shape)}: "
                "torch.export records no assignment of a buffer, only writes into it, and no write into it can change "
                "its shape or dtype",
                f"give {qualified} in __init__ the shape and dtype forward assigns it",
            )
        buffer.copy_(value)

    torch.nn.Module.__setattr__ = assign
    try:
        yield
    finally:
        torch.nn.Module.__setattr__ = setattr_
