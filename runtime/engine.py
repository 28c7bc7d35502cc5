"""The pipeline engine: one training step of a generated pipeline, split into micro-batches and
run by a schedule, either every device in one process (local) or one process per device
(torchrun).

What a step computes does not depend on where stages run:
- every stage gets each input as a fresh leaf, so backward runs stage by stage, and the
  gradients of a value read by several stages are summed (in a fixed order) before they go back
  to its producer; a value crosses to another device once per micro-batch, and its gradient
  once back;
- before each stage forward, torch's RNG is seeded from (seed, step, micro-batch, stage), so
  dropout masks are the same in local and distributed runs and when a recomputed stage
  re-runs its forward;
- a stage in `recompute` runs its forward without autograd, keeping only its inputs, and runs it
  again (same seed, so same dropout masks) right before its backward;
- under `precision` bf16 every stage forward (a recomputed one too) and the loss run under
  torch.autocast, one region each, and values cross devices in the dtypes they have there, which
  runtime/precision.py learns before training (the specs the plan is made from);
- the loss of a micro-batch is loss_fn(outputs, targets) * (loss_scale / M), one factor as in mode single, on the device of the
  last stage; parameter gradients accumulate in .grad, and the caller steps the optimizer
  (after sync_shared_grads, which sums the gradients of weights tied across devices).

Schedule async (runtime/staleness.py) runs several steps as one such run: its micro-batches are
all of theirs, in textbook 1F1B order, each stage forwards with the weights StaleWeights gives
it and the stages update as their backwards finish each step, so the caller steps nothing.

evaluate() runs the same forwards only, under torch.no_grad.

Both modes run the same per-device code (runtime/device_runner.py) on the same message plan
(runtime/message_plan.py); only the transport differs (runtime/comm.py). The plan (who sends what
to whom, before or after which action) is derived on every rank from pipeline.json and the
simulated schedule (runtime/schedule.py), so the ranks agree on it without talking.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ftc.ir import FtcError

from . import comm, precision as precisions
from .comm import DistTransport, LocalTransport
from .data import dim_of
from .device_runner import DeviceRunner
from .message_plan import Plan
from .pipeline import Pipeline
from .schedule import BACKWARD, FORWARD, IN_ORDER, Action, simulate
from .staleness import StaleWeights
from .streamed_batches import BatchStream, Part, StreamedMicroBatches


class Engine:
    def __init__(
        self,
        pipeline: Pipeline,
        modules: dict[int, torch.nn.Module],
        *,
        schedule: str,
        micro_batches: int,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        seed: int,
        device: torch.device,
        recompute: set[int] = frozenset(),
        distributed: bool = False,
        timeout_s: float = 60.0,
        batch_size: int | None = None,
        target_dims: Any = 0,
        stale: StaleWeights | None = None,
        batch_micro_batches: int | None = None,
        precision: str = "fp32",
        values: dict | None = None,
    ):
        """`modules`: stage index -> stage module, already on `device`; all stages in local mode,
        this rank's in distributed mode. `batch_size`: the global batch size, needed by ranks
        that get neither inputs nor targets in train_step (they size receive buffers from it).
        `target_dims`: the targets' batch dimensions (datasets.target_batch_dims).

        Schedule "async" (runtime/staleness.py): one run covers a segment of several steps, its
        `micro_batches` all of theirs; `stale` gives each stage forward its weights and updates
        the stages as their backwards finish each step; `batch_micro_batches`, the micro-batches
        of one data batch, keeps the dropout seeds those of the same micro-batch in a
        synchronous run.

        `precision` "bf16" runs the forwards and the loss under bfloat16 autocast; `values`, the
        value specs with the dtypes they then have (precision.value_specs, made once for the
        engines of a run), is learned here when not given (a distributed engine must be given it)."""
        stages = pipeline.stages
        unknown = sorted(set(recompute) - {s.index for s in stages})
        if unknown:
            raise FtcError(f"recompute names stages {unknown}, which the pipeline does not have")
        devices = list(range(pipeline.num_devices))
        self.pipeline = pipeline
        self.micro_batches = micro_batches
        self.loss_fn = loss_fn
        self.seed = seed
        self.device = torch.device(device)
        self.recompute = frozenset(recompute)
        self.distributed = distributed
        self.batch_size = batch_size
        self.target_dims = target_dims
        self.timeout_s = timeout_s
        if precision not in precisions.AUTOCAST_DTYPES:
            raise FtcError(f"precision {precision!r} is not one of {', '.join(precisions.AUTOCAST_DTYPES)}")
        self.precision = precision
        if distributed:
            if not dist.is_available() or not dist.is_initialized():
                raise FtcError(
                    "distributed mode needs torch.distributed initialized", "launch with torchrun (mode dist)"
                )
            rank, world = dist.get_rank(), dist.get_world_size()
            if world != len(devices):
                raise FtcError(
                    f"the pipeline runs on {len(devices)} devices but torchrun started {world} processes",
                    f"launch with --nproc-per-node {len(devices)}",
                )
            self.rank = rank
            local_devices = [rank]
            transport = DistTransport(rank, timeout_s)
        else:
            self.rank = None
            local_devices = devices
            transport = LocalTransport()
        expected = sorted(s.index for s in stages if s.device in local_devices)
        if sorted(modules) != expected:
            where = f"rank {self.rank}" if distributed else "local mode"
            raise FtcError(f"{where} runs stages {expected}, but modules were given for {sorted(modules)}")
        self.modules = dict(modules)
        if (schedule == "async") != (stale is not None):
            raise FtcError("schedule async and stale weights go together")
        self.stale = stale
        self.batch_micro_batches = batch_micro_batches or micro_batches
        if isinstance(transport, DistTransport):
            transport.per_batch = self.batch_micro_batches
        # The textbook order (a stage of depth d forwards micro-batch g right after its backward
        # of g - d) is what staleness.py's versions describe.
        self.timeline = (
            simulate(stages, micro_batches, "1f1b", self._costs(), pipeline.outputs, policy=IN_ORDER)
            if stale is not None
            else simulate(stages, micro_batches, schedule, self._costs(), pipeline.outputs)
        )
        order = [timed.action for timed in self.timeline.actions]
        if values is None and precision != "fp32":
            if distributed:  # the ranks must learn them together, in set-up (runtime/train.py)
                raise FtcError("a distributed engine under autocast needs the values' dtypes: pass values="
                               "precision.value_specs(..., exchange) from every rank")  # fmt: skip
            values = precisions.value_specs(pipeline, self.modules, self.device, precision)
        self.plan = Plan(pipeline, order, micro_batches, values)
        self.transport = transport
        self.order = [a for a in order if self.plan.device_of[a.stage] in local_devices]
        self.runners = {
            d: DeviceRunner(self, d, [a for a in self.order if self.plan.device_of[a.stage] == d])
            for d in local_devices
        }
        # Async sums shared parameters' gradients itself (staleness.py), per step as it goes.
        self.shared = self._shared_groups() if distributed and stale is None else []
        self.position = {action: k for k, action in enumerate(order)}
        self.shared_due = self._shared_due() if stale is not None else []
        self.gradients_checked: set[int] = set()  # stages whose sent values' requires_grad was compared

    def _shared_due(self) -> list[tuple[int, int, int]]:
        """When each shared set's update of each step falls due: after the last backward of the
        step's last micro-batch among the set's stages, in the global order (position, set, step
        offset); every process holding the set applies it at that point of the order."""
        per_step = self.stale.step_micro_batches
        due = []
        for index, entry in enumerate(self.stale.shared):
            for offset in range(self.micro_batches // per_step):
                last = (offset + 1) * per_step - 1
                due.append((max(self.position[Action(BACKWARD, s, last)] for s in entry.stages), index, offset))
        return due

    def _costs(self) -> dict[int, tuple[float, float]] | None:
        costs = {}
        for stage in self.pipeline.manifest["stages"]:
            cost = stage.get("cost") or {}
            if "fwd_time" not in cost or "bwd_time" not in cost:
                return None
            forward, backward = cost["fwd_time"], cost["bwd_time"]
            costs[stage["index"]] = (forward, backward + (forward if stage["index"] in self.recompute else 0.0))
        return costs

    def autocast(self):
        """The context of a forward and of the loss (runtime/precision.py)."""
        return precisions.autocast(self.device, self.precision)

    @property
    def reads_inputs(self) -> bool:
        """Whether this process runs stages that read the pipeline's inputs."""
        return not self.plan.data_devices.isdisjoint(self.runners)

    @property
    def reads_targets(self) -> bool:
        """Whether this process computes the loss (on the last stage's device)."""
        return self.plan.loss_device in self.runners

    def parameters(self) -> list[torch.nn.Parameter]:
        return unique_parameters(self.modules)

    def train_step(self, step: int, inputs: tuple | dict | None, targets: Any | None, loss_scale: float = 1.0) -> float:
        """Forward and backward of one batch through the pipeline; returns the batch's mean loss
        on every rank. `inputs` is needed where stages read pipeline inputs, `targets` on the
        device of the last stage."""
        loss_device = self.plan.loss_device
        if loss_device in self.runners and targets is None:
            raise FtcError(f"device {loss_device} computes the loss, but train_step got no targets")
        self._run(step, inputs, targets, loss_scale, training=True)
        return self._broadcast_loss()[1]

    def train_losses(self, step: int, inputs: BatchStream | tuple | dict | None, targets: Any | None,
                     loss_scale: float = 1.0) -> list[float]:  # fmt: skip
        """As train_step, but the loss of every micro-batch, in order, on every rank; `inputs`
        may be a BatchStream, which gives the targets too."""
        loss_device = self.plan.loss_device
        if loss_device in self.runners and targets is None and not isinstance(inputs, BatchStream):
            raise FtcError(f"device {loss_device} computes the loss, but train_step got no targets")
        self._run(step, inputs, targets, loss_scale, training=True)
        losses = torch.zeros(self.micro_batches, dtype=torch.float64, device=self.device)
        runner = self.runners.get(loss_device)
        if runner is not None:
            losses.copy_(torch.stack([loss.to(torch.float64) for loss in runner.losses]))
        if self.distributed:
            dist.broadcast(losses, src=loss_device)
        return losses.tolist()

    def evaluate(self, step: int, inputs: tuple | dict | None, targets: Any | None = None) -> tuple[float | None, Any]:
        """Forwards only, without gradients (switching dropout and BatchNorm to eval mode is the
        caller's: `ftc check` calls mode.set_mode, training's evaluation sets the flags itself).
        Returns the batch's mean loss on every rank (None when the loss device got no targets) and
        the model's output for the whole batch on the loss device (None elsewhere)."""
        with torch.no_grad():
            self._run(step, inputs, targets, 1.0, training=False)
        has_loss, loss = self._broadcast_loss()
        runner = self.runners.get(self.plan.loss_device)
        return (loss if has_loss else None), (runner.batch_output() if runner is not None else None)

    def _run(self, step: int, inputs: Any, targets: Any, loss_scale: float, training: bool) -> None:
        plan = self.plan
        if isinstance(self.transport, DistTransport):
            self.transport.evaluating = not training
        if isinstance(inputs, BatchStream):
            streamed = StreamedMicroBatches(self, inputs)
            input_batches = Part(streamed, 0) if self.reads_inputs else None
            target_batches = Part(streamed, 1) if self.reads_targets else None
            micro_batch_size = self._micro_batch_size(None, None)
        else:
            reads_inputs = inputs is not None and self.reads_inputs
            input_batches = self.split_inputs(inputs, self.micro_batches) if reads_inputs else None
            computes_loss = targets is not None and self.reads_targets
            target_batches = self.split_targets(targets, self.micro_batches) if computes_loss else None
            micro_batch_size = self._micro_batch_size(inputs, targets)
        for device, runner in self.runners.items():
            if device in plan.data_devices and input_batches is None:
                raise FtcError(f"device {device} runs stages that read the pipeline inputs, but got no inputs")
            runner.begin(step, micro_batch_size, input_batches, target_batches, loss_scale, training)
        stale = self.stale if training else None
        if stale is not None:
            stale.start(self.shared_due)
        for action in self.order:
            if training or action.kind == FORWARD:
                if stale is not None:
                    stale.apply_due(self.position[action])
                self.runners[plan.device_of[action.stage]].run(action)
        if stale is not None:
            stale.apply_due(math.inf)
        self.transport.finish(step)

    def _broadcast_loss(self) -> tuple[bool, float]:
        """(whether the loss device computed a loss, the batch's mean loss), on every rank."""
        result = torch.zeros(2, dtype=torch.float64, device=self.device)
        runner = self.runners.get(self.plan.loss_device)
        if runner is not None and runner.losses:
            result[0] = 1.0
            result[1] = runner.mean_loss()
        if self.distributed:
            dist.broadcast(result, src=self.plan.loss_device)
        has_loss, loss = result.tolist()
        return bool(has_loss), loss

    def sync_shared_grads(self) -> None:
        """Sum the gradients of parameters held on several devices (tied weights) over those
        devices, so their copies stay equal after the optimizer step. Local mode holds one
        Parameter per weight: nothing to do."""
        for group, _, params in self.shared:
            try:
                summed = comm.sum_over_holders([p.grad for p in params], params, group)
            except RuntimeError as exc:
                raise comm.PeerFailure(f"summing the gradients of weights tied across ranks failed: a rank holding them died "
                               f"or hangs ({comm.peer_reason(exc)})",
                               "check that rank's log; raise timeout_s if its stages are that slow") from exc  # fmt: skip
            for param, grad in zip(params, summed):
                param.grad = None if grad is None else grad.clone()

    def clip_gradients(self, max_norm: float) -> float:
        """torch.nn.utils.clip_grad_norm_ over the whole model: the L2 norm of all gradients
        together, summed over the ranks, where a weight that several ranks hold (each holds the
        sum after sync_shared_grads) counts once, at the lowest of them; every gradient is then
        scaled by max_norm / norm where that is below 1, as torch scales it. Returns the norm
        before clipping."""
        counted_elsewhere = {id(p) for _, ranks, params in self.shared if self.rank != ranks[0] for p in params}
        held = [p for p in unique_parameters(self.modules) if p.grad is not None]
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for param in held:
            if id(param) not in counted_elsewhere:
                squares += torch.linalg.vector_norm(param.grad).double() ** 2
        if self.distributed:
            try:
                dist.all_reduce(squares)
            except RuntimeError as exc:
                raise comm.PeerFailure(f"summing the gradient norms for optimizer.clip_grad_norm failed: a rank died "
                                       f"or hangs ({comm.peer_reason(exc)})",
                                       "check that rank's log; raise timeout_s if its stages are that slow") from exc  # fmt: skip
        return scale_gradients([p.grad for p in held], squares.sqrt(), max_norm)

    def _shared_groups(self) -> list[tuple[Any, tuple[int, ...], list[torch.nn.Parameter]]]:
        """Process groups for parameters that stages on several devices hold, under one name or
        under tied aliases (pipeline.json's "tied"), with their ranks. new_group is collective,
        so every rank creates every group, in the same order."""
        first_name = self.pipeline.tied
        holders: dict[str, set[int]] = {}
        for stage in self.pipeline.stages:
            for key in stage.state:
                holders.setdefault(first_name.get(key, key), set()).add(stage.device)
        by_ranks: dict[tuple[int, ...], list[str]] = {}
        for key in sorted(holders):
            if len(holders[key]) > 1:
                by_ranks.setdefault(tuple(sorted(holders[key])), []).append(key)
        local: dict[str, torch.nn.Parameter] = {}
        for index in sorted(self.modules):
            for name, param in self.modules[index].named_parameters(remove_duplicate=False):
                local.setdefault(first_name.get(name, name), param)
        groups = []
        for ranks, keys in sorted(by_ranks.items()):
            group = dist.new_group(list(ranks), timeout=timedelta(seconds=self.timeout_s))
            params = [local[key] for key in keys if key in local and local[key].requires_grad]
            if self.rank in ranks and params:
                groups.append((group, ranks, params))
        return groups

    def split_inputs(self, inputs: tuple | dict, count: int) -> list[dict[str, Any]]:
        names = self.plan.inputs
        if isinstance(inputs, dict):
            missing = [name for name in names if name not in inputs]
            if missing:
                raise FtcError(f"the batch lacks pipeline inputs {missing}", f"give {names}")
            values = {name: inputs[name] for name in names}
        else:
            if len(inputs) != len(names):
                raise FtcError(f"the pipeline takes {len(names)} inputs ({names}), got {len(inputs)}")
            values = dict(zip(names, inputs))
        split = {
            name: self._split(value, self.plan.values.get(name, {}).get("batch_dim"), f"input {name}", count)
            for name, value in values.items()
        }
        return [{name: pieces[m] for name, pieces in split.items()} for m in range(count)]

    def split_targets(self, targets: Any, count: int) -> list[Any]:
        return self._split_tree(targets, self.target_dims, count)

    def _split_tree(self, targets: Any, dims: Any, count: int) -> list[Any]:
        if isinstance(targets, torch.Tensor):
            return list(self._split(targets, dims if isinstance(dims, int) or dims is None else 0, "targets", count))
        if isinstance(targets, dict):
            parts = {key: self._split_tree(value, dim_of(dims, key), count) for key, value in targets.items()}
            return [{key: pieces[m] for key, pieces in parts.items()} for m in range(count)]
        if isinstance(targets, (tuple, list)):
            parts = [self._split_tree(value, dim_of(dims, i), count) for i, value in enumerate(targets)]
            return [type(targets)(pieces[m] for pieces in parts) for m in range(count)]
        return [targets] * count

    def _split(self, value: Any, batch_dim: int | None, what: str, count: int) -> list[Any]:
        """The micro-batches of a value, each its own tensor: a model that changes its input in
        place must not change the other micro-batches' (views would share it)."""
        if not isinstance(value, torch.Tensor):
            return [value] * count
        if batch_dim is None:
            return [value.to(self.device).clone() for _ in range(count)]
        size = value.shape[batch_dim]
        if size % count:
            raise FtcError(
                f"{what}: batch size {size} does not split into {count} equal micro-batches",
                "make the batch size a multiple of micro_batches",
            )
        return [piece.clone() for piece in value.to(self.device).split(size // count, dim=batch_dim)]

    def _micro_batch_size(self, inputs: Any, targets: Any) -> int:
        batch = None
        named = inputs.items() if isinstance(inputs, dict) else zip(self.plan.inputs, inputs or ())
        for name, value in named:
            spec = self.plan.values.get(name, {})
            batch_dim = spec.get("batch_dim")
            if isinstance(value, torch.Tensor) and batch_dim is not None:
                # B, or B*T when the input is flattened: its compiled size says per how many samples.
                compiled = self.pipeline.manifest["batch_size"]
                batch = value.shape[batch_dim] * compiled // spec["shape"][batch_dim]
                break
        if batch is None and isinstance(targets, torch.Tensor) and isinstance(self.target_dims, int):
            batch = targets.shape[self.target_dims]
        if batch is None:
            batch = self.batch_size
        if batch is None:
            raise FtcError(
                "this rank gets neither inputs nor targets, so it cannot size its receive buffers",
                "pass batch_size to Engine, or give train_step the inputs on every rank",
            )
        if self.batch_size is not None and batch != self.batch_size:
            raise FtcError(
                f"the batch has {batch} samples but the engine was built for batch_size {self.batch_size}",
                "give every step the same batch size (drop the last partial batch)",
            )
        return batch // self.micro_batches


def unique_parameters(modules: dict[int, torch.nn.Module]) -> list[torch.nn.Parameter]:
    """The parameters of these stages, each once (tied weights held by several stages too), in
    stage order."""
    seen: dict[int, torch.nn.Parameter] = {}
    for index in sorted(modules):
        for param in modules[index].parameters():
            seen.setdefault(id(param), param)
    return list(seen.values())


def scale_gradients(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> float:
    """The step of torch.nn.utils.clip_grad_norm_ after its norm: every gradient times
    max_norm / (norm + 1e-6), at most 1 (always multiplied, as torch does). Returns the norm."""
    factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for grad in grads:
        grad.mul_(factor.to(grad.dtype))
    return float(norm)
