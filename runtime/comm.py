"""Moving values between pipeline devices: what one message is, and two transports for it.

A message is one value of one micro-batch going from the device that produced it to a device
that reads it (an activation), or that value's gradient going back (a gradient). Its payload is a
list of tensors: the value's leaves (tensors, and Python scalars as one-element tensors) in the
order its spec in pipeline.json lists them; receive buffers are shaped from that spec with the
batch dimension set to the micro-batch size, so no shapes are exchanged at run time.

- `LocalTransport`: every device in one process; a send hands over copies, as a wire would.
- `DistTransport`: torch.distributed point-to-point (gloo on CPU, NCCL on CUDA). Receives are
  posted ahead of use and sends are never waited for where they are made, so transfers
  overlap compute. A sent payload is held until a later message from its receiver proves it
  delivered (the receiver sent that message after awaiting this one), at the latest until the
  end of the step: a rank holds the values it sent only while they are in flight. The engine
  posts the messages between any two ranks in the same order on both sides (both derive it
  from the shared schedule), which is what matches them. Every wait has a timeout that names
  the ranks, the value and the step, because a rank that died or hangs otherwise shows up as a
  silent hang.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from fractions import Fraction
from typing import Any

import torch
import torch.distributed as dist

from ftc.ir import FtcError


class PeerFailure(FtcError):
    """What a rank raises when another rank died or hangs (a receive, a send or a collective
    failed or timed out): the launcher reports that other rank as the cause, this one as its
    consequence."""


def differentiable(tensor: torch.Tensor) -> bool:
    """Whether `tensor` can require grad: floating and complex ones (a spectrum between stages),
    not integer or bool ones."""
    return tensor.is_floating_point() or tensor.is_complex()


def timed_out(exc: Exception) -> bool:
    """Whether a communication library's error says a wait ran out, rather than a peer's
    connection closing (it died)."""
    said = str(exc).lower()
    return "timed out" in said or "timeout" in said


def peer_reason(exc: Exception) -> str:
    """The first line of a communication library's error, without gloo's boilerplate advice
    (which has several wordings: "... by a remote worker crashing.", "... hanging or bugs in the
    application. Check the logs ... GLHF!")."""
    line = (str(exc).strip().splitlines() or [""])[0]
    return line.split(" This is typically caused by ")[0]


ACTIVATION = "activation"
GRADIENT = "gradient"


def sum_over_holders(grads: list[torch.Tensor | None], params: list[torch.Tensor], group: Any) -> list[torch.Tensor | None]:
    """The gradients of weights tied across the ranks of `group` (`grads`, this rank's, None where
    it has none), each summed over its holders, in one all_reduce; None where no holder has one
    (its uses feed only outputs the loss ignores), as a plain loop leaves .grad, which weight decay
    then passes by, where a summed zero would be decayed. Raises all_reduce's RuntimeError."""
    holders = torch.tensor([g is not None for g in grads], dtype=params[0].dtype, device=params[0].device)
    flat = torch.cat([(torch.zeros_like(p) if g is None else g.to_dense()).reshape(-1)
                      for g, p in zip(grads, params)] + [holders])  # fmt: skip
    dist.all_reduce(flat, group=group)
    summed, offset = [], 0
    for param, held in zip(params, flat[-len(params) :].tolist()):
        summed.append(flat[offset : offset + param.numel()].view_as(param) if held else None)
        offset += param.numel()
    return summed


@dataclass(frozen=True)
class Message:
    kind: str  # ACTIVATION | GRADIENT
    value: str
    micro_batch: int
    src: int
    dst: int

    def describe(self, step: int | None = None, per_batch: int | None = None, evaluating: bool = False) -> str:
        """What the message carries; with the run's first batch `step` (0-based) and the
        micro-batches of one batch (`per_batch`; an async run spans several batches), where.
        `evaluating`: a held-out batch's, evaluated after `step` steps."""
        what = f"value {self.value}" if self.kind == ACTIVATION else f"gradient of {self.value}"
        if step is None:
            return f"{what}, micro-batch {self.micro_batch}"
        if evaluating:
            return f"{what}, micro-batch {self.micro_batch} of a held-out batch, evaluating after step {step}"
        per_batch = per_batch or self.micro_batch + 1
        return f"{what}, micro-batch {self.micro_batch % per_batch} of batch {step + self.micro_batch // per_batch + 1}"


class LocalTransport:
    """All devices in one process: a sent payload is copied into a mailbox until received, dense
    and contiguous as the wire delivers it in dist (a strided view copied with its strides would
    be summed in another order by the reader, and local would drift from dist in the last bits)."""

    def __init__(self) -> None:
        self.mailbox: dict[Message, list[torch.Tensor]] = {}

    def send(self, message: Message, payload: list[torch.Tensor]) -> None:
        self.mailbox[message] = [t.detach().clone(memory_format=torch.contiguous_format) for t in payload]

    def post_receive(self, message: Message, buffers: list[torch.Tensor]) -> None:
        pass

    def receive(self, message: Message, step: int) -> list[torch.Tensor]:
        try:
            return self.mailbox.pop(message)
        except KeyError:
            raise AssertionError(f"{message} awaited before it was sent: the schedule is inconsistent") from None

    def release_sends(self, delivered: Callable[[Message], bool], step: int) -> None:
        pass  # a sent payload is a copy in the mailbox until received

    def finish(self, step: int) -> None:
        if self.mailbox:
            raise AssertionError(f"messages never received: {sorted(map(str, self.mailbox))}")


class DistTransport:
    """Point-to-point torch.distributed messages, posted asynchronously, awaited with a timeout."""

    def __init__(self, rank: int, timeout_s: float):
        self.rank = rank
        self.timeout_s = timeout_s
        self.per_batch: int | None = None  # micro-batches per batch, for messages (the engine sets it)
        self.evaluating = False  # messages of held-out batches, named so (the engine sets it)
        # gloo moves only host tensors: GPU tensors travel through host copies, which also lets
        # several ranks share one GPU (NCCL refuses that), e.g. to measure per-rank memory.
        self.via_host = dist.get_backend() == "gloo"
        self.pending_receives: dict[Message, tuple[list[tuple[torch.Tensor, torch.Tensor]], list[dist.Work]]] = {}
        self.pending_sends: list[tuple[Message, list[torch.Tensor], list[dist.Work]]] = []

    def _wire(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.cpu() if self.via_host else tensor

    def send(self, message: Message, payload: list[torch.Tensor]) -> None:
        tensors = [self._wire(t.detach().contiguous()) for t in payload]
        works = self._post(dist.isend, tensors, message.dst, f"rank {self.rank} could not send to rank {message.dst}", message)
        # The tensors stay referenced until their sends complete.
        self.pending_sends.append((message, tensors, works))

    def post_receive(self, message: Message, buffers: list[torch.Tensor]) -> None:
        wires = [self._wire(b) for b in buffers]
        works = self._post(dist.irecv, wires, message.src, f"rank {self.rank} could not receive from rank {message.src}", message)
        self.pending_receives[message] = ([(b, w) for b, w in zip(buffers, wires)], works)

    def receive(self, message: Message, step: int) -> list[torch.Tensor]:
        buffers, works = self.pending_receives.pop(message)
        for work in works:
            self._wait(work, f"rank {self.rank} got nothing from rank {message.src}", message, step)
        return [wire if wire is buffer else buffer.copy_(wire) for buffer, wire in buffers]

    def release_sends(self, delivered: Callable[[Message], bool], step: int) -> None:
        """Complete and drop the pending sends that `delivered` says their receiver has got
        (so their waits return at once), freeing the tensors they hold."""
        kept = []
        for message, tensors, works in self.pending_sends:
            if not delivered(message):
                kept.append((message, tensors, works))
                continue
            for work in works:
                self._wait(work, f"rank {self.rank} could not deliver to rank {message.dst}", message, step)
        self.pending_sends = kept

    def finish(self, step: int) -> None:
        sends, self.pending_sends = self.pending_sends, []
        for message, _, works in sends:
            for work in works:
                self._wait(work, f"rank {self.rank} could not deliver to rank {message.dst}", message, step)
        if self.pending_receives:
            raise AssertionError(f"receives posted but never awaited: {sorted(map(str, self.pending_receives))}")

    @staticmethod
    def _post(operation, tensors: list[torch.Tensor], peer: int, failure: str, message: Message) -> list[dist.Work]:
        """isend or irecv each tensor; gloo fails right here when the peer's connection is gone."""
        try:
            return [operation(t, peer) for t in tensors]
        except RuntimeError as exc:
            raise PeerFailure(f"{failure} ({message.describe()}): that rank died ({peer_reason(exc)})",
                           "check that rank's log") from exc  # fmt: skip

    def _wait(self, work: dist.Work, failure: str, message: Message, step: int) -> None:
        hint = "check that rank's log; raise the engine's timeout_s if its stages are that slow"
        try:
            completed = work.wait(timeout=timedelta(seconds=self.timeout_s))
        except RuntimeError as exc:
            if not timed_out(exc):
                raise PeerFailure(
                    f"{failure} ({message.describe(step, self.per_batch, self.evaluating)}): that rank died ({peer_reason(exc)})",
                    "check that rank's log",
                ) from exc
            completed = False
        if not completed:
            raise PeerFailure(
                f"{failure} ({message.describe(step, self.per_batch, self.evaluating)}) within {self.timeout_s:g} s: that rank died or hangs",
                hint,
            )


SCALAR_DTYPES = {"int": torch.int64, "bool": torch.int64, "float": torch.float64}
SEQUENCES = {"tuple": tuple, "list": list, "size": torch.Size}


def leaf_specs(name: str, spec: dict, sendable: bool = True) -> list[dict]:
    """The specs of a value's leaves, depth first. Other objects are leaves too, but a value
    that holds one cannot be `sendable` to another device."""
    kind = spec["kind"]
    if kind in SEQUENCES:
        return [leaf for item in spec["items"] for leaf in leaf_specs(name, item, sendable)]
    if kind == "tensor" or kind in SCALAR_DTYPES or not sendable:
        return [spec]
    raise FtcError(
        f"value {name} ({kind}) crosses devices, but only tensors, numbers and tuples or lists of them can be sent",
        "move the stage boundary (recompile with another partition) or place both stages on one device",
    )


def flatten(value, spec: dict) -> list:
    if spec["kind"] in SEQUENCES:
        return [leaf for item, item_spec in zip(value, spec["items"]) for leaf in flatten(item, item_spec)]
    return [value]


def unflatten(leaves: list, spec: dict):
    """Inverse of flatten: the value from its leaves (consumed from the front of the list)."""
    if spec["kind"] in SEQUENCES:
        return SEQUENCES[spec["kind"]](unflatten(leaves, item) for item in spec["items"])
    return leaves.pop(0)


def carries_grad(spec: dict) -> bool:
    return spec["kind"] == "tensor" and spec["requires_grad"]


def wire_shape(spec: dict, batch_scale: Fraction) -> list[int]:
    """The spec's shape for one micro-batch: its batch dimension (B, or B*T after a flatten), and
    any other that grows with the batch ([B, B] in-batch logits), scaled by `batch_scale`, the
    micro-batch size over the batch size the spec was compiled at."""
    shape = list(spec["shape"])
    dims = [] if spec["batch_dim"] is None else [spec["batch_dim"], *spec.get("other_batch_dims", [])]
    for dim in dims:
        scaled = spec["shape"][dim] * batch_scale
        if scaled.denominator != 1:
            raise FtcError(
                f"a value of shape {spec['shape']} (batch dimension {dim}) does not scale to a micro-batch "
                f"{float(batch_scale):g} times the compile batch size",
                "choose batch_size / micro_batches so that it divides the batch dimension",
            )
        shape[dim] = int(scaled)
    return shape


def encode(
    name: str, leaves: list, specs: list[dict], batch_scale: Fraction, device: torch.device
) -> list[torch.Tensor]:
    """The payload of a value's leaves, checked against the shapes its receivers expect."""
    payload = []
    for leaf, spec in zip(leaves, specs):
        if spec["kind"] != "tensor":
            payload.append(torch.tensor([leaf], dtype=SCALAR_DTYPES[spec["kind"]], device=device))
            continue
        expected = wire_shape(spec, batch_scale)
        if (
            not isinstance(leaf, torch.Tensor)
            or list(leaf.shape) != expected
            or leaf.dtype != getattr(torch, spec["dtype"])
        ):
            got = (
                f"{str(leaf.dtype).removeprefix('torch.')}{list(leaf.shape)}"
                if isinstance(leaf, torch.Tensor)
                else type(leaf).__name__
            )
            if "compiled_dtype" in spec:  # a dtype of autocast's (runtime/precision.py)
                raise FtcError(
                    f"value {name} is {got}, but under autocast its stage gave {spec['dtype']}{expected} when run "
                    f"before training (pipeline.json says {spec['compiled_dtype']}), and receivers expect that",
                    "a stage must give its values the same dtypes every time (in eval mode too); "
                    'set precision to "fp32" for a stage that does not',
                )
            raise FtcError(
                f"value {name} is {got}, but pipeline.json says {spec['dtype']}{expected} for this micro-batch size",
                "keep stage outputs as pipeline.json lists them (run `ftc check`), or recompile",
            )
        payload.append(leaf)
    return payload


def unsendable(sent: dict[str, Any], values: dict[str, dict], batch_scale: Fraction) -> list[str]:
    """What encode would refuse of a stage's outputs `sent` (by name; `values`: pipeline.json's
    specs), one message each: a hand edit that changes a dtype or a shape can compute in one
    process, but not cross devices."""
    problems = []
    for name, leaf, leaf_spec in _leaves_with_specs(sent, values):
        if leaf_spec["kind"] in SCALAR_DTYPES and type(leaf).__name__ != leaf_spec["kind"]:
            problems.append(f"value {name} is {type(leaf).__name__} {leaf!r}, but pipeline.json says {leaf_spec['kind']}")
        if leaf_spec["kind"] != "tensor":
            continue
        try:
            encode(name, [leaf], [leaf_spec], batch_scale, torch.device("cpu"))
        except FtcError as exc:
            problems.append(exc.message)
    return problems


def _leaves_with_specs(sent: dict[str, Any], values: dict[str, dict]):
    """(value name, leaf, leaf spec) of the values `sent` that pipeline.json specifies."""
    for name, value in sent.items():
        spec = values.get(name)
        if spec is not None:
            for leaf, leaf_spec in zip(flatten(value, spec), leaf_specs(name, spec, sendable=False)):
                yield name, leaf, leaf_spec


def gradient_problems(sent: dict[str, Any], values: dict[str, dict]) -> list[str]:
    """Stage outputs `sent` (by name, computed with autograd on) whose need of a gradient is not
    what pipeline.json says: the runtime sends a gradient back exactly where the spec says so, so
    a hand edit of `requires_grad` would freeze every stage before (or fail)."""
    problems = []
    for name, leaf, leaf_spec in _leaves_with_specs(sent, values):
        if leaf_spec["kind"] != "tensor" or not isinstance(leaf, torch.Tensor) or not differentiable(leaf):
            continue
        if leaf.requires_grad != bool(leaf_spec.get("requires_grad")):
            problems.append(f"value {name} {'needs' if leaf.requires_grad else 'has no'} gradient, but "
                            f"pipeline.json says requires_grad {str(bool(leaf_spec.get('requires_grad'))).lower()}")  # fmt: skip
    return problems


def decode(payload: list[torch.Tensor], specs: list[dict]) -> list:
    python = {"int": int, "bool": bool, "float": float}
    return [t if spec["kind"] == "tensor" else python[spec["kind"]](t.item()) for t, spec in zip(payload, specs)]


def empty_payload(specs: list[dict], batch_scale: Fraction, device: torch.device) -> list[torch.Tensor]:
    return [
        (
            torch.empty(wire_shape(spec, batch_scale), dtype=getattr(torch, spec["dtype"]), device=device)
            if spec["kind"] == "tensor"
            else torch.empty(1, dtype=SCALAR_DTYPES[spec["kind"]], device=device)
        )
        for spec in specs
    ]
