"""Who this process is in a run: its rank, the world, the device it trains on and its share of
the pipeline's stages. Separate because the training loop, checkpoints (resume.py), fault
injection (faults.py) and the torchrun worker all ask it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ftc.ir import FtcError

from .config import Config
from .pipeline import Pipeline


@dataclass
class Rank:
    """Who this process is: its rank, the world, and its share of the pipeline."""

    rank: int
    world_size: int
    device: torch.device
    stages: list[int]


def plan_rank(config: Config, pipeline: Pipeline, rank: int, world_size: int, device: torch.device) -> Rank:
    if config.mode != "dist":
        return Rank(0, 1, device, [s.index for s in pipeline.stages])
    return Rank(rank, world_size, device, [s.index for s in pipeline.stages if s.device == rank])


def training_device(config: Config, rank: int) -> torch.device:
    """The config's device; in mode dist on CUDA, this rank's GPU (ranks beyond the GPU count
    share GPUs round-robin, which only gloo allows)."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise FtcError(f"config {config.source}: key 'device' is \"cuda\", but torch here sees no CUDA device "
                       f"(torch {torch.__version__})", 'set device to "cpu", or install a CUDA build of torch')  # fmt: skip
    if config.device == "cuda" and config.mode == "dist":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    return torch.device(config.device)
