"""Activation memory (Cost.peak_memory) is the bytes of the tensor storages the node's forward
saves for backward (torch.autograd.graph.saved_tensors_hooks), parameters and buffers left
out, each storage counted once model-wide, for the first node that saves it: summed over a
stage's nodes it is what the stage holds per micro-batch between its forward and backward. (In
save-memory mode every node runs on copies of its inputs, so a tensor two nodes save counts
for both.) In context, Cost.transient_memory is the bytes of the storages a node's outputs are
new in (no view or in-place result of an input) that no node saves: a stage's forward keeps
them until it returns. Save-memory mode leaves it unset (the memory estimate then takes every
output of the node as such)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class SavedBytes:
    """Counts the storages autograd saves for backward, once each, for the node saving first."""

    def __init__(self, state: list[torch.Tensor]):
        self.excluded = {t.untyped_storage().data_ptr() for t in state if t.device.type != "meta"}
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = {}
        self.made: dict[str, dict[int, int]] = {}  # node -> data_ptr -> bytes of its new outputs

    def record_made(self, name: str, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        """Remember the storages a node's outputs are new in: none of its inputs shares them (no
        view, no in-place result), no parameter or buffer."""
        reused = {t.untyped_storage().data_ptr() for t in inputs} | self.excluded
        self.made[name] = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in outputs if t.untyped_storage().data_ptr() not in reused
        }  # fmt: skip

    def transient(self) -> dict[str, int]:
        """Bytes of the storages each node made that no node saved, after a whole forward (its
        values all alive, so that no address was reused)."""
        return {name: sum(n for key, n in made.items() if key not in self.seen) for name, made in self.made.items()}

    @contextlib.contextmanager
    def counting(self, name: str) -> Iterator[None]:
        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in self.excluded and key not in self.seen:
                self.seen.add(key)
                self.bytes[name] = self.bytes.get(name, 0) + storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield
