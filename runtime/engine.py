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

Both modes run the same per-device code on the same message plan; only the transport differs
(runtime/comm.py). The plan (who sends what to whom, before or after which action) is derived on
every rank from pipeline.json and the simulated schedule (runtime/schedule.py), so the ranks
agree on it without talking.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta
from fractions import Fraction
from typing import Any

import torch
import torch.distributed as dist

from ftc.ir import FtcError

from . import comm, precision as precisions
from .comm import ACTIVATION, GRADIENT, DistTransport, LocalTransport, Message
from .data import dim_of
from .loss import call_loss, one_sample_hint
from .message_plan import LOSS, Plan
from .model_file import user_error
from .pipeline import Pipeline, check_stage_outputs
from .schedule import BACKWARD, FORWARD, IN_ORDER, Action, simulate
from .staleness import StaleWeights
from .streamed_batches import BatchStream, Part, StreamedMicroBatches

PREFETCH_ACTIONS = 4  # receives are posted this many actions ahead of the one that needs them


def stream_seed(seed: int, step: int, micro_batch: int, stage: int) -> int:
    """The RNG seed of one stage forward: a hash, so neighbouring steps and stages get unrelated
    streams."""
    digest = hashlib.blake2b(f"{seed}/{step}/{micro_batch}/{stage}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


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
            d: _DeviceRunner(self, d, [a for a in self.order if self.plan.device_of[a.stage] == d])
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


class _DeviceRunner:
    """The actions of one device: its stages' forwards and backwards, in its schedule order."""

    def __init__(self, engine: Engine, device: int, order: list[Action]):
        self.engine = engine
        self.plan = engine.plan
        self.device = device
        self.order = order
        self.prefetch = engine.distributed
        self.stages_here = sum(1 for s in self.plan.specs.values() if s.device == device)
        # The memory of this device's parameters and buffers: updates (the optimizer's, a forward
        # that counts in a buffer) write into it in place, so it stays the same between steps.
        self.state_storages = {
            tensor.untyped_storage().data_ptr()
            for index, module in engine.modules.items()
            if self.plan.device_of[index] == device
            for tensor in (*module.parameters(), *module.buffers())
        }

    def begin(self, step, micro_batch_size, input_batches, target_batches, loss_scale, training) -> None:
        self.step = step
        self.training = training
        self.active_order = self.order if training else [a for a in self.order if a.kind == FORWARD]
        self.outputs: list[dict[str, Any]] = []
        # Shapes in pipeline.json are for the compile batch size.
        self.batch_scale = Fraction(micro_batch_size, self.engine.pipeline.manifest["batch_size"])
        self.input_batches = input_batches
        self.target_batches = target_batches
        self.loss_scale = loss_scale
        self.position = 0
        self.posted = 0
        self.peer_posted: dict[int, int] = {}
        self.values: dict[tuple[str, int], Any] = {}
        self.use_leaves: dict[tuple[int, str, int], Any] = {}
        self.saved: dict[tuple[int, int], tuple[tuple, Any, list[int], dict | None, list[str]]] = {}
        self.backwards_left = {m: self.stages_here for m in range(self.engine.micro_batches)}
        self.scaled_losses: dict[int, torch.Tensor] = {}
        self.losses: list[torch.Tensor] = []

    def run(self, action: Action) -> None:
        if self.prefetch:
            self._post_receives_through(min(self.position + PREFETCH_ACTIONS, len(self.active_order) - 1))
        if action.kind == FORWARD:
            self._forward(action.stage, action.micro_batch)
        else:
            self._backward(action.stage, action.micro_batch)
        for message in self.plan.sends_after.get(action, []):
            self._send(message)
        self.position += 1

    def mean_loss(self) -> torch.Tensor:
        return torch.stack([loss.to(torch.float64) for loss in self.losses]).sum() / self.engine.micro_batches

    # Forward

    def _forward(self, stage: int, m: int) -> None:
        spec = self.plan.specs[stage]
        args = tuple(self._reader_leaf(stage, name, m) for name in spec.inputs)
        module = self.engine.modules[stage]
        recompute = stage in self.engine.recompute
        # The recomputing forward must see the buffers this one saw (a BatchNorm's running
        # statistics, a step counter), and must not update them a second time.
        buffers_before = _buffer_values(module) if recompute and self.training else None
        weight_versions = _parameter_versions(module) if recompute and self.training else None
        try:
            with self._seeded(stage, m), torch.set_grad_enabled(torch.is_grad_enabled() and not recompute), \
                    self.engine.autocast():  # fmt: skip
                outputs = self._call(stage, m, self._uncached(args))
        except FtcError:
            raise
        except Exception as exc:
            raise user_error(exc, f"stage {stage} ({spec.file}), micro-batch {m},",
                             [self.engine.pipeline.folder / spec.file, self.engine.pipeline.model_file],
                             precisions.failure_hint(self.engine.precision, one_sample_hint(exc,
                                 "check the data against the model file's example_inputs (shapes, dtypes); "
                                 f"`ftc check --batch-size {int(self.batch_scale * self.engine.pipeline.manifest['batch_size'])}` "
                                 "runs the stages on example inputs of this micro-batch size"))) from exc  # fmt: skip
        # The parameters a forward without autograd wrote, which its recompute must not write again
        written = [] if weight_versions is None else [
            name for name, version in _parameter_versions(module).items() if version != weight_versions[name]
        ]
        check_stage_outputs(spec, outputs)
        if self.training and not recompute and stage not in self.engine.gradients_checked:
            self.engine.gradients_checked.add(stage)  # a hand edit shows on the first forward: not each step
            problems = comm.gradient_problems(dict(zip(spec.outputs, outputs)), self.plan.values)
            if problems:
                raise FtcError(f"{spec.file}: {problems[0]}", "keep stage outputs as pipeline.json lists them "
                               "(run `ftc check`), or recompile")  # fmt: skip
        for name, value in zip(spec.outputs, outputs):
            if (self.device, name) in self.plan.uses or name in self.plan.readers:
                self.values[(name, m)] = self._as_of_now(value)
        if self.training:
            versions = [a._version if isinstance(a, torch.Tensor) else None for a in args] if recompute else []
            self.saved[(stage, m)] = (args, None if recompute else outputs, versions, buffers_before, written)
        if stage == self.plan.loss_stage:
            self._loss(m)

    def _loss(self, m: int) -> None:
        outputs = {name: self._reader_leaf(LOSS, name, m) for name in self.plan.outputs}
        if not self.training:
            self.outputs.append(outputs)
            if self.target_batches is None:
                return
        output = self.engine.pipeline.assemble_output(self._uncached(outputs))
        with self.engine.autocast():
            loss = call_loss(self.engine.loss_fn, output, self.target_batches[m])
        self.losses.append(loss.detach().reshape(()))
        if self.training:
            # One multiplication by one factor, as mode single scales its losses: `* loss_scale / M`
            # rounded twice (a third, then a third of that, under step_every 3), so the gradients
            # started 1 ulp off mode single's and Adam took that to 2e-2 in 9 steps (resnet).
            self.scaled_losses[m] = loss.reshape(()) * (self.loss_scale / self.engine.micro_batches)

    def batch_output(self) -> Any:
        """The model's output over the whole batch: the micro-batches' outputs joined along their
        batch dimensions. An output that compares the samples of its micro-batch ([b, b] in-batch
        logits: other_batch_dims) has no whole-batch form; it is the list of the micro-batches'."""
        joined = {}
        for name in self.plan.outputs:
            parts = [outputs[name] for outputs in self.outputs]
            spec = self.plan.values[name]
            batch_dim = spec.get("batch_dim")
            if not isinstance(parts[0], torch.Tensor) or batch_dim is None:
                joined[name] = parts[0]
            elif spec.get("other_batch_dims") and len(parts) > 1:
                joined[name] = parts
            else:
                joined[name] = torch.cat(parts, dim=batch_dim)
        return self.engine.pipeline.assemble_output(joined)

    def _call(self, stage: int, m: int, args: tuple) -> Any:
        module, stale = self.engine.modules[stage], self.engine.stale
        if stale is None or not self.training:
            return module(*args)
        outputs = torch.func.functional_call(module, stale.forward_weights(stage, m), args, tie_weights=True)
        stale.check_unwritten(stage, m)
        return outputs

    def _as_of_now(self, value: Any) -> Any:
        """A stage output as its readers must see it. One that is a parameter or a buffer (or a
        view of one, as `self.step.add_(1)` returns) is copied: the next micro-batch's forward, which
        may run before a reader on this device or before the send goes out, changes it in place."""
        if isinstance(value, torch.Tensor):
            return value.detach().clone() if value.untyped_storage().data_ptr() in self.state_storages else value
        if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
            return type(value)(self._as_of_now(item) for item in value)
        return value

    def _uncached(self, values: Any) -> Any:
        """Under autocast, the received values that need a gradient, each as a view of itself:
        autocast caches its casts of leaves that need a gradient (meant for weights), so all uses
        of a received float32 value would share one cast and sum their gradients in bfloat16,
        where in the original model the value is no leaf, each use casts it, and their gradients
        add up in float32. A view is never cached, and its backward passes the gradient as is."""
        if self.engine.precision == "fp32":
            return values
        if isinstance(values, torch.Tensor):
            return values.view_as(values) if values.is_leaf and values.requires_grad else values
        if isinstance(values, dict):
            return {key: self._uncached(value) for key, value in values.items()}
        if isinstance(values, (tuple, list)) and not isinstance(values, torch.Size):
            return type(values)(self._uncached(value) for value in values)
        return values

    def _reader_leaf(self, reader: int, name: str, m: int) -> Any:
        """The value as `reader` gets it: a fresh leaf, kept for the gradient's way back."""
        spec = self.plan.values.get(name)
        leaf = _leaf(self._value(name, m), spec)
        if self.training and self.plan.gradient_leaves.get(name, []):
            self.use_leaves[(reader, name, m)] = leaf
        return leaf

    def _value(self, name: str, m: int) -> Any:
        if (name, m) not in self.values:
            if name in self.plan.inputs and name not in self.plan.producer:
                self.values[(name, m)] = self.input_batches[m][name]
            else:
                message = self.plan.activation_in[(self.device, name, m)]
                payload = self._receive(message)
                self.values[(name, m)] = comm.unflatten(
                    comm.decode(payload, self.plan.leaves[name]), self.plan.values[name]
                )
        return self.values[(name, m)]

    # Backward

    def _backward(self, stage: int, m: int) -> None:
        spec = self.plan.specs[stage]
        if stage == self.plan.loss_stage:
            with self._changed_since_forward(stage, m):
                self.scaled_losses.pop(m).backward()
        args, outputs, versions, buffers_before, written = self.saved.pop((stage, m))
        if outputs is None:
            changed = [name for name, a, v in zip(spec.inputs, args, versions) if v is not None and a._version != v]
            if changed:
                raise FtcError(
                    f"stage {stage} changes its inputs {changed} in place, so it cannot be recomputed",
                    f"take stage {stage} out of recompute",
                )
            module = self.engine.modules[stage]
            buffers_now = _point_buffers(module, buffers_before)
            # Buffers are replayed as the first forward saw them; a copy of every parameter per
            # micro-batch in flight would undo what recomputation saves, so a parameter the first
            # forward wrote may only be written again to the values it holds (a clamp_ to bounds
            # it already keeps).
            weights = dict(module.named_parameters(remove_duplicate=False))
            weights_now = {name: weights[name].detach().clone() for name in written}
            with self._seeded(stage, m), torch.enable_grad(), self.engine.autocast():
                outputs = self._call(stage, m, self._uncached(args))
            _point_buffers(module, buffers_now)
            changed = [name for name in written if not torch.equal(weights[name], weights_now[name])]
            if changed:
                raise FtcError(
                    f"stage {stage} ({spec.file}) changes parameter {changed[0]} in place in its forward (an EMA "
                    "teacher, a running center under no_grad), so it cannot be recomputed: the recomputed forward "
                    "changed it again",
                    f"take stage {stage} out of recompute: `--set recompute=pipeline` follows pipeline.json, where ftc "
                    "compile leaves such stages out, or `--set recompute=never`",
                )
        tensors, grads = [], []
        for name, value in zip(spec.outputs, outputs):
            indices = self.plan.gradient_leaves[name]
            if not indices:
                continue
            leaves = comm.flatten(value, self.plan.values[name])
            for k, grad in zip(indices, self._output_gradient(name, m)):
                if grad is not None and isinstance(leaves[k], torch.Tensor) and leaves[k].requires_grad:
                    tensors.append(leaves[k])
                    grads.append(grad)
        if tensors:
            with self._changed_since_forward(stage, m):
                torch.autograd.backward(tensors, grads)
        if self.engine.stale is not None:
            self.engine.stale.after_backward(stage, m)
        self.backwards_left[m] -= 1
        if self.backwards_left[m] == 0:
            for key in [key for key in self.values if key[1] == m]:
                del self.values[key]

    @contextmanager
    def _changed_since_forward(self, stage: int, m: int):
        """A backward that finds a tensor it saved changed in place: in a pipeline several
        micro-batches' forwards run before the first one's backward (mode single runs each
        backward before the next forward), so a parameter that forward writes in place (a WGAN
        critic's weight clamp_ under no_grad) and an op then reads has changed under it."""
        try:
            yield
        except RuntimeError as exc:
            if "modified by an inplace operation" not in str(exc):
                raise
            spec = self.plan.specs[stage]
            raise FtcError(
                f"stage {stage} ({spec.file}), micro-batch {m}: the backward needs a tensor that a later forward "
                "changed in place, most likely a parameter or buffer that forward writes in place (a weight clamp_ "
                "under no_grad) and then reads: the next micro-batch's forward wrote it again before this "
                f"backward, which mode single never does (torch: {str(exc).split(' Hint:')[0]})",
                "set micro_batches to 1, so that each backward runs before the next forward, or read a copy "
                "where forward changes the tensor (w = self.weight.clamp(-c, c) leaves the parameter itself "
                "unclamped)",
            ) from exc

    def _output_gradient(self, name: str, m: int) -> list[torch.Tensor | None]:
        """The gradient of a value this device produced: its local readers' first, then each
        other device's, in device order."""
        parts = [self._use_gradients(use, name, m) for use in self.plan.uses.get((self.device, name), [])]
        for reader in self.plan.readers.get(name, []):
            message = Message(GRADIENT, name, m, reader, self.device)
            *payload, present = self._receive(message)
            parts.append([grad if has else None for grad, has in zip(payload, present.tolist())])
        return _sum(parts, len(self.plan.gradient_leaves[name]))

    def _use_gradients(self, use: int, name: str, m: int) -> list[torch.Tensor | None]:
        leaves = comm.flatten(self.use_leaves.pop((use, name, m)), self.plan.values[name])
        return [leaves[k].grad for k in self.plan.gradient_leaves[name]]

    # Messages

    def _send(self, message: Message) -> None:
        name, m = message.value, message.micro_batch
        specs = self.plan.leaves[name]
        if message.kind == ACTIVATION:
            leaves = comm.flatten(self.values[(name, m)], self.plan.values[name])
            payload = comm.encode(name, leaves, specs, self.batch_scale, self.engine.device)
        else:
            uses = self.plan.uses[(self.device, name)]
            summed = _sum([self._use_gradients(use, name, m) for use in uses], len(self.plan.gradient_leaves[name]))
            grad_specs = [specs[k] for k in self.plan.gradient_leaves[name]]
            payload = [
                g if g is not None else comm.empty_payload([spec], self.batch_scale, self.engine.device)[0].zero_()
                for g, spec in zip(summed, grad_specs)
            ]
            # Which leaves have a gradient at all: a reader may not backpropagate to a value (the loss
            # ignores an output, a stage only compares it, `g > 0`), and a plain loop then leaves the
            # gradients of the parameters behind it None, which weight decay and Adam pass by, where
            # the zeros sent in its place would give them zero gradients.
            payload.append(torch.tensor([g is not None for g in summed], dtype=torch.uint8, device=self.engine.device))
        self.engine.transport.send(message, payload)

    def _receive(self, message: Message) -> list[torch.Tensor]:
        """The message's payload. Its arrival proves that the messages its sender had awaited
        before sending it were delivered, so the transport lets go of those: a rank holds the
        values it sent only while they are in flight, not until the end of the step."""
        payload = self.engine.transport.receive(message, self.step)
        sent_at, peer, awaited_at = self.plan.sent_at[message], message.src, self.plan.awaited_at
        self.engine.transport.release_sends(lambda sent: sent.dst == peer and awaited_at[sent] <= sent_at, self.step)
        return payload

    def _post_receives_through(self, position: int) -> None:
        while self.posted <= position:
            for message in self.plan.awaits_before.get(self.active_order[self.posted], []):
                self._post_receives_of(message)
            self.posted += 1

    def _post_receives_of(self, message: Message) -> None:
        """Post the receives from message.src up to and including `message`, in the plan's order."""
        queue = self.plan.incoming[(self.training, self.device, message.src)]
        start = self.peer_posted.get(message.src, 0)
        end = self.plan.queue_position[(self.training, message)] + 1
        for pending in queue[start:end]:
            specs = self.plan.leaves[pending.value]
            if pending.kind == GRADIENT:
                specs = [specs[k] for k in self.plan.gradient_leaves[pending.value]]
            buffers = comm.empty_payload(specs, self.batch_scale, self.engine.device)
            if pending.kind == GRADIENT:  # and which of them have a gradient (_send)
                buffers.append(torch.empty(len(specs), dtype=torch.uint8, device=self.engine.device))
            self.engine.transport.post_receive(pending, buffers)
        self.peer_posted[message.src] = max(start, end)

    @contextmanager
    def _seeded(self, stage: int, m: int):
        """Seeds this device's generator only: torch.manual_seed would also queue seeds for every
        accelerator type the build knows, with a stack trace each, on every call."""
        per_batch = self.engine.batch_micro_batches
        seed = stream_seed(self.engine.seed, self.step + m // per_batch, m % per_batch, stage)
        device = self.engine.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.default_generator.manual_seed(seed)
            if device.type == "cuda":
                torch.cuda.default_generators[
                    device.index if device.index is not None else torch.cuda.current_device()
                ].manual_seed(seed)
            yield


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


def _leaf(value: Any, spec: dict | None) -> Any:
    """A value as a reader receives it: tensors become fresh leaves, requiring grad where the
    spec says the value carries a gradient."""
    if isinstance(value, torch.Tensor):
        wants_grad = bool(spec) and comm.carries_grad(spec) and comm.differentiable(value)
        return value.detach().requires_grad_(wants_grad)
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        items = spec.get("items") if spec else None
        return type(value)(_leaf(v, items[k] if items else None) for k, v in enumerate(value))
    return value


def _sum(parts: list[list[torch.Tensor | None]], count: int) -> list[torch.Tensor | None]:
    totals: list[torch.Tensor | None] = [None] * count
    for part in parts:
        for k, grad in enumerate(part):
            if grad is not None:
                totals[k] = grad if totals[k] is None else totals[k] + grad
    return totals



def _buffer_values(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every buffer, by qualified name (aliases of one buffer share the copy)."""
    copies: dict[int, torch.Tensor] = {}
    return {
        name: copies.setdefault(id(buffer), buffer.detach().clone())
        for name, buffer in module.named_buffers(remove_duplicate=False)
    }


def _parameter_versions(module: torch.nn.Module) -> dict[str, int]:
    return {name: weight._version for name, weight in module.named_parameters(remove_duplicate=False)}


def _point_buffers(module: torch.nn.Module, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Make the module's buffers these tensors (no in-place copy, so tensors that autograd saved
    keep their versions); return the ones they replace."""
    replaced = {}
    for name, value in values.items():
        owner_name, _, attribute = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        replaced[name] = owner._buffers[attribute]
        owner._buffers[attribute] = value
    return replaced
