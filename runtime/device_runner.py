"""The actions of one device in a step: its stages' forwards (seeded, recomputed, under autocast)
and backwards, the loss, and the messages it sends and receives (runtime/comm.py) per the
message plan (runtime/message_plan.py). The engine (runtime/engine.py) runs one per device it
holds."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import torch

from ftc.ir import FtcError

from . import comm, precision as precisions
from .comm import ACTIVATION, GRADIENT, Message
from .loss import call_loss, forward_failure_hint
from .message_plan import LOSS
from .model_file import user_error
from .pipeline import check_stage_outputs
from .schedule import FORWARD, Action

if TYPE_CHECKING:
    from .engine import Engine

PREFETCH_ACTIONS = 4  # receives are posted this many actions ahead of the one that needs them


def stream_seed(seed: int, step: int, micro_batch: int, stage: int) -> int:
    """The RNG seed of one stage forward: a hash, so neighbouring steps and stages get unrelated
    streams."""
    digest = hashlib.blake2b(f"{seed}/{step}/{micro_batch}/{stage}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class DeviceRunner:
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
                             precisions.failure_hint(self.engine.precision, forward_failure_hint(exc,
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
