"""Fault injection (config key inject_fault), a testing aid: a rank exits, hangs or turns its
weights to NaN at a given step, so that tests see how the launcher and the other ranks report
it. Kept apart from the training loop, which only calls inject_fault at each step."""

from __future__ import annotations

import os
import time

import torch

from ftc.ir import FtcError

from .config import Config
from .rank import Rank


def check_fault_rank(config: Config, world_size: int) -> None:
    """An injected fault must name a rank of the run (modes single and local: rank 0), or it
    never strikes and a test of the fault passes without one."""
    fault = config.inject_fault
    if fault is not None and fault.rank >= world_size:
        raise FtcError(f"config {config.source}: key 'inject_fault.rank' is {fault.rank}, but the run has "
                       f"{world_size} process(es) (mode {config.mode}), ranks 0 to {world_size - 1}")  # fmt: skip


def inject_fault(config: Config, me: Rank, step: int, modules: list[torch.nn.Module]) -> None:
    fault = config.inject_fault
    if fault is None or fault.rank != me.rank or fault.step != step:
        return
    if fault.kind == "exit":
        os._exit(3)
    if fault.kind == "hang":
        while True:
            time.sleep(1)
    with torch.no_grad():
        for module in modules:
            for param in module.parameters():
                param.fill_(float("nan"))
