"""Library code that computes something else in eval mode than in the training mode the model
is traced in.

export runs forward's Python, so a branch on `self.training` (transformers' SwinDropPath:
`if not self.training: return hidden_states`) leaves only the ops of the side training mode
took, and the stages compute those in eval() too. The model's own classes are read for such
branches (training_branches.py); library code is not the model's to read line by line, and
most of its reads of the flag are harmless (`self.gradient_checkpointing and self.training`, a
dropout probability that ftc writes back as the stage's mode). So where a library class reads
the flag at all, forward runs once in each mode on the tracing's fake tensors (no export: a
fraction of its time) with the torch calls recorded, and the two records are compared with the
training arguments ftc's lowerings turn into the stage's own `self.training` (aten.py) set
aside: the calls where they still differ ran under a branch the stages do not follow op by op.
The search also runs where the model's own modules read the flag. Where the calls were made in
the call of a module without weights (SwinDropPath's, a hand-written DropPath's), the frontends
keep that call whole (export.py: a preserved call signature; fx.py: a leaf module), so the stage
calls the module and follows its mode; the library's others are named here, the model's own
from its source (training_branches.py) or by fx's reads of the flag.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import sys
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch._export.utils import _compiling_state_context
from torch._guards import detect_fake_mode
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ftc.runtime.mode import train_model
from ftc.runtime.model_file import ModelFile

from .common import CodeFiles, attributes_restored, callers, importable_file
from .draws import trace_seeded

# torch.nn's layers: ftc lowers each to a call of the layer, or writes the training flag it
# passes to an op as the stage's own, so the stages follow their mode there
_TORCH_LAYERS = "torch.nn.modules."
_TORCH_LAYERS_DIR = str(Path(torch.nn.modules.__file__).resolve().parent)

# The argument (name, position) through which aten.py's lowerings make a call follow the
# stage's train()/eval() (`training=self.training`, `dropout_p=p if self.training else 0.0`):
# what eval mode passes there is no difference the stages keep.
_MODE_ARGUMENTS = {
    F.dropout: ("training", 2),
    F.batch_norm: ("training", 5),
    F.instance_norm: ("use_input_stats", 5),
    F.scaled_dot_product_attention: ("dropout_p", 4),
    # its flag only zeroes the dropout probability, which reaches the dropout (or attention) op
    # inside it, lowered as the stage's own (transformers' WavLM attention passes self.training)
    F.multi_head_attention_forward: ("training", 13),
}


# A tensor in a call's text by the call that made it ('%=TensorBase.add'), not a parameter,
# buffer or input of the model's ('%blocks.0.norm.running_mean')
_MADE = re.compile(r"%=[^,\])\s]*")

# Calls that compute nothing a graph holds: a tensor's attributes read or set (`x.shape`;
# transformers' feature encoders set `hidden_states.requires_grad = True` when training)
_NOT_COMPUTING = {"__get__", "__set__", "requires_grad_"}


@dataclass
class _Call:
    """One torch call forward made, as the comparison sees it."""

    text: str  # the function and its arguments; a tensor by the call that made it
    # (code, line, module name) of its frames, innermost first, up to one in the model's code
    frames: list[tuple[Any, int, str]]
    module: tuple[str, type]  # path and class of the innermost module call it was made in


@dataclass
class ModeBranch:
    """A run of torch calls that forward makes in training mode and not in eval mode (or the
    reverse), from a branch on `self.training`."""

    line: str  # where its first call was made ('transformers/models/swin/modeling_swin.py:58')
    owner: type  # the class of the innermost module whose call made the calls
    paths: list[str]  # that module's paths ("" for the model itself)
    library: bool  # made in a library's code, not the model's own
    # whether a call of the module may stand for the branch's ops: not the model itself, and
    # holding no submodule with parameters (stochastic depth, a parametrization's power
    # iteration, a hand-written norm with running statistics), so that calling it whole takes
    # no layer of the model from the partitioner (transformers' Wav2Vec2Model branches on
    # self.training for its SpecAugment masking: it stays op by op); a stage that calls such a
    # module where it would run its ops follows train()/eval() as it does
    callable_whole: bool


def mode_branches(
    model: torch.nn.Module, model_file: ModelFile, code: CodeFiles, args: tuple, kwargs: dict, own_reads: bool
) -> tuple[list[ModeBranch], list[str]]:
    """The branches from which forward, run on `args` and `kwargs` (fake tensors) in eval mode,
    makes other torch calls than in training mode, and a note where the search could not be
    made. Nothing where no library code may read `training` (library_reads_training) and the
    model's own code does not (`own_reads`, which the frontend tells)."""
    library = library_reads_training(model, code)
    # a model traced in eval mode (to tell a training-only failure) has no other mode to follow
    if not model.training or (not own_reads and not library):
        return [], []
    try:
        trained = _recorded(model, code, args, kwargs)
        train_model(model, False, model_file.path)
        evaluated = _recorded(model, code, args, kwargs)
    except Exception as exc:
        first_line = str(exc).strip().partition("\n")[0]
        reason = f"{type(exc).__name__}: {first_line}"
        # the model's own branches are named from its source all the same
        return [], [f"forward could not run in eval mode on tensors without data ({reason}), so a branch on "
                    "self.training in library code, which the stages would keep as traced in training mode, is not "
                    "looked for"] if library else []  # fmt: skip
    finally:
        train_model(model, True, model_file.path)
    found: dict[tuple[str, type], ModeBranch] = {}
    for calls in _differences(trained, evaluated):
        named = next(((call, line, True) for call in calls if (line := _library_line(call, code))), None)
        if named is None and calls and (line := _own_line(calls[0], code)):
            named = (calls[0], line, False)
        if named is None:
            continue
        call, line, library = named
        path, owner = call.module
        branch = found.setdefault((line, owner), ModeBranch(line, owner, [], library, False))
        if path not in branch.paths:
            branch.paths.append(path)
    for branch in found.values():
        branch.callable_whole = "" not in branch.paths and not any(
            _holds_layers(model.get_submodule(path)) for path in branch.paths
        )
    return list(found.values()), []


def _holds_layers(module: torch.nn.Module) -> bool:
    """Whether `module` has submodules with parameters: layers that the partitioner could put on
    other stages, which a call of the whole module would take from it. A module whose parameters
    are all its own (a hand-written norm with running statistics, a noisy linear layer) is one
    layer already."""
    return any(True for child in module.children() for _ in child.parameters())


def _own_line(call: _Call, code: CodeFiles) -> str | None:
    """'file.py:LINE' where the model's own code made the call (its outermost recorded frame)."""
    frame_code, line, _ = call.frames[-1]
    return f"{code.name(frame_code.co_filename)}:{line}" if code.own(frame_code.co_filename) else None


def branch_notes(branches: list[ModeBranch], model_file: ModelFile) -> list[str]:
    """A note for each class whose modules' calls take library branches on self.training that
    the stages keep as traced in training mode, naming them and saying what to do (the model's
    own are named from its source: training_branches.py)."""
    return [
        f"{model_file.class_name(owner)} ({modules}) computes other ops in eval mode than in training mode, from "
        f"{lines} on (a branch on self.training in the library): to evaluate with the stages, build the model so "
        "that the branch does nothing (drop_path_rate=0 for stochastic depth, layerdrop=0), or judge evaluation "
        "with the original model"
        for owner, modules, lines in _by_owner([branch for branch in branches if branch.library])
    ]


def followed_notes(branches: list[ModeBranch], model_file: ModelFile) -> list[str]:
    """A note for each class whose branches on self.training the stages follow, by calling its
    modules whole."""
    return [
        f"{model_file.class_name(owner)} ({modules}) branches on self.training ({lines}): the stages call its "
        "modules whole, so they follow train() and eval() as the model does"
        for owner, modules, lines in _by_owner(branches)
    ]


def _by_owner(branches: list[ModeBranch]) -> Iterator[tuple[type, str, str]]:
    """(class, its first module path and how many more, the branches' lines) per class, in the
    order the branches were found."""
    for owner in dict.fromkeys(branch.owner for branch in branches):
        paths = list(dict.fromkeys(path or "the model" for b in branches if b.owner is owner for path in b.paths))
        more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
        yield owner, f"{paths[0]}{more}", ", ".join(branch.line for branch in branches if branch.owner is owner)


def _library_line(call: _Call, code: CodeFiles) -> str | None:
    """'file.py:LINE' where the call was made in a library: its innermost frame in a library's
    file (one CodeFiles names, or a library function's that the model's code called), or, where
    the model's own code made it, in a method of the library module class whose call made it
    (torch's spectral_norm, in torch's files, which CodeFiles names none of); None where the
    call is the model's own (training_branches.py reads its branches)."""
    for frame_code, line, module_name in call.frames:
        name = code.name(frame_code.co_filename)
        if name:
            if not code.own(frame_code.co_filename):
                return f"{name}:{line}"
            break
        library = _library_module(sys.modules.get(module_name), code)
        if library is not None:
            return f"{library[1]}:{line}"
    methods = {c for cls in call.module[1].__mro__ for c in _codes(cls)}
    for frame_code, line, module_name in call.frames:
        filename = frame_code.co_filename
        if frame_code in methods and not filename.startswith(_TORCH_LAYERS_DIR) and not code.own(filename):
            # by its path below its sys.path entry, as its module's name spells it
            return f"{module_name.replace('.', '/')}{'/__init__' if filename.endswith('__init__.py') else ''}.py:{line}"
    return None


def library_reads_training(model: torch.nn.Module, code: CodeFiles) -> bool:
    """Whether a method of the class of one of the model's modules, or of a base class, other
    than torch.nn's layers', reads an attribute `training` where it is defined in a library, or
    where it is the model's own (whose branches training_branches.py reads from the source)
    and names a library's function or module, which may take the flag (timm's `drop_path(x, p,
    self.training)`)."""
    classes = dict.fromkeys(cls for module in model.modules() for cls in type(module).__mro__)
    for function in (f for cls in classes for f in _functions(cls)):
        source = function.__code__
        if "training" not in _names(source) or source.co_filename.startswith(_TORCH_LAYERS_DIR):
            continue
        if not code.own(source.co_filename) or any(_library_module(function.__globals__.get(name), code)
                                                   for name in _names(source)):  # fmt: skip
            return True
    return False


def _functions(cls: type) -> Iterator[Any]:
    for value in vars(cls).values():
        value = getattr(value, "__func__", value)  # staticmethod, classmethod
        functions = (value.fget, value.fset) if isinstance(value, property) else (value,)
        # the function itself, not a decorator's wrapper (`@torch.no_grad()`), whose code is shared
        yield from (inspect.unwrap(f) for f in functions if hasattr(f, "__code__"))


def _codes(cls: type) -> Iterator[Any]:
    return (function.__code__ for function in _functions(cls))


def _names(code: Any) -> set[str]:
    """The global and attribute names compiled code reads, nested functions and comprehensions
    included."""
    return set(code.co_names).union(*(_names(c) for c in code.co_consts if hasattr(c, "co_names")))


def _library_module(value: Any, code: CodeFiles) -> tuple[Path, str] | None:
    """(file, its path below its sys.path entry) of the library module that is `value` or that
    defines it, where `value` is a module or a function, and the module is neither the model's
    own nor torch's, ftc's or the standard library's."""
    if inspect.isfunction(value):
        value = sys.modules.get(value.__module__)
    found = importable_file(value.__name__) if inspect.ismodule(value) else None
    return found if found is not None and not code.own(str(found[0])) else None


def _differences(trained: list[_Call], evaluated: list[_Call]) -> Iterator[list[_Call]]:
    """Each run of calls where the two records differ (the training record's; the eval record's
    where training mode made none there), without those made in torch.nn's layers. A run is
    where a branch's calls start, up to where the records agree again; the calls in it that
    differ only in tensors that other calls in it made are that branch's consequences, so they
    split it where two branches follow each other (a noisy layer's, then the next layer's)."""
    for trained_run, evaluated_run in _runs(trained, evaluated, lambda call: call.text):
        for calls in _runs(trained_run, evaluated_run, lambda call: _MADE.sub("%", call.text)):
            yield [call for call in (calls[0] or calls[1]) if not _qualified(call.module[1]).startswith(_TORCH_LAYERS)]


def _runs(
    trained: list[_Call], evaluated: list[_Call], key: Callable[[_Call], str]
) -> Iterator[tuple[list[_Call], list[_Call]]]:
    """(training calls, eval calls) of each run where the records differ by `key`."""
    matcher = difflib.SequenceMatcher(None, list(map(key, trained)), list(map(key, evaluated)), autojunk=False)
    for tag, first, last, eval_first, eval_last in matcher.get_opcodes():
        if tag != "equal":
            yield trained[first:last], evaluated[eval_first:eval_last]


def _recorded(model: torch.nn.Module, code: CodeFiles, args: tuple, kwargs: dict) -> list[_Call]:
    """The torch calls forward makes in the model's present mode, on fake tensors (factories
    too), with the random generators seeded as when tracing."""
    names = {id(t): name for name, t in [*model.named_parameters(), *model.named_buffers()]}
    inputs = tree_leaves((args, kwargs))
    names.update({id(t): f"input {k}" for k, t in enumerate(inputs) if isinstance(t, torch.Tensor)})
    modules: list[tuple[str, type]] = [("", type(model))]

    def entered(entry: tuple[str, type]) -> Any:
        return lambda *_: modules.append(entry) and None

    def left(*_: Any) -> None:
        modules.pop()

    handles = []
    for path, module in model.named_modules():
        if path:
            handles.append(module.register_forward_pre_hook(entered((path, type(module)))))
            handles.append(module.register_forward_hook(left))
    recorder = _Recorder(code, names, modules)
    try:
        # torch.compiler.is_compiling() and is_exporting() say True, as while export traces:
        # library code that asks (transformers' MoE layers) takes the path export traced
        fake = detect_fake_mode((args, kwargs)) or contextlib.nullcontext()
        with trace_seeded(), _compiling_state_context(), fake, recorder, attributes_restored(model):
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return recorder.calls


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class _Recorder(TorchFunctionMode):
    """Records each torch call (function, tensor method) that forward makes, not those made
    inside it."""

    def __init__(self, code: CodeFiles, names: dict[int, str], modules: list[tuple[str, type]]):
        super().__init__()
        self.code, self.names, self.modules = code, names, modules
        self.calls: list[_Call] = []
        self.made: list[Any] = []  # what the calls returned, kept alive so that no id is reused

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if getattr(func, "__name__", "") in _NOT_COMPUTING:
            return result
        name = getattr(func, "__qualname__", None) or getattr(getattr(func, "__self__", None), "__qualname__", "?")
        if func in _MODE_ARGUMENTS:
            keyword, position = _MODE_ARGUMENTS[func]
            args, kwargs = args[:position] + args[position + 1 :], {k: v for k, v in kwargs.items() if k != keyword}
        text = f"{name}({self._text(args)}, {self._text(kwargs)})"
        self.calls.append(_Call(text, self._frames(), self.modules[-1]))
        self.made.append(result)
        # by the call that returned it last: dropout in eval mode, and `.contiguous()` of a
        # tensor that already is, return their input, which the other mode's call made anew
        self.names.update({id(t): f"={name}" for t in tree_leaves(result) if isinstance(t, torch.Tensor)})
        return result

    def _frames(self) -> list[tuple[Any, int, str]]:
        frames = []
        for frame in callers(sys._getframe(2)):
            frames.append((frame.f_code, frame.f_lineno, frame.f_globals.get("__name__", "")))
            if self.code.name(frame.f_code.co_filename):
                break
        return frames

    def _text(self, value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"%{self.names.get(id(value), '?')}"
        if isinstance(value, dict):
            return ", ".join(f"{k}={self._text(v)}" for k, v in value.items())
        if isinstance(value, (tuple, list)):
            return f"[{', '.join(self._text(v) for v in value)}]"
        if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device, slice)):
            return repr(value)
        return type(value).__qualname__  # an object forward made anew (a cache) differs by address only
