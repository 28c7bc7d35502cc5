"""Tensors held on several ranks (a weight tied under two names, a module that stages on two
devices share) must start training equal on every rank: from then on only their gradients are
summed, so copies that start apart train apart, and merging the checkpoint keeps one of them,
which hides it. Seeding makes every rank's build_model() draw the same values; this check
catches the builds that seeding cannot reach (os.urandom, the time, a generator ftc does not
know) before the first step.
"""

from __future__ import annotations

import hashlib

import torch

from ftc.ir import FtcError

from .pipeline import Pipeline


def holders(pipeline: Pipeline) -> dict[str, dict[int, list[str]]]:
    """Each tensor held on several devices, by its first name (pipeline.json's "tied"): device ->
    the names its stages there hold it under."""
    first_name = pipeline.tied
    held: dict[str, dict[int, list[str]]] = {}
    for stage in pipeline.stages:
        for name in stage.state:
            names = held.setdefault(first_name.get(name, name), {}).setdefault(stage.device, [])
            if name not in names:
                names.append(name)
    return {key: devices for key, devices in sorted(held.items()) if len(devices) > 1}


def digests(pipeline: Pipeline, stages: dict[int, torch.nn.Module]) -> dict[str, str]:
    """First name -> a digest of this rank's copy (dtype, shape and bytes), for each tensor of
    `stages` that other ranks hold too."""
    shared = holders(pipeline)
    first_name = pipeline.tied
    found: dict[str, str] = {}
    for stage in stages.values():
        named = dict(stage.named_parameters(remove_duplicate=False)) | dict(stage.named_buffers(remove_duplicate=False))
        for name, tensor in named.items():
            key = first_name.get(name, name)
            if key in shared and key not in found:
                found[key] = _digest(tensor)
    return found


def check_equal(pipeline: Pipeline, by_rank: list[dict[str, str]]) -> None:
    """Fail, naming the tensors and the ranks, where the ranks' digests of one tensor differ."""
    problems = []
    for key, devices in holders(pipeline).items():
        copies = {rank: by_rank[rank][key] for rank in sorted(devices) if key in by_rank[rank]}
        if len(set(copies.values())) > 1:
            held = ", ".join(f"rank {rank} as {' and '.join(devices[rank])}" for rank in copies)
            kind = "tied weight" if key in pipeline.tied.values() else "tensor"
            problems.append(f"{kind} {key} (held by {held})")
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        # The cause goes in the message: the launcher's report of a failed rank shows only that.
        raise FtcError(
            f"the ranks built different values for what they share: {shown}. build_model() draws from a random "
            "source ftc does not seed (it seeds Python's random, NumPy's global generator and torch's with the "
            "config's seed before each build); copies that start apart would train apart",
            "seed that source in build_model() with a fixed number, or draw with torch's generator; or pass the "
            "initial weights as the config's init",
        )


def _digest(tensor: torch.Tensor) -> str:
    value = tensor.detach().cpu()
    if value.layout != torch.strided:
        value = value.to_dense()
    digest = hashlib.sha256(f"{value.dtype}{tuple(value.shape)}".encode())
    digest.update(value.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
