"""What each stage of a generated pipeline spends sending and receiving values, from pipeline.json
alone: the compiler's cost model (ftc/passes/partition/problem.py, member_comm) applied to the
stages, devices and value specs the manifest holds now, so that a device map edited by hand is
priced the way the runtime will run it.

A value moves over the link only to a stage on another device: the runtime hands it to a stage on
its producer's device in memory (runtime/message_plan.py sends messages to other devices only). Its
producer pays its bytes once when any stage on another device reads it, and each such stage pays
them once: forward for the value, backward for its gradient when it carries one. The model's
outputs are read by the last stage, which computes the loss; model inputs come with the batch to
every device that reads them, free.
"""

from __future__ import annotations

import math

from ftc.ir import FtcError, Meta, OtherMeta, ScalarMeta, SeqMeta, TensorMeta
from ftc.passes.partition.problem import comm_bytes, gradient_bytes
from ftc.runtime.pipeline import Pipeline

SCALARS = ("int", "float", "bool")


def stage_communication(pipeline: Pipeline) -> dict[int, tuple[float, float]]:
    """Stage index -> seconds of (forward, backward) communication at the compile batch size."""
    bandwidth = link_bandwidth(pipeline)
    device = {s.index: s.device for s in pipeline.stages}
    producer = {name: s.index for s in pipeline.stages for name in s.outputs}
    readers: dict[str, set[int]] = {}
    for stage in pipeline.stages:
        for name in stage.inputs:
            if name in producer:
                readers.setdefault(name, set()).add(stage.index)
    loss_stage = pipeline.stages[-1].index
    for name in pipeline.outputs:
        if name in producer:
            readers.setdefault(name, set()).add(loss_stage)
    moved = {s.index: [0, 0] for s in pipeline.stages}  # bytes: forward, backward
    for name, stages in readers.items():
        source = producer[name]
        remote = sorted(r for r in stages if device[r] != device[source])
        if not remote:
            continue
        meta = value_meta(pipeline.manifest["values"][name])
        backward = gradient_bytes(meta)
        for stage in (source, *remote):
            moved[stage][0] += comm_bytes(meta) - backward
            moved[stage][1] += backward
    return {index: (forward / bandwidth, backward / bandwidth) for index, (forward, backward) in moved.items()}


def link_bandwidth(pipeline: Pipeline) -> float:
    """Bytes per second between devices: the `--bandwidth` (GB/s) the pipeline was compiled with."""
    gbps = pipeline.manifest.get("settings", {}).get("bandwidth")
    if isinstance(gbps, bool) or not isinstance(gbps, (int, float)) or not 0 < gbps < math.inf:
        raise FtcError(
            f"{pipeline.folder / 'pipeline.json'}: settings key 'bandwidth' is {gbps!r}; it must be the link "
            "bandwidth in GB/s, a positive number",
            "undo the hand edit, or recompile the pipeline with `ftc compile`",
        )
    return gbps * 1e9


def value_meta(spec: dict) -> Meta:
    """The IR metadata of a value spec (backend/writer.py value_spec; checked by load_pipeline)."""
    kind = spec["kind"]
    if kind == "tensor":
        return TensorMeta(list(spec["shape"]), spec["dtype"], spec["requires_grad"], spec["batch_dim"],
                          list(spec.get("other_batch_dims", [])))  # fmt: skip
    if kind in SCALARS:
        return ScalarMeta(kind, 0)
    if "items" in spec:
        return SeqMeta(kind, [value_meta(item) for item in spec["items"]])
    return OtherMeta(kind)
