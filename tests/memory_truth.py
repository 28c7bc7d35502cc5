"""The memory a pipeline's devices really hold while training, measured deterministically on the
CPU: the truth the compiler's memory estimate (ftc/passes/partition/memory.py) is checked against.

Every stage runs in one process through the real engine (runtime/engine.py), one device at a
time in the schedule's order, but each device is built and stepped as a `dist` rank is: its own
stages materialized on their own (a tied weight two devices hold is two tensors), its own
optimizer over its own parameters, and a value another device sent arrives as a copy the
receiver owns (as a receive buffer does), while the sender keeps its tensor until it is
delivered. A TorchDispatchMode sees every tensor an op makes (forward, backward, optimizer
step, weight stashing) and charges its storage, once, to the device whose action made it, until
the storage is freed (a weak reference to the storage object, which torch keeps alive exactly as
long as the storage). A device's peak is its parameters and buffers plus the most its charged
storages ever held at once. Not seen: memory an op's kernel uses inside itself, the allocator's
slack, and the receive buffers a dist rank posts a few actions ahead (runtime/device_runner.py
PREFETCH_ACTIONS).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ftc.runtime import load_model_file, load_pipeline
from ftc.runtime.comm import LocalTransport
from ftc.runtime.config import OptimizerConfig, StalenessConfig
from ftc.runtime.data import load_batch, output_specs, synthetic_targets
from ftc.runtime.datasets import synthetic, target_batch_dims
from ftc.runtime.device_runner import DeviceRunner
from ftc.runtime.engine import Engine, unique_parameters
from ftc.runtime.materialize import build_stages
from ftc.runtime.optim import build_optimizer
from ftc.runtime.staleness import StaleWeights, shared_sets

OUTSIDE = -1  # what no device's action made (the batch's split into micro-batches)
STATE = -2  # the parameters and buffers, counted apart (Measured.state)


class LiveStorages(TorchDispatchMode):
    """Bytes of live storages per device (the one whose action made them), and their peaks."""

    def __init__(self) -> None:
        super().__init__()
        self.device = OUTSIDE
        self.live: dict[int, int] = defaultdict(int)
        self.peak: dict[int, int] = defaultdict(int)
        self.charged: dict[int, tuple[int, int]] = {}  # id(storage) -> (device, bytes)
        # debug: what made each storage (the action's label, the op), and at each device's
        # peak the (bytes, maker) of what it held: where an estimate and the truth part
        self.debug = False
        self.label = ""
        self.made: dict[int, str] = {}
        self.at_peak: dict[int, list[tuple[int, str | None]]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                self._charge(value.untyped_storage(), func)
        return out

    def _charge(self, storage, func=None) -> None:
        key, nbytes = id(storage), storage.nbytes()
        known = self.charged.get(key)
        if known is not None:
            device, before = known
            if before == nbytes:
                return
            self.live[device] += nbytes - before  # resized in place (an out= argument)
        else:
            device = self.device
            self.live[device] += nbytes
            weakref.finalize(storage, self._free, key)
            if self.debug:
                self.made[key] = f"{self.label} {func}"
        self.charged[key] = (device, nbytes)
        if self.live[device] > self.peak[device]:
            self.peak[device] = self.live[device]
            if self.debug:
                self.at_peak[device] = [(n, self.made.get(k)) for k, (d, n) in self.charged.items() if d == device]

    def _free(self, key: int) -> None:
        device, nbytes = self.charged.pop(key)
        self.live[device] -= nbytes
        self.made.pop(key, None)

    @contextmanager
    def on(self, device: int):
        before, self.device = self.device, device
        try:
            yield
        finally:
            self.device = before


class _WireTransport(LocalTransport):
    """LocalTransport as the wire behaves: the sender's tensors stay referenced until received,
    and the receiver gets its own copy, made in its own action."""

    def send(self, message, payload) -> None:
        self.mailbox[message] = [t.detach() for t in payload]

    def receive(self, message, step):
        return [t.clone() for t in super().receive(message, step)]


class _DeviceStaleness:
    """One StaleWeights per device (each over its device's stages and optimizer, as a dist rank
    has), behind the one object the engine calls."""

    def __init__(self, per_device: dict[int, StaleWeights], device_of: dict[int, int], shared: list, step_micro_batches: int):
        self.per_device, self.device_of = per_device, device_of
        self.shared, self.step_micro_batches = shared, step_micro_batches  # what the engine reads
        self.tracker: LiveStorages | None = None

    def __getattr__(self, name):
        if name in ("forward_weights", "check_unwritten", "after_backward", "step_of"):
            return lambda stage, *rest: getattr(self.per_device[self.device_of[stage]], name)(stage, *rest)
        raise AttributeError(name)

    def begin(self, first_step: int) -> None:
        for stale in self.per_device.values():
            stale.begin(first_step)

    def start(self, due) -> None:
        for stale in self.per_device.values():
            local = {g: k for g, entry in enumerate(self.shared) for k, mine in enumerate(stale.shared)
                     if mine.stages == entry.stages}  # fmt: skip
            stale.start([(position, local[g], offset) for position, g, offset in due if g in local])

    def apply_due(self, position: float) -> None:
        for device, stale in self.per_device.items():
            with self.tracker.on(device):
                stale.apply_due(position)


@dataclass
class Measured:
    state: dict[int, int]  # parameters and buffers per device
    peak: dict[int, int]  # the peak of everything else per device: gradients, optimizer state, activations, temporaries
    outside: int  # peak bytes no device's action made
    at_peak: dict[int, list[tuple[int, str | None]]]  # with debug: LiveStorages.at_peak

    def total(self, device: int) -> int:
        return self.state[device] + self.peak[device]


def measure(folder, *, schedule: str, micro_batches: int, optimizer: str, steps: int | None = None,
            recompute: set[int] | None = None, seed: int = 0, debug: bool = False) -> Measured:  # fmt: skip
    """Train the pipeline in `folder` for `steps` steps of its compile batch size and return what
    each device held at its peak. `optimizer`: sgd, momentum, adam or adamw; `recompute`: the
    stages that recompute (default: as pipeline.json says). `steps` defaults to 2, and under
    async to the stages + 2, in one segment: enough for every stage to hold micro-batches of
    as many weight versions as it ever will."""
    pipeline = load_pipeline(folder)
    if steps is None:
        steps = len(pipeline.stages) + 2 if schedule == "async" else 2
    model_file = load_model_file(pipeline.model_file)
    loss_fn = model_file.loss_fn
    batch = pipeline.manifest["batch_size"]
    if recompute is None:
        recompute = {s.index for s in pipeline.stages if s.recompute}
    devices = sorted({s.device for s in pipeline.stages})
    device_of = {s.index: s.device for s in pipeline.stages}
    modules, per_device = {}, {}
    for device in devices:
        built = build_stages(model_file, pipeline, [s.index for s in pipeline.stages if s.device == device], "cpu", seed)
        modules.update(built)
        per_device[device] = built
    state = {}
    for device, built in per_device.items():
        storages = {}
        for module in built.values():
            for tensor in (*module.parameters(), *module.buffers()):
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        state[device] = sum(storages.values())
    name = "sgd" if optimizer == "momentum" else optimizer
    config = OptimizerConfig(name=name, lr=1e-3, momentum=0.9 if optimizer == "momentum" else 0.0)
    optimizers = {
        device: build_optimizer(params, config) if (params := unique_parameters(built)) else None
        for device, built in per_device.items()
    }
    outputs = None
    if getattr(model_file.module, "example_targets", None) is None:
        outputs = synthetic_targets(output_specs(pipeline, batch // micro_batches), loss_fn)
    target_dims = target_batch_dims(model_file, outputs)
    batch_dims = {n: pipeline.manifest["values"].get(n, {}).get("batch_dim", 0) for n in pipeline.inputs}
    dataset = synthetic(model_file, size=batch * steps, seed=seed, outputs=outputs)

    stale = None
    if schedule == "async":
        sets = shared_sets(pipeline)
        stale = _DeviceStaleness({
            device: StaleWeights(built, optimizers[device], lambda step: 1e-3, StalenessConfig(), micro_batches,
                                 pipeline.tied, [s for s in sets if set(s.stages) & set(built)])
            for device, built in per_device.items()
        }, device_of, sets, micro_batches)  # fmt: skip
    engine = Engine(pipeline, modules, schedule=schedule, micro_batches=micro_batches * (steps if stale else 1),
                    loss_fn=loss_fn, seed=seed, device=torch.device("cpu"), recompute=set(recompute),
                    batch_size=batch * (steps if stale else 1), target_dims=target_dims, stale=stale,
                    batch_micro_batches=micro_batches)  # fmt: skip
    engine.transport = _WireTransport()
    tracker = LiveStorages()
    tracker.debug = debug
    if stale is not None:
        stale.tracker = tracker
    for module in modules.values():
        for tensor in (*module.parameters(), *module.buffers()):
            with tracker.on(STATE):
                tracker._charge(tensor.untyped_storage())
    run = DeviceRunner.run

    def tagged_run(runner, action):
        tracker.label = str(action)
        with tracker.on(runner.device):
            return run(runner, action)

    DeviceRunner.run = tagged_run
    try:
        with tracker:
            if stale is not None:
                inputs, targets = load_batch(dataset, list(range(batch * steps)), True, True, batch_dims, target_dims)
                stale.begin(0)
                engine.train_losses(0, inputs, targets)
            for step in range(0 if stale is None else steps, steps):
                indices = list(range(step * batch, (step + 1) * batch))
                inputs, targets = load_batch(dataset, indices, True, True, batch_dims, target_dims)
                engine.train_step(step, inputs, targets)
                for device in devices:
                    if optimizers[device] is not None:
                        tracker.label = "step"
                        with tracker.on(device):
                            optimizers[device].step()
                            optimizers[device].zero_grad(set_to_none=True)
                del inputs, targets
    finally:
        DeviceRunner.run = run
    return Measured(state, {d: tracker.peak[d] for d in devices}, tracker.peak[OUTSIDE], tracker.at_peak)
