"""What a measured profile holds (per node, the stage call, the loss, the kinds' costs; as JSON for
the cache) and the settings it is measured under."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ftc.ir import FtcError

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class MeasureSettings:
    device: str = "cpu"
    threads: int = 1  # intra-op CPU threads while measuring
    warmup: int = 2
    repeats: int = 5
    save_memory: bool | None = None  # None: when the parameters take SAVE_MEMORY_FRACTION of the device

    def check(self) -> None:
        if self.device not in DEVICES:
            raise FtcError(f"unknown --device {self.device!r}", f"use one of: {', '.join(DEVICES)}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise FtcError("--device cuda: torch finds no CUDA device here", "measure with --device cpu")
        for key in ("threads", "repeats"):
            if getattr(self, key) < 1:
                raise FtcError(f"--{key} must be at least 1, got {getattr(self, key)}")
        if self.warmup < 0:
            raise FtcError(f"warmup must be 0 or more, got {self.warmup}")


@dataclass
class NodeProfile:
    fwd_time: float = 0.0  # seconds
    bwd_time: float = 0.0
    peak_memory: int = 0  # bytes saved for backward
    transient_memory: int | None = None  # bytes of new outputs nothing saves (None: not counted)

    def to_json(self) -> dict:
        return {"fwd_time": self.fwd_time, "bwd_time": self.bwd_time, "peak_memory": self.peak_memory,
                "transient_memory": self.transient_memory}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict) -> NodeProfile:
        transient = data.get("transient_memory")  # absent from profiles cached before it was counted
        return cls(float(data["fwd_time"]), float(data["bwd_time"]), int(data["peak_memory"]),
                   None if transient is None else int(transient))  # fmt: skip


@dataclass
class Measurement:
    nodes: dict[str, NodeProfile]  # compute node name -> what it costs
    save_memory: bool
    outputs: Any = None  # the model's outputs in the last run, on the host
    stage_call: NodeProfile = field(default_factory=NodeProfile)  # what calling any stage costs
    loss: NodeProfile | None = None  # loss_fn on the outputs (None: no loss, see loss.py)
    kinds: dict[str, NodeProfile] = field(default_factory=dict)  # Graph.kind_costs (in context only)

    def to_json(self) -> dict:
        return {
            "nodes": {name: profile.to_json() for name, profile in self.nodes.items()},
            "stage_call": self.stage_call.to_json(),
            "loss": self.loss.to_json() if self.loss is not None else None,
            "kinds": {kind: profile.to_json() for kind, profile in self.kinds.items()},
        }

    @classmethod
    def from_json(cls, data: dict, save_memory: bool) -> Measurement:
        nodes = {name: NodeProfile.from_json(entry) for name, entry in data["nodes"].items()}
        loss = NodeProfile.from_json(data["loss"]) if data["loss"] is not None else None
        kinds = {kind: NodeProfile.from_json(entry) for kind, entry in data["kinds"].items()}
        return cls(nodes, save_memory, stage_call=NodeProfile.from_json(data["stage_call"]), loss=loss, kinds=kinds)


def to_host(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    host = value.detach().to("cpu")
    return host.requires_grad_() if value.requires_grad else host
