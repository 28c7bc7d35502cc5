"""The seeded build of only some of a model's tensors: the values that `seed_generators(seed);
build_model()` gives them on the CPU, computed with only the build's ops they depend on.

Exact seeded values depend on the order of every draw from the generator, the draws made for the
tensors this rank does not keep included. So the model is built twice under a TorchDispatchMode
(torch.utils._python_dispatch), which sees every aten op the build runs:

1. a record build on the meta device logs each op: the storages it reads, writes or overwrites
   whole, and what it returns to Python; building the stages on this meta model tells which
   storages the rank keeps;
2. liveness, walking the log backwards, picks the ops to compute: those that write a storage
   whose value is read later by a kept tensor or by a computed op (an op that overwrites a whole
   tensor, as uniform_ or copy_ do, ends the need for its earlier values), and those whose result
   Python reads (`.item()` in trunc_normal_'s rejection sampling), which must see real values;
3. a replay build on the CPU, under the same seed, computes those ops and runs the rest on the
   meta device. An op that makes a storage a computed op writes later makes it on the CPU
   without computing into it (the system backs its pages once written). A seeded op (uniform_,
   normal_, randn, ...: the aten ops tagged nondeterministic_seeded) that is not computed still
   draws, on a CPU scratch tensor of the same size and strides that is then dropped, so the
   generator advances exactly as in the reference build. Storages real only on the way to a kept
   tensor are freed after their last use.

The i-th op of the replay is the i-th op of the record: builds are deterministic. Both builds
report meta tensors to the model's code as CPU tensors, as the reference build would see them
(torch.nn.init skips the draws for tensors whose `is_meta` is true). Where a model defeats this
(a build that is not deterministic, Python that reads a value the record build had to guess, an
op the meta device cannot run), the build raises Unreplayable, saying why: build_stages then
warns and builds the whole model on the CPU instead, keeping only the stages' tensors.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map_only

from .model_file import ModelFile
from .seeding import seed_generators, seeded

log = logging.getLogger(__name__)

META = torch.device("meta")
CPU = torch.device("cpu")
# Samplers whose number of draws depends on the values they sample from: they must run for real.
VALUE_DEPENDENT_SAMPLERS = {"multinomial", "poisson", "binomial", "_standard_gamma", "_sample_dirichlet"}
# In-place ops that write all of `self` without reading it.
OVERWRITERS = {
    "fill_",
    "zero_",
    "copy_",
    "uniform_",
    "normal_",
    "random_",
    "bernoulli_",
    "exponential_",
    "cauchy_",
    "log_normal_",
    "geometric_",
}
# Tensor.__deepcopy__, logged as one op of this name.
_DEEPCOPY = torch.Tensor.__deepcopy__
DEEPCOPY_OP = "Tensor.__deepcopy__"
# The tensor properties through which code tells a meta tensor from a CPU one.
_IS_META = torch._C.TensorBase.__dict__["is_meta"]
_IS_CPU = torch._C.TensorBase.__dict__["is_cpu"]
_DEVICE = torch._C.TensorBase.__dict__["device"]


class Unreplayable(Exception):
    """Why this model's seeded values cannot be built stage by stage."""


def built_values(model_file: ModelFile, seed: int, names: list[str]) -> dict[str, torch.Tensor] | None:
    """The values `seed_generators(seed); build_model()` gives the model's parameters and buffers
    `names` (qualified names), as CPU tensors, computed with only the build's ops they depend on;
    None, with the reason logged, where the build cannot be replayed op by op. The caller's
    random generators are left as they were."""

    def named(meta_model: torch.nn.Module) -> list[torch.Tensor]:
        return [tensor for name, tensor in named_state_tensors(meta_model) if name in names]

    try:
        with seeded(seed):
            model = replayed_build(model_file, seed, named)
    except Unreplayable as exc:
        log.info("%s: the values of %s are not known, because %s", model_file.path, ", ".join(names), exc)
        return None
    values = {name: tensor.detach().clone() for name, tensor in named_state_tensors(model) if name in names}
    return values if all(not tensor.is_meta for tensor in values.values()) else None


def replayed_build(
    model_file: ModelFile, seed: int, kept: Callable[[torch.nn.Module], list[torch.Tensor]]
) -> torch.nn.Module:
    """The model as `seed_generators(seed); build_model()` makes it, but with real CPU tensors
    only for what `kept` picks from the record build's model (and what they are computed from,
    freed where the model does not hold it): the rest stays on the meta device."""
    # Seeded as the replay is, so that a build that branches on a draw runs the same ops.
    seed_generators(seed)
    recorder = _Recorder()
    try:
        with _LooksReal(recorder), recorder:
            meta_model = model_file.build()
    except Exception as exc:
        raise Unreplayable(f"building it on the meta device failed: {_reason(exc)}") from exc
    if recorder.failures:
        raise Unreplayable(f"building it on the meta device failed: {_reason(recorder.failures[0])}")
    owned: set[int] = set()
    for tensor in kept(meta_model):
        storage = recorder.ids.get(_storage_key(tensor))
        if storage is not None:
            owned.add(storage)
    plan = _Plan.of(recorder.ops, owned, recorder.created)
    _log_stepping_stones(meta_model, recorder, plan, owned)
    del meta_model, recorder

    seed_generators(seed)
    replayer = _Replayer(plan)
    try:
        with _LooksReal(replayer), replayer:
            model = model_file.build()
    except Exception as exc:
        raise Unreplayable(f"the replay build failed: {_reason(exc)}") from exc
    if replayer.position != len(plan.ops):
        raise Unreplayable(
            f"build_model() is not deterministic: it ran {len(plan.ops)} ops on the meta device "
            f"and {replayer.position} on the CPU"
        )
    return model


@dataclass
class _Op:
    """One aten op of the record build: the storages (by id) of its tensor inputs and outputs,
    in pytree order, those whose values it reads, writes and overwrites whole, its outputs'
    shapes, and what it returned to Python."""

    name: str
    inputs: list[int]
    outputs: list[int]
    reads: set[int]
    writes: set[int]
    overwrites: set[int]  # written whole without being read: earlier values are dead here
    shapes: list[tuple[tuple[int, ...], torch.dtype]]
    reads_values: bool  # returns a Python value computed from tensors (.item()), or samples by value
    returns_input: int | None  # the input it returns (an in-place op returns its `self`)
    value: Any = None


class _Action(enum.Enum):
    """What the replay does with an op."""

    COMPUTE = "compute"  # run it on the CPU: the stages need what it writes
    MAKE = "make"  # its outputs must be CPU tensors (a later COMPUTE writes or views them), values unused
    SKIP = "skip"  # an in-place write to a CPU tensor whose values are dead: draw on a scratch tensor only
    LAZY = "lazy"  # run it on the meta device (draw on a scratch tensor if it is seeded)


@dataclass
class _Plan:
    ops: list[_Op]
    actions: list[_Action]
    free_after: list[list[int]]  # per op, positions in its inputs + outputs whose storage to free
    held: set[int]  # storages that are real at some point of the replay

    @classmethod
    def of(cls, ops: list[_Op], owned: set[int], created: set[int]) -> _Plan:
        # Liveness, backwards: an op is computed when a storage it writes has a value needed later.
        live = set(owned)
        actions = [_Action.LAZY] * len(ops)
        for position in range(len(ops) - 1, -1, -1):
            op = ops[position]
            if op.reads_values or not live.isdisjoint(op.writes):
                actions[position] = _Action.COMPUTE
                live -= op.overwrites
                live |= op.reads
        held = set(owned)
        for op, action in zip(ops, actions):
            if action is _Action.COMPUTE:
                held |= set(op.inputs) | set(op.outputs)
        for position, op in enumerate(ops):
            if actions[position] is _Action.LAZY and not held.isdisjoint(op.outputs):
                actions[position] = _Action.SKIP if op.returns_input is not None else _Action.MAKE
        last_use: dict[int, int] = {}
        for position, op in enumerate(ops):
            for storage in op.inputs + op.outputs:
                last_use[storage] = position
        freeable = (held - owned) & created
        free_after = []
        for position, op in enumerate(ops):
            slots: dict[int, int] = {}
            for slot, storage in enumerate(op.inputs + op.outputs):
                if storage in freeable and last_use[storage] == position:
                    slots.setdefault(storage, slot)
            free_after.append(sorted(slots.values()))
        return cls(ops, actions, free_after, held)


class _LooksReal(TorchFunctionMode):
    """Shows the model's code meta tensors as the CPU tensors they stand for. Tensor.__deepcopy__
    chooses its ops by the tensor's true device, so `build` takes it as one step."""

    def __init__(self, build: _Recorder | _Replayer) -> None:
        super().__init__()
        self.build = build

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _DEEPCOPY:
            return self.build.deepcopy(func, args, kwargs)
        result = func(*args, **kwargs)
        getter = getattr(func, "__self__", None)
        if getter is _IS_META:
            return False
        if getter is _IS_CPU and args[0].is_meta:
            return True
        if getter is _DEVICE and result == META:
            return CPU
        return result


class _Recorder(TorchDispatchMode):
    """The record build: every op on the meta device (ops on Python data only, such as the
    result of torch.tensor(0.5), run for real), logged as _Op."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[_Op] = []
        self.ids: dict[int, int] = {}  # storage address -> storage id
        self.created: set[int] = set()  # storages an op made (not ones that came from Python)
        self._alive: list[torch.UntypedStorage] = []  # so that no storage address is reused
        # Ops the meta device could not run. A build may catch the error and go on (torch's
        # parametrize takes geqrf's NotImplementedError on meta for "no right inverse" and leaves
        # orthogonal's `base` buffer None), so the recorded model is not the one the CPU builds.
        self.failures: list[Exception] = []

    def storage_id(self, tensor: torch.Tensor, made: bool) -> int:
        key = _storage_key(tensor)
        if key not in self.ids:
            self.ids[key] = len(self.ids)
            self._alive.append(tensor.untyped_storage())
            if made:
                self.created.add(self.ids[key])
        return self.ids[key]

    def deepcopy(self, func, args: tuple, kwargs: dict) -> torch.Tensor:
        source = args[0]
        with _disable_current_modes():
            result = func(*args, **kwargs)
        source_id = self.storage_id(source, made=False)
        result_id = self.storage_id(result, made=True)
        shapes = [(tuple(result.shape), result.dtype)]
        self.ops.append(
            _Op(DEEPCOPY_OP, [source_id], [result_id], {source_id}, {result_id}, set(), shapes, False, None)
        )
        return result

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunction():
            inputs = _tensors((args, kwargs))
            input_ids = [self.storage_id(t, made=False) for t in inputs]
            returns_tensors = _returns_tensors(func)
            reads_values = (bool(inputs) and _returns_python_value(func)) or func._opname in VALUE_DEPENDENT_SAMPLERS
            if inputs and not any(t.is_meta for t in inputs):
                result = func(*args, **kwargs)
            else:
                try:
                    result = _run_lazily(func, args, kwargs, inputs)
                except Exception as exc:
                    if returns_tensors:
                        self.failures.append(exc)
                        raise
                    try:
                        result = _guess(func, inputs)
                    except Unreplayable as unsupported:
                        self.failures.append(unsupported)
                        raise
            outputs = _tensors(result)
            output_ids = [self.storage_id(t, made=True) for t in outputs]
            written = {self.ids[_storage_key(t)] for t in _written(func, args, kwargs)}
            overwrites = set()
            if func._opname in OVERWRITERS and _covers_its_storage(args[0]):
                overwrites.add(input_ids[0])
            reads = set(input_ids[1:]) if overwrites else set(input_ids)
            returned = [k for k, t in enumerate(inputs) if outputs and outputs[0] is t]
            self.ops.append(
                _Op(
                    str(func),
                    input_ids,
                    output_ids,
                    reads,
                    written | set(output_ids),
                    overwrites,
                    [(tuple(t.shape), t.dtype) for t in outputs],
                    reads_values,
                    returned[0] if written and len(outputs) == 1 and returned else None,
                    None if returns_tensors else result,
                )
            )
            return result


class _Replayer(TorchDispatchMode):
    """The replay build: the plan's ops for real on the CPU, the others on the meta device."""

    def __init__(self, plan: _Plan) -> None:
        super().__init__()
        self.plan = plan
        self.position = 0

    def next_op(self, name: str) -> tuple[int, _Op]:
        position = self.position
        self.position += 1
        ops = self.plan.ops
        if position >= len(ops) or _op_key(ops[position].name) != _op_key(name):
            expected = ops[position].name if position < len(ops) else "no more ops"
            raise Unreplayable(
                f"build_model() is not deterministic: op {position} was {expected} on the meta device "
                f"and {name} on the CPU"
            )
        return position, ops[position]

    def deepcopy(self, func, args: tuple, kwargs: dict) -> torch.Tensor:
        position, op = self.next_op(DEEPCOPY_OP)
        source = args[0]
        with _disable_current_modes():
            if self.plan.actions[position] is not _Action.LAZY:
                if source.is_meta:
                    raise Unreplayable(
                        f"op {position} (a deepcopy) needs the value of a tensor this rank does not hold"
                    )
                result = func(*args, **kwargs)
            elif type(source) is torch.Tensor:
                result = _on_meta(source).requires_grad_(source.requires_grad)
            else:
                raise Unreplayable(f"op {position} deep-copies a {type(source).__name__}, which only a whole build can")
        if [(tuple(result.shape), result.dtype)] != op.shapes:
            raise Unreplayable(f"build_model() is not deterministic: op {position} (a deepcopy) made other shapes")
        return result

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunction():
            position, op = self.next_op(str(func))
            action = self.plan.actions[position]
            inputs = _tensors((args, kwargs))
            real_inputs = not any(t.is_meta for t in inputs)
            if action is _Action.COMPUTE or (action is _Action.MAKE and real_inputs):
                if not real_inputs:
                    raise Unreplayable(f"op {position} ({func}) needs the value of a tensor this rank does not hold")
                result = func(*args, **_with_device(func, kwargs, CPU, only_from=META))
                if op.reads_values and not _returns_tensors(func) and not _same_value(result, op.value):
                    raise Unreplayable(
                        f"build_model() branches on a tensor value (op {position}, {func}) that the meta build could "
                        f"not know ({op.value!r} guessed, {result!r} on the CPU)"
                    )
            else:
                if torch.Tag.nondeterministic_seeded in func.tags:
                    func(*_scratch(args), **_scratch(_with_device(func, kwargs, CPU)))
                if action is _Action.SKIP and not inputs[op.returns_input].is_meta:
                    result = inputs[op.returns_input]
                else:
                    result = _run_lazily(func, args, kwargs, inputs)
                    if action is _Action.MAKE:
                        result = tree_map_only(torch.Tensor, _empty_on_cpu, result)
            outputs = _tensors(result)
            if [(tuple(t.shape), t.dtype) for t in outputs] != op.shapes:
                raise Unreplayable(f"build_model() is not deterministic: op {position} ({func}) made other shapes")
            touched = inputs + outputs
            if len(touched) == len(op.inputs) + len(op.outputs):  # else (lift_fresh) the slots do not line up
                for slot in self.plan.free_after[position]:
                    if not touched[slot].is_meta:
                        touched[slot].untyped_storage().resize_(0)
            return result


def _op_key(name: str) -> str:
    """Ops that are one step of the build whatever the device: torch's indexing turns a Python
    scalar into a tensor with lift_fresh on the CPU and with scalar_tensor on other devices."""
    return "aten.scalar_tensor.default" if name == "aten.lift_fresh.default" else name


def _covers_its_storage(tensor: torch.Tensor) -> bool:
    """Whether the tensor's elements are exactly its storage's, each once (any dim order)."""
    if tensor.storage_offset() != 0 or tensor.numel() * tensor.element_size() != tensor.untyped_storage().nbytes():
        return False
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride()) if size != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _empty_on_cpu(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device=CPU)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _returns_tensors(func) -> bool:
    return any("Tensor" in str(ret.type) for ret in func._schema.returns)


def _returns_python_value(func) -> bool:
    return bool(func._schema.returns) and not _returns_tensors(func)


def _written(func, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    written = []
    for k, argument in enumerate(func._schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            written += _tensors(args[k] if k < len(args) else kwargs.get(argument.name))
    return written


def _with_device(func, kwargs: dict, device: torch.device, only_from: torch.device | None = None) -> dict:
    """kwargs with a factory's `device` set to `device` (only where it was `only_from`, if given)."""
    if not any(argument.name == "device" for argument in func._schema.arguments):
        return kwargs
    current = kwargs.get("device")
    if only_from is not None and (current is None or torch.device(current) != only_from):
        return kwargs
    updated = dict(kwargs, device=device)
    if device == META and updated.get("pin_memory"):
        updated["pin_memory"] = False
    return updated


def _run_lazily(func, args: tuple, kwargs: dict, inputs: list[torch.Tensor]) -> Any:
    """The op on the meta device, except where running it as asked costs nothing or is the only
    way: a factory of empty tensors, and an op that puts a storage into CPU tensors (torch's
    storage copies, as in Tensor.__deepcopy__, make an empty tensor and set_ a storage into it)."""
    takes_storage = any(
        isinstance(leaf, (torch.UntypedStorage, torch.TypedStorage)) for leaf in tree_flatten((args, kwargs))[0]
    )
    if takes_storage and not any(t.is_meta for t in inputs):
        return func(*args, **kwargs)
    result = func(*_on_meta(args), **_on_meta(_with_device(func, kwargs, META)))
    outputs = _tensors(result)
    if not inputs and outputs and all(t.numel() == 0 for t in outputs):
        return func(*args, **kwargs)
    return result


def _on_meta(tree: Any) -> Any:
    return tree_map_only(
        torch.Tensor,
        lambda t: t if t.is_meta else torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=META),
        tree,
    )


def _scratch(tree: Any) -> Any:
    """CPU stand-ins of the same sizes and strides: the CPU samplers draw differently for
    contiguous and strided tensors."""
    return tree_map_only(
        torch.Tensor,
        lambda t: torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=CPU).zero_(),
        tree,
    )


def _guess(func, inputs: list[torch.Tensor]) -> Any:
    """A Python value the record build hands the model where it reads a meta tensor's value
    (the replay build checks it): zero, which is what rejection samplers see when all is well."""
    kind = str(func._schema.returns[0].type) if len(func._schema.returns) == 1 else ""
    if kind == "number":  # a Scalar: its Python type follows the tensor's dtype
        kind = {torch.bool: "bool"}.get(inputs[0].dtype, "float" if inputs[0].dtype.is_floating_point else "int")
    if kind == "bool":
        return False
    if kind in ("int", "SymInt"):
        return 0
    if kind == "float":
        return 0.0
    raise Unreplayable(f"build_model() calls {func} on a tensor the meta device cannot evaluate")


def _same_value(a: Any, b: Any) -> bool:
    return a == b or (a != a and b != b)  # NaN equals NaN here


def _reason(exc: BaseException) -> str:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, Unreplayable):
            return str(cause)
        cause = cause.__cause__
    return f"{type(exc).__name__}: {exc}"


def named_state_tensors(module: torch.nn.Module):
    """(qualified name, tensor) of every parameter and buffer, each alias under each name."""
    for prefix, submodule in module.named_modules(remove_duplicate=False):
        for tensors in (submodule._parameters, submodule._buffers):
            for name, tensor in tensors.items():
                if tensor is not None:
                    yield (f"{prefix}.{name}" if prefix else name), tensor


def state_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [tensor for _, tensor in named_state_tensors(module)]


def _log_stepping_stones(model: torch.nn.Module, recorder: _Recorder, plan: _Plan, owned: set[int]) -> None:
    """Say which tensors of other stages are computed (then freed) because the stages' values
    or Python reads depend on them."""
    computed = sorted(
        name
        for name, tensor in named_state_tensors(model)
        if (storage := recorder.ids.get(_storage_key(tensor))) is not None
        and storage in plan.held
        and storage not in owned
    )
    if computed:
        log.info("computing %s for real, then freeing them: the stages' values depend on them", ", ".join(computed))
