"""The loss call the pipeline engine and mode single share, and the hint both give for a forward
that BatchNorm refused a micro-batch of one sample."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from ftc.ir import FtcError

from .model_file import user_error


def one_sample_hint(exc: Exception, hint: str) -> str:
    """The fix for a forward that failed, where BatchNorm refused a micro-batch of one sample: the
    config's batch_size / micro_batches made it, not the data."""
    if "Expected more than 1 value per channel when training" not in str(exc):
        return hint
    return ("a BatchNorm in training mode needs more than one value per channel, and a micro-batch of 1 sample "
            "(batch_size / micro_batches) gives it one: lower micro_batches or raise batch_size")


def call_loss(loss_fn: Callable, output: Any, target: Any) -> torch.Tensor:
    """loss_fn(output, target), which must be a one-element tensor; a failure is named as the
    loss's, with its line."""
    try:
        loss = loss_fn(output, target)
    except FtcError:
        raise
    except Exception as exc:
        source = inspect.getsourcefile(loss_fn) if inspect.isfunction(loss_fn) else None
        raise user_error(exc, f"the loss {getattr(loss_fn, '__qualname__', loss_fn)}(output, target)",
                         [source] if source else [], "check that the data set's targets fit the loss "
                         "(shapes, dtypes) and the model's output") from exc  # fmt: skip
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = list(loss.shape) if isinstance(loss, torch.Tensor) else ""
        raise FtcError(f"loss_fn returned {type(loss).__name__}{shape}", "return a scalar tensor")
    if torch.is_grad_enabled() and not loss.requires_grad:  # evaluation runs without autograd
        # Backward would fail inside autograd ("element 0 of tensors does not require grad").
        raise FtcError(f"loss_fn returned a tensor ({str(loss.dtype).removeprefix('torch.')}) that has no gradient: "
                       "it does not come from the model's output by differentiable operations",
                       "return the loss computed from output, without .detach(), torch.no_grad() or an integer "
                       "count (an accuracy belongs outside loss_fn)")  # fmt: skip
    return loss
