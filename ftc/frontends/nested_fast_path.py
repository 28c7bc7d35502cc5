"""nn.TransformerEncoder's nested-tensor fast path, which changes its eval outputs.

In eval mode without gradients, an nn.TransformerEncoder built with `enable_nested_tensor=True`
(torch's default; torch turns it off itself for `norm_first=True` or `batch_first=False`) and
called with a `src_key_padding_mask` and no `mask` packs its input into a nested tensor and
unpacks the result with zeros at the padded positions, where its training-mode code (the one
torch.export traces and lowers into the stages) gives them the values every other position
gets. The stages are exact in training and at the positions the mask keeps; in eval mode the
padded positions differ. So the compile names such an encoder, and `ftc check` leaves its eval
outputs unjudged as for any branch on self.training the stages do not follow.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch

from ftc.ir import Node


@contextlib.contextmanager
def padding_masked_encoders(model: torch.nn.Module) -> Iterator[set[str]]:
    """While forward runs, collects the paths of the model's nn.TransformerEncoders that take the
    nested-tensor path in eval mode: built for it, and called with a padding mask and no mask."""
    found: set[str] = set()

    def watch(path: str, encoder: torch.nn.TransformerEncoder):
        signature = inspect.signature(encoder.forward)

        def hook(module, args, kwargs):
            call = signature.bind(*args, **kwargs).arguments
            if call.get("src_key_padding_mask") is not None and call.get("mask") is None:
                found.add(path)

        return encoder.register_forward_pre_hook(hook, with_kwargs=True)

    handles = [
        watch(path, module)
        for path, module in model.named_modules()
        if isinstance(module, torch.nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False)
    ] if torch.backends.mha.get_fastpath_enabled() else []  # fmt: skip
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def zeroed_in_eval(encoders: set[str], nodes: list[Node]) -> dict[str, str]:
    """Of `encoders` (padding_masked_encoders), those the graph lowers into ops rather than calls
    whole, each with the model's line that calls it."""
    lines = {}
    for node in nodes:
        for path in encoders:
            inside = node.module_path == path or node.module_path.startswith(f"{path}.")
            if inside and node.op != "call_module" and path not in lines:
                lines[path] = node.source or path
    return lines


def fast_path_note(path: str, line: str) -> str:
    return (
        f"nn.TransformerEncoder {path!r} ({line}) is given a src_key_padding_mask: in eval mode without gradients "
        "torch runs it on nested tensors and returns zeros at the padded positions, where the stages (its ops as "
        "training runs them) give those positions values, so their eval outputs differ there (training is exact); "
        "build it with enable_nested_tensor=False for eval outputs equal to the model's, or list "
        "nn.TransformerEncoder in LEAF_MODULES to keep it whole (no stage boundary inside it)"
    )
