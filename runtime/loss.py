"""The loss call the pipeline engine and mode single share, and the hint both give for a forward
that failed on the data or the config (a micro-batch of one sample, a token id past the vocabulary)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from ftc.ir import FtcError

from .model_file import user_error


def forward_failure_hint(exc: Exception, hint: str) -> str:
    """The fix for a forward that failed, where the cause is known to be the data's or the config's
    rather than the model's: BatchNorm refused a micro-batch of one sample (batch_size /
    micro_batches made it), or an embedding got a token id past its rows; `hint` otherwise."""
    if "Expected more than 1 value per channel when training" in str(exc):
        return ("a BatchNorm in training mode needs more than one value per channel, and a micro-batch of 1 sample "
                "(batch_size / micro_batches) gives it one: lower micro_batches or raise batch_size")
    if isinstance(exc, IndexError) and "index out of range in self" in str(exc):
        return ("an embedding (or index_select) got an index at or past its number of rows: the data's token ids "
                "must be below the model's vocabulary size (the bytes data set gives ids 0-255, so a model trained "
                "on it needs an embedding of 256 rows or more)")
    return hint


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
        raise FtcError(f"loss_fn {getattr(loss_fn, '__qualname__', loss_fn)} returned {type(loss).__name__}{shape}, "
                       "not a one-element tensor", "return a scalar tensor (the mean over the batch, say)")
    if torch.is_grad_enabled() and not loss.requires_grad:  # evaluation runs without autograd
        # Backward would fail inside autograd ("element 0 of tensors does not require grad").
        raise FtcError(f"loss_fn returned a tensor ({str(loss.dtype).removeprefix('torch.')}) that has no gradient: "
                       "it does not come from the model's output by differentiable operations",
                       "return the loss computed from output, without .detach(), torch.no_grad() or an integer "
                       "count (an accuracy belongs outside loss_fn)")  # fmt: skip
    return loss
