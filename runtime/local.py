"""The local executor: every stage in one process, run the way a pipeline runs them.

Each stage receives its inputs cut from the producer's autograd graph (as if they had crossed a
device boundary), and the backward pass walks the stages in reverse, handing each stage the
summed gradients of the values it sent. So what passes here is what a distributed run computes,
only without the transport.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch

from ftc.ir import FtcError

from .comm import gradient_problems, unsendable
from .materialize import check_tied, construct_stage
from .pipeline import Pipeline, StageSpec, check_stage_outputs


def _receive(value: Any) -> Any:
    """A value as a stage receives it: a tensor becomes a fresh leaf (requiring grad if the
    sender's did), everything else passes unchanged."""
    if isinstance(value, torch.Tensor):
        leaf = value.detach()
        return leaf.requires_grad_() if value.requires_grad else leaf
    return value


class LocalExecutor:
    def __init__(self, pipeline: Pipeline, model: torch.nn.Module, device: torch.device | str | None = None):
        self.pipeline = pipeline
        self.specs = pipeline.stages
        check_tied(model, pipeline)
        self.stages = [construct_stage(pipeline.stage_class(spec), model, pipeline, spec) for spec in self.specs]
        if device is not None:
            self.stages = [stage.to(device) for stage in self.stages]
        # What each stage sent and received in the last forward, kept until its backward.
        self.sent: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        self._outputs: dict[str, Any] = {}

    def parameters(self) -> list[torch.nn.Parameter]:
        """Each parameter once, also when several stages hold it (tied weights)."""
        seen: dict[int, torch.nn.Parameter] = {}
        for stage in self.stages:
            for param in stage.parameters():
                seen.setdefault(id(param), param)
        return list(seen.values())

    def forward(self, batch: tuple | dict) -> Any:
        """Run every stage in order on one batch; return the model's output structure, whose
        tensors are leaves: call `backward(loss)` with a loss computed from them."""
        names = self.pipeline.inputs
        if isinstance(batch, dict):
            values = dict(batch)
        else:
            if len(batch) != len(names):
                raise FtcError(f"the pipeline takes {len(names)} inputs ({names}), got {len(batch)}")
            values = dict(zip(names, batch))
        missing = [name for name in names if name not in values]
        if missing:
            raise FtcError(f"the batch lacks pipeline inputs {missing}")
        self.sent, self.received = [], []
        scale = self._batch_scale(values)
        for spec, stage in zip(self.specs, self.stages):
            received = {name: _receive(values[name]) for name in spec.inputs}
            result = stage(*(received[name] for name in spec.inputs))
            check_stage_outputs(spec, result)
            sent = dict(zip(spec.outputs, result))
            self._check_shapes(spec, sent, scale)
            values.update(sent)
            self.received.append(received)
            self.sent.append(sent)
        self._outputs = {name: _receive(values[name]) for name in self.pipeline.outputs}
        return self.pipeline.assemble_output(self._outputs)

    def _batch_scale(self, inputs: dict[str, Any]) -> Fraction:
        """This batch's size over the compile batch size, read from an input with a batch dimension."""
        specs = self.pipeline.manifest["values"]
        for name in self.pipeline.inputs:
            spec, value = specs.get(name, {}), inputs.get(name)
            if spec.get("kind") == "tensor" and spec.get("batch_dim") is not None and isinstance(value, torch.Tensor):
                return Fraction(value.shape[spec["batch_dim"]], spec["shape"][spec["batch_dim"]])
        return Fraction(1)

    def _check_shapes(self, spec: StageSpec, sent: dict[str, Any], scale: Fraction) -> None:
        """A stage's outputs must be what pipeline.json says (a hand edit may change a shape, which
        the next stage or the backward would meet far from its cause)."""
        problems = unsendable(sent, self.pipeline.manifest["values"], scale)
        if torch.is_grad_enabled():
            problems += gradient_problems(sent, self.pipeline.manifest["values"])
        if problems:
            raise FtcError(f"{spec.file}: {problems[0]}", self.pipeline.output_shape_fix(spec))

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate `loss` (computed from forward's output) through the stages in reverse."""
        loss.backward()
        grads: dict[str, torch.Tensor] = {}

        def collect(received: dict[str, Any]) -> None:
            for name, value in received.items():
                if isinstance(value, torch.Tensor) and value.grad is not None:
                    grads[name] = grads[name] + value.grad if name in grads else value.grad

        collect(self._outputs)
        for sent, received in zip(reversed(self.sent), reversed(self.received)):
            pairs = [
                (value, grads[name])
                for name, value in sent.items()
                if name in grads and isinstance(value, torch.Tensor) and value.requires_grad
            ]
            if pairs:
                torch.autograd.backward([v for v, _ in pairs], [g for _, g in pairs])
            collect(received)
        self.sent, self.received, self._outputs = [], [], {}
