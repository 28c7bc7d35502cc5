"""Mixed precision (config key `precision`): what runs under torch.autocast, and the dtypes the
values crossing devices then have.

`precision: "bf16"` runs every stage forward (a recomputed one too) and the loss under
`torch.autocast(device.type, dtype=torch.bfloat16)`, in every mode: mode single wraps the
original model's forward and loss alike, one autocast region per micro-batch, so the pipeline
modes compute what it computes. Backward runs outside autocast, as torch recommends: each op's
backward runs in the dtype its forward ran in. Parameters, their gradients and the optimizer
state stay float32; bfloat16 has float32's exponent range, so gradients need no loss scaling.

Under autocast a stage may return bfloat16 where pipeline.json (traced in float32) records
float32. The runtime sizes its receive buffers from pipeline.json's specs, with no shapes or
dtypes exchanged per step, so before training it learns the dtypes each value has under
autocast: it runs the stages once on FakeTensors (no data, no compute, no memory; parameters and
buffers are fake copies, so nothing is updated; a scalar buffer's copy keeps its value, which
forward may read) under the same autocast, in pipeline order, from
the pipeline inputs' specs. In mode dist each rank runs its own stages and the ranks exchange
what they learned (dtype, shape, and the value of a Python number) at start-up, in rounds until
every value is known; every rank then holds the same specs, so the message plan stays the same
on every rank. A stage output whose dtype then differs from these specs is still an error at the
send (runtime/comm.py encode), never a silent conversion, and a gradient always has its value's
dtype: the receiver's leaf has the spec's dtype, and autograd gives a leaf's gradient its dtype.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable

import torch

from ftc.ir import FtcError

from .pipeline import Pipeline, check_stage_outputs

# each of config.PRECISIONS -> its autocast dtype (None: no autocast)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """The context a forward and the loss run in: a fresh autocast region (its cache of weight
    casts lives as long as the region), or nothing under fp32."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def failure_hint(precision: str, hint: str) -> str:
    """The fix for a forward that failed: under bf16 the cause may be an op without a bfloat16
    kernel on this device, which fp32 does not meet."""
    if AUTOCAST_DTYPES[precision] is None:
        return hint
    return ("it ran under bfloat16 autocast (the config's \"precision\": \"bf16\"), where an op without a bfloat16 "
            "kernel on this device fails (torch's CPU LSTM does, given a float32 input): if it trains with "
            f"\"precision\": \"fp32\", keep that; else {hint}")  # fmt: skip


def check_device(precision: str, device: torch.device, source: str) -> None:
    """bf16 on a GPU that has no bfloat16 arithmetic is refused before training."""
    if AUTOCAST_DTYPES[precision] is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise FtcError(f"config {source}: key 'precision' is \"bf16\", but {torch.cuda.get_device_name(device)} "
                       "has no bfloat16 arithmetic", 'set precision to "fp32"')  # fmt: skip


# Descriptions of values, which ranks exchange (picklable): a tensor as ("tensor", shape, dtype,
# requires_grad), a sequence as ("sequence", kind, [items]), a Python number as ("python", value),
# anything else as ("object",), which cannot cross devices anyway.


def _describe(value: Any) -> tuple:
    if isinstance(value, torch.Tensor):
        return ("tensor", list(value.shape), str(value.dtype).removeprefix("torch."), value.requires_grad)
    if isinstance(value, torch.Size):
        return ("python", value)
    if isinstance(value, (tuple, list)):
        return ("sequence", type(value).__name__, [_describe(item) for item in value])
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("python", value)
    return ("object",)


def _spec_description(spec: dict) -> tuple:
    """A pipeline input as its spec describes it."""
    if spec["kind"] == "tensor":
        return ("tensor", list(spec["shape"]), spec["dtype"], False)
    if spec["kind"] in ("tuple", "list", "size"):
        return ("sequence", spec["kind"], [_spec_description(item) for item in spec["items"]])
    return ("object",)


def _fake(description: tuple, mode, device: torch.device, name: str) -> Any:
    kind = description[0]
    if kind == "tensor":
        _, shape, dtype, requires_grad = description
        with mode:
            tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        return tensor.requires_grad_(requires_grad and (tensor.is_floating_point() or tensor.is_complex()))
    if kind == "sequence":
        items = [_fake(item, mode, device, name) for item in description[2]]
        return torch.Size(items) if description[1] == "size" else {"tuple": tuple, "list": list}[description[1]](items)
    if kind == "python":
        return description[1]
    raise FtcError(f"value {name} is no tensor, and what it holds is not known before training, so the stages "
                   "reading it cannot run on FakeTensors to learn their dtypes under autocast",
                   'set precision to "fp32"')  # fmt: skip


def _with_dtypes(spec: dict, description: tuple) -> dict:
    """`spec` with the dtypes of `description`, where both are tensors (or sequences of them)."""
    if spec["kind"] == "tensor" and description[0] == "tensor":
        if description[2] == spec["dtype"]:
            return spec
        return {**spec, "dtype": description[2], "compiled_dtype": spec["dtype"]}
    if spec["kind"] in ("tuple", "list", "size") and description[0] == "sequence" and len(description[2]) == len(spec["items"]):
        return {**spec, "items": [_with_dtypes(item, d) for item, d in zip(spec["items"], description[2])]}
    return spec


def value_specs(
    pipeline: Pipeline,
    modules: dict[int, torch.nn.Module],
    device: torch.device | str,
    precision: str,
    exchange: Callable[[dict[str, tuple]], list[dict[str, tuple]]] | None = None,
) -> dict[str, dict]:
    """pipeline.json's value specs with each value's dtypes as the stages produce it under
    `precision`'s autocast (the specs themselves under fp32). `modules`: the stages this process
    runs; `exchange` (mode dist): every rank's descriptions of the values it learned, from each
    rank's own (a collective, called the same number of times on every rank)."""
    specs = pipeline.manifest["values"]
    if AUTOCAST_DTYPES[precision] is None:
        return specs
    from torch._subclasses.fake_tensor import FakeTensorMode

    device = torch.device(device)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    described: dict[str, tuple] = {name: _spec_description(specs[name]) for name in pipeline.inputs if name in specs}
    local: dict[str, Any] = {}  # the fake values this process's stages produced, objects included
    stages = pipeline.stages
    ran: set[int] = set()  # this process's stages, once run
    finished: set[int] = set()  # the stages whose outputs every process knows
    while True:
        learned: dict[str, tuple] = {}
        for spec in stages:  # in pipeline order, so a chain of local stages goes in one sweep
            if spec.index in ran or spec.index not in modules:
                continue
            if not all(name in local or name in described for name in spec.inputs):
                continue  # it waits for a value of another process
            args = tuple(local[name] if name in local else _fake(described[name], mode, device, name) for name in spec.inputs)
            outputs = _run_fake(pipeline, spec, modules[spec.index], args, mode, device, precision)
            for name, value in zip(spec.outputs, outputs):
                local[name] = value
                learned[name] = described[name] = _describe(value)
            ran.add(spec.index)
        if exchange is not None:
            for theirs in exchange(learned):
                described.update(theirs)
        before, finished = finished, {s.index for s in stages if all(name in described for name in s.outputs)}
        if len(finished) == len(stages) or exchange is None:
            break  # a caller in one process that holds some of the stages learns theirs
        if finished == before:  # the same on every process: they all know the same
            raise FtcError("learning the values' dtypes under autocast made no progress: a stage reads a value "
                           "that no stage of any process produces")  # fmt: skip
    return {
        name: _with_dtypes(spec, described[name]) if name in described and name not in pipeline.inputs else spec
        for name, spec in copy.deepcopy(specs).items()
    }


def _run_fake(pipeline: Pipeline, spec, module: torch.nn.Module, args: tuple, mode, device: torch.device,
              precision: str) -> tuple:  # fmt: skip
    """The stage's outputs on FakeTensors under autocast, its parameters and buffers fake copies
    (so no running statistics move), torch's generators left as they were."""
    state = {name: mode.from_tensor(tensor) for name, tensor in module.named_parameters(remove_duplicate=False)}
    for name, buffer in module.named_buffers(remove_duplicate=False):
        # A scalar buffer is a fake constant holding a copy of its value, so forward may read it
        # (BatchNorm with momentum=None divides by float(num_batches_tracked)) as a real one would.
        state[name] = (mode.fake_tensor_converter.from_real_tensor(mode, buffer.detach().clone(), make_constant=True)
                       if buffer.numel() <= 1 else mode.from_tensor(buffer))  # fmt: skip
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), mode, \
                autocast(device, precision):  # fmt: skip
            outputs = torch.func.functional_call(module, state, args, tie_weights=True, strict=False)
    except FtcError:
        raise
    except Exception as exc:
        raise FtcError(f"{pipeline.folder / spec.file}: precision {precision} runs each stage once on FakeTensors "
                       f"(no data) under autocast to learn the dtypes of the values it sends, and stage {spec.index} "
                       f"failed there: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                       'a stage whose code needs real data (a .item(), a data-dependent shape) cannot: set precision '
                       'to "fp32"') from exc  # fmt: skip
    check_stage_outputs(spec, outputs)
    return outputs
