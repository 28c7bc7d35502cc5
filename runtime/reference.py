"""Mode single: the original model trained the plain way in one process, the reference the
pipeline modes must match. It offers the pipeline engine's interface, so that the training loop
runs it as it runs a pipeline."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable

import torch

from .config import Config
from .data import map_with_dims
from .loss import call_loss, forward_failure_hint
from .materialize import load_checkpoint
from .mode import train_model
from .model_file import ModelFile, user_error
from .precision import failure_hint
from .seeding import seed_generators


class SingleProcess:
    """The original model trained the plain way; the same interface as the pipeline engine."""

    def __init__(
        self, model: torch.nn.Module, loss_fn: Callable, micro_batches: int, batch_dims: dict[str, int | None],
        target_dims: Any = 0, autocast: Callable[[], Any] = contextlib.nullcontext, precision: str = "fp32",
    ):  # fmt: skip
        self.model = model
        # precision bf16: each micro-batch's forward and loss in an autocast region of its own, as
        # the pipeline runs each stage's (backward outside it, as torch recommends)
        self.autocast = autocast
        self.precision = precision  # what `autocast` runs, named in the fix for a failing forward
        self.loss_fn = loss_fn
        self.micro_batches = micro_batches
        self.batch_dims = batch_dims  # input name -> its batch dimension (None: shared by all samples)
        self.target_dims = target_dims  # the targets' batch dimensions (datasets.target_batch_dims)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def _micro_inputs(self, inputs: tuple | dict, i: int) -> tuple | dict:
        def cut(tensor: torch.Tensor, dim: int | None) -> torch.Tensor:
            # A copy, as the pipeline gives each micro-batch: forward may change its input in place.
            return (tensor if dim is None else tensor.chunk(self.micro_batches, dim)[i]).clone()

        if isinstance(inputs, dict):
            return {name: cut(value, self.batch_dims.get(name, 0)) for name, value in inputs.items()}
        dims = list(self.batch_dims.values())
        return tuple(cut(value, dims[k] if k < len(dims) else 0) for k, value in enumerate(inputs))

    def train_step(self, step: int, inputs: Any, targets: Any, loss_scale: float = 1.0) -> float:
        losses = []
        for i in range(self.micro_batches):
            x = self._micro_inputs(inputs, i)
            y = map_with_dims(lambda t, dim: t if dim is None else t.chunk(self.micro_batches, dim)[i], targets, self.target_dims)
            with self.autocast():
                loss = call_loss(self.loss_fn, self._forward(x, i), y)
            (loss * (loss_scale / self.micro_batches)).backward()
            losses.append(loss.detach().reshape(()).to(torch.float64))
        # One read of the device per step, as the engine's mean_loss.
        return (torch.stack(losses).sum() / self.micro_batches).item()

    def _forward(self, x: tuple | dict, i: int, evaluating: bool = False) -> Any:
        try:
            return self.model(**x) if isinstance(x, dict) else self.model(*x)
        except Exception as exc:
            raise user_error(exc, f"the model ({type(self.model).__name__}), micro-batch {i}"
                             f"{' of a held-out batch, in eval mode' if evaluating else ''},",
                             [inspect.getsourcefile(type(self.model)) or ""],
                             failure_hint(self.precision, forward_failure_hint(
                                 exc, "check the data against the model file's example_inputs (shapes, dtypes)"))
                             ) from exc  # fmt: skip

    def sync_shared_grads(self) -> None:
        """Nothing to do: one process holds every parameter once."""

    def clip_gradients(self, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))

    def evaluate(self, step: int, inputs: Any, targets: Any) -> tuple[float, Any]:
        """The batch's mean loss over its micro-batches, without gradients (eval mode is the
        caller's), as the engine's evaluate."""
        losses = []
        with torch.no_grad():
            for i in range(self.micro_batches):
                x = self._micro_inputs(inputs, i)
                y = map_with_dims(lambda t, dim: t if dim is None else t.chunk(self.micro_batches, dim)[i], targets, self.target_dims)
                with self.autocast():
                    loss = call_loss(self.loss_fn, self._forward(x, i, evaluating=True), y)
                losses.append(loss.reshape(()).to(torch.float64))
        return (torch.stack(losses).sum() / self.micro_batches).item(), None


def build_single(config: Config, model_file: ModelFile, device: torch.device) -> torch.nn.Module:
    seed_generators(config.seed)
    model = model_file.build()
    if config.init is not None:
        # the pipeline modes' reader, so their errors match
        load_checkpoint({0: model}, config.init, set(model.state_dict(keep_vars=True)))
    # As a plain loop does: the model's own train() may keep some layers in eval mode.
    train_model(model, True)
    return model.to(device)
