"""Loading a model file: the contract of DESIGN.md ("Model-file contract").

    def build_model() -> torch.nn.Module            required
    def example_inputs(batch_size: int)             required: a tuple (positional) or dict (keyword)
    def loss_fn(output, target) -> torch.Tensor     optional
    LEAF_MODULES = (SomeBlock,)                     optional: classes kept whole, not traced into

Both the compiler and the runtime load model files, so this lives in the runtime (which the
compiler may import; the runtime never imports the compiler).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from ftc.ir import FtcError
from ftc.runtime.seeding import seeded

# Model files are imported under this package-like prefix so they never shadow real modules.
MODULE_PREFIX = "ftc_model_file."
# The seed of the generators while a model file's top-level code runs (any fixed number: the
# same in every process), and the module attribute that records which bytes were imported.
IMPORT_SEED = 0
SOURCE_DIGEST = "__ftc_source_sha256__"


@dataclass
class ModelFile:
    path: Path
    module: ModuleType
    build_model: Callable[[], torch.nn.Module]
    example_inputs: Callable[[int], Any]
    loss_fn: Callable | None
    leaf_modules: tuple[type, ...]

    @property
    def stem(self) -> str:
        return self.path.stem

    def digest(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def build(self, device: torch.device | str | None = None) -> torch.nn.Module:
        """Call build_model(), under `device` as the default device when given (e.g. "meta")."""
        try:
            if device is None:
                model = self.build_model()
            else:
                with torch.device(device):
                    model = self.build_model()
        except Exception as exc:
            on_meta = device is not None and torch.device(device).type == "meta"
            meta_hint = (
                "ftc builds the model under torch.device(\"meta\"), where tensors have shapes but no values: build it "
                "from its configuration, without reading tensor values (.item(), .numpy(), if on a tensor) or loading "
                "weights in build_model() (pass them as the training config's `init`); where torch itself reads "
                "them (parametrizations.orthogonal checks its weight), build that part under "
                "`with torch.device(\"cpu\"):`, and ftc moves it to the meta device"
            )
            plain_hint = f"make build_model() run on its own (python -c 'import {self.path.stem}; {self.path.stem}.build_model()')"
            if on_meta and "meta" not in str(exc).lower():
                # Not an error about meta tensors (a bad config, an IndexError): most likely the
                # build fails on any device; say both.
                plain_hint += "; if it builds there, " + meta_hint[0].lower() + meta_hint[1:]
            raise FtcError(
                f"{self.path}: build_model() raised {type(exc).__name__}: {first_line(exc)}{user_frame(exc, self.path)}"
                + (" while building on the meta device" if on_meta else ""),
                meta_hint if on_meta and "meta" in str(exc).lower() else plain_hint,
            ) from exc
        if not isinstance(model, torch.nn.Module):
            raise FtcError(
                f"{self.path}: build_model() returned {type(model).__name__}, not a torch.nn.Module",
                "return the model instance from build_model()",
            )
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            raise FtcError(
                f"{self.path}: build_model() returned a torch.compile'd model ({type(model._orig_mod).__name__} "
                "wrapped in an OptimizedModule), whose forward takes *args and whose state_dict keys carry "
                "'_orig_mod.': ftc splits the model itself",
                "return the model without torch.compile (a torch.compile'd submodule is traced through into plain stage code)",
            )
        lazy = [
            f"{path} ({type(module).__name__})"
            for path, module in model.named_modules()
            if isinstance(module, torch.nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params()
        ]
        if lazy:
            raise FtcError(
                f"{self.path}: build_model() returned lazy modules whose parameters are not made yet: {', '.join(lazy)}; "
                "their shapes come from a first forward, and ftc traces and splits the model from its parameters' shapes",
                "give the layers their input sizes (nn.Linear(in_features, out_features), nn.Conv2d(in_channels, ...)), "
                "or run one forward in build_model() before returning the model "
                "(with torch.no_grad(): model(*example_inputs(2)))",
            )
        tensors = (*model.named_parameters(), *model.named_buffers())
        sparse = [name for name, tensor in tensors if tensor.layout != torch.strided]
        if sparse:
            raise FtcError(
                f"{self.path}: build_model() returned sparse tensors: {', '.join(sparse)}; ftc traces, sends and saves "
                "(safetensors) dense tensors only",
                "keep them dense: a dense adjacency (adj @ h), or its edge list as dense buffers with index_add_ or "
                "scatter_add over them in forward",
            )
        _plain_tensors_as_buffers(model)
        if device is not None and torch.device(device).type == "meta":
            # Legacy constructors (torch.FloatTensor(n, m), as transformers' XLNet makes its
            # attention weights) and torch.from_numpy ignore the default device.
            model.to("meta")
        return model

    def inputs(self, batch_size: int, device: torch.device | str | None = None) -> tuple | dict:
        """One batch from example_inputs(batch_size): a tuple of positional inputs or a dict of
        keyword inputs, each a tensor, moved to `device` when given."""
        try:
            batch = self.example_inputs(batch_size)
        except Exception as exc:
            raise FtcError(
                f"{self.path}: example_inputs({batch_size}) raised {type(exc).__name__}: {exc}"
                f"{user_frame(exc, self.path)}",
                "make example_inputs(batch_size) return one batch of that size",
            ) from exc
        if isinstance(batch, torch.Tensor):
            batch = (batch,)
        if isinstance(batch, list):
            batch = tuple(batch)
        if not isinstance(batch, (tuple, dict)):
            raise FtcError(
                f"{self.path}: example_inputs() returned {type(batch).__name__}",
                "return a tuple of tensors (positional inputs) or a dict of tensors (keyword inputs)",
            )
        items = batch.items() if isinstance(batch, dict) else enumerate(batch)
        for key, value in items:
            if not isinstance(value, torch.Tensor):
                raise FtcError(
                    f"{self.path}: example_inputs() input {key!r} is a {type(value).__name__}, not a tensor",
                    (f"leave {key!r} out of example_inputs(): an input not given takes forward's default, which "
                     "ftc writes into the stage code (so a default of None stays None)")
                    if value is None and isinstance(batch, dict)
                    else _nested_inputs_fix(value)
                    if _holds_tensors(value)
                    else "pass only tensors; put other settings in build_model() or in forward's defaults",
                )
        if device is not None:
            move = lambda t: t.to(device)  # noqa: E731
            batch = {k: move(v) for k, v in batch.items()} if isinstance(batch, dict) else tuple(map(move, batch))
        return batch

    def class_name(self, cls: type) -> str:
        """A class's name as users know it: "gpt.Block" for the model file's, else "module.Class"."""
        module = cls.__module__
        if module == self.module.__name__:
            module = self.stem
        return f"{module}.{cls.__qualname__}"


def _holds_tensors(value: Any) -> bool:
    """Whether an input is a container of tensors (a Lightning-style `batch` dict, a list of
    tensors), which ftc takes only flattened into separate inputs."""
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    return any(isinstance(item, torch.Tensor) for item in items)


def _nested_inputs_fix(value: dict | tuple | list) -> str:
    """How to give a container of tensors as inputs: its tensors become forward's parameters."""
    if isinstance(value, dict):
        names = ", ".join(map(str, value))
        return (f"return the dict itself from example_inputs() (keyword inputs, not a tuple holding it) and give "
                f"forward one parameter per key (def forward(self, {names})); data sets then yield that dict")
    return "return its tensors from example_inputs() as separate positional inputs, one forward parameter each"


def _plain_tensors_as_buffers(model: torch.nn.Module) -> None:
    """Register as non-persistent buffers, in place, the tensors modules keep as plain attributes
    (transformers' TrOCR keeps its sinusoidal position table as `self.weights`). Built on the meta
    device such a tensor has no values, torch.export fakes only parameters and buffers (it failed
    on a device mismatch), and a rank would not build it; as a buffer it is traced as one, adopted
    by its stage, built with its values on every rank and moved with the model, and it stays out
    of the state_dict, in every mode alike. Left as they are: another name of a parameter or
    buffer (transformers' rotary `original_inv_freq`), and tensors computed from parameters
    (torch.nn.utils.prune's `weight`, which its hook recomputes) or that require gradients."""
    held = {id(tensor) for tensor in (*model.parameters(), *model.buffers())}
    for module in model.modules():
        if isinstance(module, torch.jit.ScriptModule):
            continue
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.is_leaf and not value.requires_grad and id(value) not in held:
                delattr(module, name)
                module.register_buffer(name, value, persistent=False)


def import_file(
    path: Path, package: str, what: str, siblings: bool = False, folder_package: bool = False, hint: str = ""
) -> ModuleType:
    """Execute a Python file as a fresh module named under `package` (with a digest of its path,
    so files of the same name don't collide and none shadows a real module). An error while
    importing becomes an FtcError naming the file and `what` it is. `siblings`: the file may
    import modules beside it, as a model file may. `folder_package`: the file is a module of a
    package that is its folder (a generated pipeline), so that `from .mine import f` imports the
    folder's mine.py."""
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"{package}.{path.stem}_{digest}"
    if folder_package:
        package = f"{package.replace('.', '_')}_{hashlib.sha256(str(path.resolve().parent).encode()).hexdigest()[:12]}"
        if package not in sys.modules:
            holder = ModuleType(package)
            holder.__path__ = [str(path.resolve().parent)]
            sys.modules[package] = holder
        name = f"{package}.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = str(path.resolve().parent)
    if siblings:
        sys.path.insert(0, folder)
    try:
        with seeded(IMPORT_SEED):  # a top-level draw (a data set's fixed split) is the same on every rank
            spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise FtcError(f"{path}: importing the {what} raised {type(exc).__name__}: {exc}{user_frame(exc, path)}", hint) from exc
    finally:
        if siblings:
            sys.path.remove(folder)
    return module


def function_from_file(reference: str, key: str, package: str) -> Callable:
    """The function that config key `key`'s value "path/to/file.py:function" names, its file
    imported under `package`; an FtcError naming the key when the value is not of that form,
    the file is missing or it defines no such function."""
    file, sep, name = reference.rpartition(":")
    if not sep or not file or not name:
        raise FtcError(f"config key '{key}' is {reference!r}", 'give "path/to/file.py:function"')
    path = Path(file)
    if not path.is_file():
        raise FtcError(f"config key '{key}': {file} does not exist", 'give "path/to/file.py:function"')
    function = getattr(import_file(path, package, f"file of config key '{key}'", siblings=True), name, None)
    if not callable(function):
        raise FtcError(f"config key '{key}': {file} defines no function {name}()")
    return function


def load_model_file(path: str | Path) -> ModelFile:
    path = Path(path)
    if not path.is_file():
        raise FtcError(f"model file {path} does not exist", "pass the path of a .py file that defines build_model()")
    if path.suffix != ".py":
        raise FtcError(f"model file {path} is not a .py file", "pass a Python file that follows the model-file contract")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    package, root = _package_of(path)
    # A model file inside a package (a folder with __init__.py) is imported as the package's
    # module, so that its relative imports (`from .blocks import Block`) resolve; any other under
    # a name of its own, which never shadows a real module.
    name = f"{package}.{path.stem}" if package else f"{MODULE_PREFIX}{path.stem}_{digest}"
    module = _imported(name, path)
    if module is None:
        module = _import_model_file(name, path, package, root)
    functions = {}
    for required in ("build_model", "example_inputs"):
        fn = getattr(module, required, None)
        if not callable(fn):
            signature = "build_model() -> torch.nn.Module" if required == "build_model" else "example_inputs(batch_size)"
            raise FtcError(f"{path}: defines no function {required}()", f"add `def {signature}` (see the model-file contract in README.md)")
        functions[required] = fn
    needed = _required_parameters(functions["build_model"])
    if needed:
        raise FtcError(f"{path}: build_model() requires {', '.join(needed)}, but ftc calls it with no arguments",
                       f"give {'it' if len(needed) == 1 else 'them'} a default: def build_model("
                       + ", ".join(f"{name}=..." for name in needed) + ")")  # fmt: skip
    loss_fn = getattr(module, "loss_fn", None)
    if loss_fn is not None and not callable(loss_fn):
        raise FtcError(f"{path}: loss_fn is not a function", "define `def loss_fn(output, target)` or remove it")
    leaf_modules = getattr(module, "LEAF_MODULES", ())
    if isinstance(leaf_modules, type):
        leaf_modules = (leaf_modules,)
    if not isinstance(leaf_modules, (tuple, list)) or not all(
        isinstance(cls, type) and issubclass(cls, torch.nn.Module) for cls in leaf_modules
    ):
        raise FtcError(f"{path}: LEAF_MODULES must be a tuple of torch.nn.Module classes", "e.g. LEAF_MODULES = (Block,)")
    return ModelFile(path, module, functions["build_model"], functions["example_inputs"], loss_fn, tuple(leaf_modules))


def _imported(name: str, path: Path) -> ModuleType | None:
    """The model file's module when this process has imported the file as it reads now: as
    Python imports a module once, its top-level code runs once (it may register an operator
    namespace or a global hook, which a second run refuses or doubles). An edited file is
    imported anew."""
    module = sys.modules.get(name)
    if module is None or module.__dict__.get(SOURCE_DIGEST) != _digest(path):
        return None
    return module if Path(module.__file__).resolve() == path.resolve() else None


def _import_model_file(name: str, path: Path, package: str | None, root: Path | None) -> ModuleType:
    """Run the model file as module `name`, its top-level random draws (a fixed projection,
    `MIX = torch.randn(8, 8)`) from generators seeded alike in every process (and restored
    after), so that the compile, which writes such a tensor into stage code, every rank and
    every mode see the same values."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # A model file may import helpers that sit beside it, or its package's modules.
    search = [str(path.resolve().parent)] + ([str(root)] if package else [])
    sys.path[:0] = search
    try:
        if package:
            importlib.import_module(package)
        sys.modules[name] = module
        with seeded(IMPORT_SEED):
            spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        shadowing = _shadowing_file(exc, path, name)
        if shadowing:
            file, shadowed = shadowing
            which = "the model file" if file == path.name else f"{file} beside the model file"
            raise FtcError(
                f"{path}: importing the model file raised {type(exc).__name__}: {exc}{user_frame(exc, path)}; "
                f"on the way a library imported {which} as module '{shadowed}': the file's name shadows a "
                f"module '{shadowed}' that the library looks for (the model file's folder comes first on the "
                "import path, as a script's does)",
                f"rename {file} (to {shadowed}_model.py, say)",
            ) from exc
        raise FtcError(
            f"{path}: importing the model file raised {type(exc).__name__}: {exc}{user_frame(exc, path)}",
            f"run `python -m {name}` from {root} and fix the error" if package else f"run `python {path}` and fix the error",
        ) from exc
    finally:
        for folder in search:
            sys.path.remove(folder)
    module.__dict__[SOURCE_DIGEST] = _digest(path)
    return module


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _required_parameters(function: Callable) -> list[str]:
    """The parameters of `function` that a call without arguments leaves unfilled."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin or C function: its call will say
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in kinds and p.default is inspect.Parameter.empty]


def _package_of(path: Path) -> tuple[str | None, Path | None]:
    """("outer.inner", the folder above `outer`) for a file in the package outer/inner/ (folders
    with an __init__.py whose names are identifiers), else (None, None), as also when a package
    `outer` from another folder is imported already."""
    parts: list[str] = []
    folder = path.resolve().parent
    while (folder / "__init__.py").is_file() and folder.name.isidentifier():
        parts.insert(0, folder.name)
        folder = folder.parent
    if not parts:
        return None, None
    # A package of that name imported from elsewhere (another `models`) would take the imports.
    loaded = sys.modules.get(parts[0])
    if loaded is not None and folder / parts[0] not in {Path(p).resolve() for p in getattr(loaded, "__path__", [])}:
        return None, None
    return ".".join(parts), folder


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, cut at `limit` characters: torch's dispatcher
    errors go on to list every backend for dozens of lines."""
    line = (str(exc).strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _shadowing_file(exc: BaseException, path: Path, own_name: str) -> tuple[str, str] | None:
    """(file name, module name) of a file in the model file's folder, the model file itself or one
    beside it, that code outside the folder imported by a plain module name while the model file
    was being imported as `own_name`, as the exception `exc` or one it was raised from passed
    through it: a model file called xlstm.py (or one beside xlstm.py) that imports transformers,
    which looks for and imports a package `xlstm`, runs that file as module `xlstm`. None where
    only the model file and what it imported itself ran from the folder."""
    folder = path.resolve().parent
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        importer = None
        for frame, _ in traceback.walk_tb(exc.__traceback__):
            filename = frame.f_code.co_filename
            if filename.startswith("<frozen"):  # importlib's own frames, between importer and imported
                continue
            file = Path(filename).resolve()
            module = frame.f_globals.get("__name__")
            if (frame.f_code.co_name == "<module>" and file.parent == folder and module != own_name
                    and importer is not None and importer != folder):  # fmt: skip
                return file.name, module
            importer = file.parent
        exc = exc.__cause__ or exc.__context__
    return None


def user_frame(exc: BaseException, path: Path) -> str:
    """' (at file.py:LINE: source)' for the innermost traceback frame inside the model file."""
    resolved = str(path.resolve())
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename == resolved or Path(frame.filename).resolve() == path.resolve():
            return f" (at {path}:{frame.lineno}: {(frame.line or '').strip()})"
    return ""


def user_error(exc: Exception, what: str, files: list[Path], hint: str) -> FtcError:
    """An FtcError for user code (a model, a stage, a loss, a data set) that raised `exc`: what
    raised, why, and where in `files` (the innermost line in each that is on the traceback)."""
    places = "".join(dict.fromkeys(user_frame(exc, Path(file)) for file in files))
    lines = [line.rstrip() for line in str(exc).strip().splitlines() if line.strip()] or [""]
    # A message's further lines often say what was wrong (the user's own multi-line message); a
    # very long one (torch's advice after its error) is cut short.
    more = lines[1:USER_MESSAGE_LINES]
    if len(lines) > USER_MESSAGE_LINES:
        more.append(f"... ({len(lines) - USER_MESSAGE_LINES} more lines)")
    details = "".join(f"\n    {line}" for line in more)
    return FtcError(f"{what} raised {type(exc).__name__}: {lines[0]}{places}{details}", hint)


USER_MESSAGE_LINES = 8
