"""What both frontends need: naming functions, turning Python/torch values into IR arguments,
recording the model's modules and state, and finding the user's source line for a node."""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import io
import logging
import operator
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.nn.functional as F

from ftc.interpreter import resolve_function
from ftc.ir import FtcError, StateTensor, TensorMeta, TorchExpr
from ftc.runtime.model_file import ModelFile

# Constants created inside forward are written into the stage code; past this many elements
# that stops being readable, and the user should register a buffer instead.
MAX_INLINE_CONSTANT = 1024


def _directory(path: Path) -> tuple[str, ...]:
    """Prefixes of the files under a directory, as a frame's code names them (the path it was
    imported by) and resolved, each ending in a separator so that a sibling package
    (torchvision beside torch) is not taken for it."""
    return tuple(dict.fromkeys(os.path.join(str(p), "") for p in (path, path.resolve())))


# Folders of installed packages, which a model file's folder may hold (a virtual environment).
INSTALLED_PACKAGES = ("site-packages", "dist-packages")

# torch's and ftc's own files, which are never the model's code
TORCH_FILES = _directory(Path(torch.__file__).parent)
FTC_FILES = _directory(Path(__file__).parents[1])


def callers(frame: FrameType | None, skipping: tuple[str, ...] = ()) -> Iterator[FrameType]:
    """`frame` and the frames that called it, innermost first, without those running a file
    under `skipping` (TORCH_FILES, FTC_FILES): the code that made a call a watcher intercepts."""
    while frame is not None:
        if not frame.f_code.co_filename.startswith(skipping):
            yield frame
        frame = frame.f_back


# torch's public function namespaces whose functions are bound from torch._C._<namespace>
PUBLIC_NAMESPACES = ("linalg", "special", "fft")


def function_expr(fn: Any, node_name: str) -> str:
    """The shortest importable spelling of a function for generated code: "F.gelu", "torch.cat",
    "operator.add", "getattr", "torch.ops.aten.view.default"."""
    if isinstance(fn, torch._ops.OpOverload):
        return f"torch.ops.{fn.namespace}.{fn._opname}.{fn._overloadname}"
    if isinstance(fn, torch._ops.OpOverloadPacket):  # torch.ops.mylib.twice(x): torch picks the overload
        return f"torch.ops.{fn._qualified_op_name.replace('::', '.')}"
    name = getattr(fn, "__name__", None)
    module = getattr(fn, "__module__", None)
    candidates = []
    if name:
        if getattr(builtins, name, None) is fn:
            candidates.append(name)
        if module in ("_operator", "operator"):
            candidates.append(f"operator.{name}")
        if module == "math":
            candidates.append(f"math.{name}")
        if getattr(F, name, None) is fn:
            candidates.append(f"F.{name}")
        if getattr(torch, name, None) is fn:
            candidates.append(f"torch.{name}")
        for namespace in PUBLIC_NAMESPACES:
            if module == f"torch._C._{namespace}":
                # torch.linalg.vector_norm is torch._C._linalg.linalg_vector_norm
                candidates.append(f"torch.{namespace}.{name.removeprefix(namespace + '_')}")
        if module and module.startswith("torch"):
            candidates.append(f"{module}.{name}")
    for expr in candidates:
        try:
            if resolve_function(expr) is fn:
                return expr
        except (FtcError, AttributeError, NameError, SyntaxError):
            continue
    if isinstance(fn, type) and issubclass(fn, tuple) and hasattr(fn, "_fields"):
        raise named_tuple_error(fn.__name__)
    if isinstance(fn, type) and dataclasses.is_dataclass(fn):
        raise dataclass_error(fn.__name__)
    where = f"{module}.{name}" if module and name else repr(fn)
    raise FtcError(
        f"node {node_name!r} calls {where}, which generated stage code cannot import "
        "(stage modules import only torch and the standard library)",
        "let tracing go through it (remove torch.fx.wrap), or put it in a module listed in LEAF_MODULES",
    )


def named_tuple_error(name: str) -> FtcError:
    return FtcError(
        f"the model builds a NamedTuple ({name}) in forward: pipeline values and outputs are tensors, numbers, "
        "plain tuples and lists, and dicts",
        "return a plain tuple or a dict of tensors instead (`return tuple(out)`, or `out._asdict()`)",
    )


def dataclass_error(name: str) -> FtcError:
    return FtcError(
        f"the model builds a dataclass ({name}) in forward: pipeline values and outputs are tensors, numbers, "
        "plain tuples and lists, and dicts",
        "return a plain tuple or a dict of its fields instead (`return (out.a, out.b)` or "
        "`return {\"a\": out.a, \"b\": out.b}`; dataclasses.astuple/asdict deep-copy the tensors)",
    )


def autocast_refused(model_file: ModelFile, line: str) -> FtcError:
    return FtcError(
        f"{line or model_file.path.name}: forward runs ops under torch.autocast, which ftc cannot carry into "
        "stage code yet",
        "remove autocast from forward and train with the config's \"precision\": \"bf16\" (every forward and "
        "the loss under torch.autocast with bfloat16, in every mode)",
    )


# A stage's own train()/eval() flag, as generated code and the interpreter read it.
STAGE_TRAINING = TorchExpr("self.training")


class TrainingFlag:
    """Stands in for a traced module's `self.training` while fx traces it. Passed to a function
    (`F.dropout(h, p, self.training)`), it is written into stage code as the stage's own
    `self.training`, so the stage follows train()/eval(). Branched on (`if self.training:`), it
    is read as the mode the model was traced in, and the places are kept in `branches` so the
    compiler can say which code stays fixed to that mode."""

    def __init__(
        self, value: bool, model_file: ModelFile, branches: list[str], reads: list[str] | None = None,
        module: Any = None, read_of: list[Any] | None = None,
    ):  # fmt: skip
        self.value, self.model_file, self.branches, self.reads = value, model_file, branches, reads
        self.module, self.read_of = module, read_of  # whose flag it is; the modules whose flags were read

    def _read(self) -> bool:
        where = user_source(self.model_file) or self.model_file.path.name
        if where not in self.branches:
            self.branches.append(where)
        if self.reads is not None:
            self.reads.append(where)  # every read, in order: the tracer ties them to the next op
        if self.read_of is not None and self.module is not None:
            self.read_of.append(self.module)
        return self.value

    def __bool__(self) -> bool:
        return self._read()

    def __eq__(self, other: object) -> bool:
        return self._read() == other

    def __hash__(self) -> int:
        return hash(self._read())

    def __repr__(self) -> str:
        return "self.training"

    # Used as a number (`1 - 0.1 * self.training`, `int(self.training)`), it is that number in
    # the traced mode, and the place is named like a branch.
    def __int__(self) -> int:
        return int(self._read())

    __index__ = __int__

    def __float__(self) -> float:
        return float(self._read())


def _as_number(operator_name: str):
    def apply(self: TrainingFlag, *others: Any) -> Any:
        return getattr(operator, operator_name)(self._read(), *others)

    return apply


def _as_number_reflected(operator_name: str):
    def apply(self: TrainingFlag, other: Any) -> Any:
        return getattr(operator, operator_name)(other, self._read())

    return apply


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lt", "le", "gt", "ge"):
    _key = f"{_name}_" if _name in ("and", "or") else _name
    setattr(TrainingFlag, f"__{_name}__", _as_number(_key))
    if _name not in ("lt", "le", "gt", "ge"):
        setattr(TrainingFlag, f"__r{_name}__", _as_number_reflected(_key))
for _name in ("neg", "pos", "invert", "abs"):
    setattr(TrainingFlag, f"__{_name}__", _as_number(_name))


def ir_arg(value: Any, ref_of, node_name: str) -> Any:
    """A traced argument as an IR argument. `ref_of(x)` returns a Ref for a graph value or None."""
    ref = ref_of(value)
    if ref is not None:
        return ref
    if isinstance(value, TrainingFlag):
        return STAGE_TRAINING
    if value is None or value is Ellipsis or isinstance(value, (bool, int, float, str, TorchExpr)):
        return value
    if isinstance(value, torch.Size):
        return tuple(int(v) for v in value)
    if isinstance(value, tuple):
        return tuple(ir_arg(v, ref_of, node_name) for v in value)
    if isinstance(value, list):
        return [ir_arg(v, ref_of, node_name) for v in value]
    if isinstance(value, dict):
        return {k: ir_arg(v, ref_of, node_name) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(*(ir_arg(v, ref_of, node_name) for v in (value.start, value.stop, value.step)))
    if isinstance(value, (torch.dtype, torch.memory_format, torch.layout)):
        return TorchExpr(str(value))
    if isinstance(value, torch.device):
        return TorchExpr(f"torch.device({str(value)!r})")
    raise FtcError(
        f"node {node_name!r} takes an argument of type {type(value).__name__} ({value!r:.60}) "
        "that ftc cannot write into generated code",
        "pass tensors, numbers, strings, dtypes or tuples of them",
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_meta(t: torch.Tensor) -> TensorMeta:
    return TensorMeta(list(t.shape), dtype_name(t.dtype), bool(t.requires_grad))


@contextlib.contextmanager
def attributes_restored(model: torch.nn.Module) -> Iterator[None]:
    """The modules' attributes and buffers that were there before the block, with the values they
    had, for a run of forward while tracing. A forward that caches a tensor on its first call
    (transformers' MimiEuclideanCodebook: `self._embed = self.embed_sum / ...`) would otherwise
    keep a fake tensor or fx's Proxy there: the next run would skip what computes it (eval_mode
    read that as a branch on self.training), torch.export would lift it as a constant without
    values, and fx's next trace would read a value of the last trace's graph. Library code may
    also keep a mode of its own in a Python number (transformers' RWKV: `layers_are_rescaled`,
    set where forward rescales weights in place as the mode changes): left as eval_mode's run
    set it, the trace that follows recorded the rescaling into the stage code, which ran it at
    every call. export itself restores what its trace assigns."""
    # A TorchScript module's attributes are TorchScript's (its forward assigns none from Python),
    # and its _buffers a view that cannot be updated.
    saved = [(module, dict(vars(module)), dict(module._buffers)) for module in model.modules()
             if not isinstance(module, torch.jit.ScriptModule)]  # fmt: skip
    try:
        yield
    finally:
        # what the block added stays, as export leaves it: fx keeps its constants on the root
        # module (`_tensor_constant0`), which its graph reads
        for module, attributes, buffers in saved:
            vars(module).update(attributes)
            module._buffers.update(buffers)


def module_table(model: torch.nn.Module, model_file: ModelFile) -> dict[str, str]:
    return {path: model_file.class_name(type(m)) for path, m in model.named_modules(remove_duplicate=False)}


def state_table(model: torch.nn.Module) -> dict[str, StateTensor]:
    """Every state_dict key (tied aliases included, each naming its first name) plus
    non-persistent buffers."""
    state = {}
    first_name: dict[int, str] = {}

    def alias_of(tensor: torch.Tensor, name: str) -> str | None:
        first = first_name.setdefault(id(tensor), name)
        return first if first != name else None

    for name, param in model.named_parameters(remove_duplicate=False):
        state[name] = StateTensor("parameter", tensor_meta(param), alias_of=alias_of(param, name))
    for module_path, module in model.named_modules(remove_duplicate=False):
        for buffer_name, buffer in module._buffers.items():
            if buffer is None:
                continue
            name = f"{module_path}.{buffer_name}" if module_path else buffer_name
            persistent = buffer_name not in module._non_persistent_buffers_set
            state[name] = StateTensor("buffer", tensor_meta(buffer), persistent, alias_of(buffer, name))
    return state


# The augmented assignments (x += y); operator.invert, operator.is_, operator.index are not.
IN_PLACE_OPERATORS = {
    f"operator.{name}" for name in ("iadd", "iand", "iconcat", "ifloordiv", "ilshift", "imatmul", "imod", "imul",
                                    "ior", "ipow", "irshift", "isub", "itruediv", "ixor")
}  # fmt: skip


def mutated_arg(op: str, target: str, kwargs: dict, module: torch.nn.Module | None) -> int | None:
    """Index of the argument an op mutates in place (always the first), or None."""
    short = target.rsplit(".", 1)[-1]
    if op == "call_module":
        return 0 if getattr(module, "inplace", False) is True else None
    if kwargs.get("inplace") is True:
        return 0
    if op == "call_method":
        return 0 if short.endswith("_") and not short.startswith("_") else None
    if op == "call_function":
        if target in IN_PLACE_OPERATORS or target in ("operator.setitem", "setattr"):
            return 0
        if target.startswith("torch.ops."):
            return None  # an operator's schema says what it writes: schema_mutated
        return 0 if short.endswith("_") and not short.startswith("_") else None
    return None


def schema_mutated(op: torch._ops.OpOverload | torch._ops.OpOverloadPacket) -> int | None:
    """Index of the first argument an operator's schema declares written (`Tensor(a!)`), or None;
    for a packet called as is (`torch.ops.mylib.twice(x)`), its overloads' where they agree."""
    if isinstance(op, torch._ops.OpOverloadPacket):
        written = {schema_mutated(getattr(op, name)) for name in op.overloads()}
        return written.pop() if len(written) == 1 else None
    for index, argument in enumerate(op._schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            return index
    return None


class CodeFiles:
    """The files that hold the model's own code, and the machine-independent names IR sources
    give them. The model's code is the model file and any file in its folder (by its path
    relative to that folder: "blocks.py", "layers/attention.py"), and the files that define the
    classes of the model's modules and their base classes, wherever they are installed (by
    their path below the sys.path entry they were imported from, which their module's name
    spells: "transformers/models/gpt2/modeling_gpt2.py"). torch's own files, ftc's and the
    standard library's are not the model's code; nor is a file no module class of the model
    comes from (a library function the model calls: its ops take the caller's line).

    profiling/profile_key.py's local_sources, the files whose contents key a measured profile, is
    another set on purpose: it lists the files the model file imports, found from its imports
    (a file in the folder that nothing imports, a test or a script, changes no profile), up to
    the package that holds the model file (a sibling subpackage's helper too), and never an
    installed library's (the traced graph and torch's version key those); this tells any file a
    frame runs, within the model file's folder only, library files of module classes included,
    for naming lines."""

    def __init__(self, model_file: ModelFile, model: torch.nn.Module | None = None):
        self.model_dir = model_file.path.resolve().parent
        self.imported: dict[Path, str] = {}
        self.names: dict[str, str] = {}
        classes = dict.fromkeys(cls for m in (model.modules() if model is not None else ()) for cls in type(m).__mro__)
        for cls in classes:
            found = importable_file(cls.__module__)
            if found is not None:
                self.imported.setdefault(*found)

    def name(self, filename: str) -> str:
        """The IR's name of the file a frame runs (its code's co_filename), "" when it is not the
        model's code."""
        if filename not in self.names:
            self.names[filename] = self._name(filename)
        return self.names[filename]

    def own(self, filename: str) -> bool:
        """Whether the file is the model file or one in its folder, not a library's."""
        return self._own(Path(filename).resolve()) is not None

    def _own(self, path: Path) -> str | None:
        if not path.is_relative_to(self.model_dir):
            return None
        relative = path.relative_to(self.model_dir)
        # not a package installed into an environment in the model's folder (.venv)
        return None if set(INSTALLED_PACKAGES) & set(relative.parts) else relative.as_posix()

    def _name(self, filename: str) -> str:
        if filename.startswith(TORCH_FILES + FTC_FILES) or not filename.endswith(".py"):
            return ""
        path = Path(filename).resolve()
        # torch's own passes name their frames by a relative path ("torch/fx/passes/
        # runtime_assert.py"), which would resolve into the model's folder
        if str(path).startswith(TORCH_FILES + FTC_FILES) or not path.is_file():
            return ""
        return self._own(path) or self.imported.get(path, "")


def importable_file(module_name: str) -> tuple[Path, str] | None:
    """(the resolved file, its path below its sys.path entry) of an imported module of neither
    torch, ftc nor the standard library, whose file its name spells ("a/b.py" or
    "a/b/__init__.py" for module "a.b"); None otherwise."""
    top = module_name.partition(".")[0]
    if top in ("torch", "ftc", "builtins", "__main__") or top in sys.stdlib_module_names:
        return None
    file = getattr(sys.modules.get(module_name), "__file__", None)
    if not file or not file.endswith(".py"):
        return None
    path = Path(file)
    relative = module_name.replace(".", "/") + ("/__init__.py" if path.name == "__init__.py" else ".py")
    if path.as_posix().endswith(f"/{relative}") or path.resolve().as_posix().endswith(f"/{relative}"):
        return path.resolve(), relative
    return None


def user_source(model_file: ModelFile, code: CodeFiles | None = None) -> str:
    """'file.py:LINE' of the innermost frame on the current stack in the model's code (`code`;
    without it, the model file and the files in its folder, such as a helper module the model
    file imports); "" when there is none."""
    frames = user_frames(code or CodeFiles(model_file))
    return frames[-1] if frames else ""


def user_frames(code: CodeFiles) -> list[str]:
    """'file.py:LINE' of every frame on the current stack in the model's code (`code`), outermost
    first: the innermost is the op's source, the others the calls that led to it. The search
    ends at ftc's own frame that started tracing, so a caller of ftc's (a test, a script beside
    the model file) is none of them."""
    frames: list[str] = []
    for frame in callers(sys._getframe(1)):
        filename = frame.f_code.co_filename
        if frames and filename.startswith(FTC_FILES):
            break
        name = code.name(filename)
        if name:
            frames.append(f"{name}:{frame.f_lineno}")
    return frames[::-1]


def constant_from_tensor(t: torch.Tensor, where: str) -> tuple[list, str]:
    if t.device.type == "meta":
        raise FtcError(
            f"{where}: a tensor constant is only known on the meta device, so its values are unknown",
            "create it from literals inside forward, or register it as a buffer in __init__",
        )
    if t.numel() > MAX_INLINE_CONSTANT:
        raise FtcError(
            f"{where}: forward creates a tensor constant of shape {list(t.shape)}, too large to write "
            "into the stage code",
            "register it in __init__ with self.register_buffer(name, tensor, persistent=False), "
            "or compute it from the inputs inside forward",
        )
    return t.detach().cpu().tolist(), dtype_name(t.dtype)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch.export logs warnings and prints whole graphs when it gives up; our error says what
    matters, so keep its output off the user's terminal."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)
