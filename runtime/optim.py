"""Optimizers and learning-rate schedules from the config, over one rank's parameters.

The schedule is a LambdaLR whose factor is a pure function of the optimizer step, so a resumed
run (which restores the step) follows the same learning rates as an uninterrupted one.
"""

from __future__ import annotations

import math

import torch

from .config import LrScheduleConfig, OptimizerConfig


def build_optimizer(parameters: list[torch.nn.Parameter], config: OptimizerConfig) -> torch.optim.Optimizer:
    if config.name == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                               weight_decay=config.weight_decay)  # fmt: skip
    cls = torch.optim.Adam if config.name == "adam" else torch.optim.AdamW
    return cls(parameters, lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay)


def lr_factor(step: int, config: LrScheduleConfig, lr: float, steps: int) -> float:
    """The multiplier of the base lr at optimizer step `step` (0-based) of `steps`: a linear
    warmup from 1/warmup_steps to 1, then constant, or a linear or cosine decay that would reach
    min_lr at step `steps`, one past the last (as transformers' schedules do), so that the last
    step still learns."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.name == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, steps - config.warmup_steps))
    floor = config.min_lr / lr
    if config.name == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: LrScheduleConfig, lr: float, steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config, lr, steps))
