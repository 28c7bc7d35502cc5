"""Train and eval mode as the original model sets them.

Stages adopt the model's submodules by reference, so the model's own `train(mode)`, an override
included (fine-tuning code that keeps its BatchNorm layers in eval mode, say), sets the flags of
the very modules the stages run. torch.nn.Module.train on a stage would instead set every adopted
module to `mode`, undoing such an override: the stages' mode is therefore set through the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from ftc.ir import FtcError

from .model_file import user_frame


def set_mode(model: torch.nn.Module, stages: Iterable[torch.nn.Module], training: bool) -> None:
    """`model.train(training)`, which sets the adopted submodules' flags; a stage's own flag,
    which its code reads as `self.training` where the model's forward read it, and those of the
    containers a stage makes itself follow the model's own flag."""
    train_model(model, training)
    adopted = {id(module) for module in model.modules()}
    for stage in stages:
        for module in stage.modules():
            if id(module) not in adopted:
                module.training = model.training


def train_model(model: torch.nn.Module, training: bool, model_path: Path | None = None) -> None:
    """`model.train(training)`, with an error naming the model's class (and the line of the model
    file at `model_path`) where an override raises."""
    try:
        model.train(training)
    except Exception as exc:
        file = f"{model_path}: " if model_path is not None else ""
        line = user_frame(exc, model_path) if model_path is not None else ""
        raise FtcError(
            f"{file}{type(model).__name__}.train({training}) raised {type(exc).__name__}: {exc}{line}",
            "ftc calls the model's train() as a training loop does, where its tensors may be on the meta device "
            "(when compiling; in modes local and dist, those of the stages a process does not run): make train() "
            "set modes without reading tensor values",
        ) from exc
