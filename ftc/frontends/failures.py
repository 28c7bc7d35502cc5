"""Why a trace failed, said so that the user can act: each error names where in the model file
(or the library line it called) the tracer gave up, the cause where one is known (a forward that
fails however it runs, a path taken only while compiled, a random layer skip, a loop over a
tensor's values, torch.distributions' argument checks, flex_attention, packed sequences), and
the edit that cures it. Kept apart from the tracing itself (frontends/__init__.py), which only
decides which tracer's failure to explain."""

from __future__ import annotations

import inspect
import linecache
import re
import sys
import sysconfig
import traceback
from pathlib import Path
from types import FrameType

import torch
import torch.nn.attention.flex_attention as flex_attention_module

from ftc.ir import FtcError
from ftc.runtime import model_file as model_file_module
from ftc.runtime.mode import train_model
from ftc.runtime.model_file import ModelFile, first_line, user_frame

from .common import quiet
from .draws import drawn_from
from .export import TRACE_DEVICE, not_a_tensor_output, on_fake_device, trace_export
from .fx import (
    BufferAssigned,
    ConstantChanged,
    DrawnWhileTracing,
    RootHooked,
    StateUntraced,
    StateWrittenUntraced,
    input_names,
)
from .meta import fails_only_on_meta, missing_fake_kernel, plain_failure_fix


def export_failure(
    model_file: ModelFile,
    model: torch.nn.Module,
    exc: BaseException,
    frontend: str,
    fx_error: BaseException | None,
    batch: tuple | dict,
    double_batch: tuple | dict,
    batch_size: int,
    name: str,
) -> FtcError:
    """The error for torch.export's failure `exc` to trace `model` (fx's failure `fx_error`
    came first under --frontend auto): the cause where one is known (forward fails however it
    runs, a path taken only while compiled, batch size 1, TorchScript, Python that branches on
    values only while training), else each tracer's own line."""
    failure = (
        not_a_tensor_output(exc) or forward_failure(model_file, batch) or compiling_path_failure(model_file, batch, exc)
    )
    if failure is not None:
        return failure
    if batch_size == 1 and "Constraints violated" in str(exc):
        return FtcError(
            f"{model_file.path}: torch.export cannot trace at batch size 1 (it fixes dimensions of size 1, "
            "so the batch dimension cannot stay symbolic)",
            "compile with --batch-size 2 or more",
        )
    scripted: list[str] = []  # the outermost ones: what the model file scripted
    for path, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule) and not any(path.startswith(f"{s}.") for s in scripted):
            scripted.append(path)
    if scripted:
        return FtcError(
            f"{model_file.path}: torch.export cannot trace TorchScript submodules "
            f"({', '.join(repr(path) for path in scripted)}): {one_line(model_file, exc)}",
            "compile with --frontend fx (or auto), which keeps them whole"
            if frontend == "export"
            else f"torch.fx could not trace the model either ({one_line(model_file, fx_error)}): fix that, "
            "or use the plain nn.Module instead of its torch.jit.script form",
        )
    # A distribution's argument check fails only where forward makes one, and GroupViT makes its
    # Gumbel only while training: the check, not a layer skip, is what to turn off.
    if type(exc).__name__ == "GuardOnDataDependentSymNode" and not checks_distribution_arguments(exc):
        in_eval_mode = _eval_mode_failure(model_file, batch, double_batch, name)
        if in_eval_mode is None:
            return _training_only_branch(model_file, exc)
        if _skips_layers(model_file, exc):
            # The layer skip comes first in training mode and hides the eval-mode failure
            # (NLLB-MoE: layerdrop, then its expert loop): both must go.
            eval_error = untraceable(model_file, "torch.export", in_eval_mode)
            training_error = _training_only_branch(model_file, exc)
            return FtcError(
                training_error.message.replace(", but it can in eval mode", "")
                + f"; in eval mode, where the skip is off, {eval_error.message.split(': ', 1)[1]}",
                f"{training_error.hint}; and for eval mode's failure: {eval_error.hint}",
            )
    if frontend == "auto":
        return untraceable(model_file, "torch.fx and torch.export", fx_error, exc)
    return untraceable(model_file, "torch.export", exc)


def written_size_refused(model_file: ModelFile, written: set[str]) -> FtcError:
    """A trace that failed on a size even with the 0-d integer buffers forward writes kept as
    buffers, the others read as constants: a size depends on a buffer forward writes."""
    names = ", ".join(sorted(written))
    return FtcError(
        f"{model_file.path}: forward computes a size from 0-d integer buffers, which torch.export traces without "
        f"values, and writes {names} (a counter): ftc reads such buffers as constants of the values build_model() "
        "gives them, which would drop that write, so it stays a buffer, and a size computed from it cannot be traced",
        f"compute sizes only from buffers forward does not write, and keep the counter ({names}) apart from them",
    )


def one_line(model_file: ModelFile, exc: BaseException, noted: bool = False) -> str:
    """fx's error in one line: where in the model file, and what. For a note ir.json keeps
    (`noted`), files go by the names stage comments give them (the model file's own name, a
    library's path below its sys.path entry), so that the bytes do not depend on how the model
    file was named on the command line or where the library is installed."""
    where = user_frame(exc, model_file.path)
    if where and noted:
        where = where.replace(f" (at {model_file.path}:", f" (at {model_file.path.name}:", 1)
    return f"{type(exc).__name__}: {first_line(exc, limit=120)}{where or library_frame(exc, model_file.path, noted)}"


FLEX_ATTENTION = Path(flex_attention_module.__file__)


def flex_attention_refused(model_file: ModelFile, error: FtcError) -> FtcError | None:
    """The error for a trace that failed inside torch's flex_attention (called by the model file,
    a LEAF_MODULES class or a library: transformers' attn_implementation="flex_attention"), found
    along `error`'s causes; None when none failed there. Each tracer gave its own first line (fx:
    control flow on a traced value; export: no backward on the CPU; a leaf: its CPU run failed),
    with a fix about data-dependent Python or stand-in inputs that no edit of the model could
    follow: flex_attention does not run on the meta device, and not with gradients on the CPU."""
    skipped = [Path(torch.__file__).parent, Path(__file__).parents[1]]
    cause, seen = error.__cause__, set()
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        caller = None
        for frame in traceback.extract_tb(cause.__traceback__):
            path = Path(frame.filename)
            if path == FLEX_ATTENTION:
                where = f" at {caller.filename}:{caller.lineno}: {(caller.line or '').strip()}" if caller else ""
                return FtcError(
                    f"{model_file.path}: forward calls torch's flex_attention{where}, which ftc cannot compile: it "
                    "runs neither on the meta device, where ftc traces the model and learns the shapes of its values, "
                    "nor with gradients on the CPU (\"FlexAttention does not support backward on CPU\"), so no "
                    "tracer can record it, and a LEAF_MODULES class that calls it cannot run either",
                    "compute the attention with F.scaled_dot_product_attention (a block_mask or score_mod becomes "
                    "its attn_mask, or is_causal=True); build a transformers model with attn_implementation=\"sdpa\" "
                    "(or \"eager\") in its config instead of \"flex_attention\"",
                )
            if not frame.filename.startswith("<") and not any(path.is_relative_to(root) for root in skipped):
                caller = frame
        cause = cause.__cause__ or cause.__context__
    return None


def library_frame(exc: BaseException, model_path: Path, below_sys_path: bool = False) -> str:
    """' (at file.py:LINE: source)' for the innermost traceback frame outside torch, ftc and
    Python's standard library when it is not in the model file: where a library the model file
    calls (transformers' modeling code, say) did what the tracer could not follow; '' otherwise.
    `below_sys_path` names the file by its path below its sys.path entry."""
    frame = _innermost_outside(exc)
    path = Path(frame.filename) if frame is not None else None
    if path is None or path.resolve() == model_path.resolve():
        return ""
    shown = _below_sys_path(path) if below_sys_path else path
    return f" (at {shown}:{frame.lineno}: {(frame.line or '').strip()})"


def _innermost_outside(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame outside torch, ftc (its compiler and runtime) and Python's
    standard library: the model's code or a library's it called."""
    skipped = [Path(torch.__file__).parent, Path(__file__).parents[1], Path(model_file_module.__file__).parent,
               Path(sysconfig.get_paths()["stdlib"])]  # fmt: skip
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = Path(frame.filename)
        if not frame.filename.startswith("<") and not any(path.is_relative_to(root) for root in skipped):
            return frame
    return None


def _below_sys_path(path: Path) -> str:
    """`path` relative to the deepest sys.path entry that holds it ("transformers/x.py"); as it is
    where none does."""
    resolved = path.resolve()
    entries = [Path(entry or ".").resolve() for entry in sys.path]
    holders = [entry for entry in entries if resolved.is_relative_to(entry)]
    return resolved.relative_to(max(holders, key=lambda entry: len(entry.parts))).as_posix() if holders else str(path)


def checks_distribution_arguments(exc: BaseException) -> bool:
    """Whether the trace failed inside torch.distributions' argument validation (on by default),
    which compares tensor values."""
    distributions = Path(torch.distributions.__file__).parent
    return any(Path(frame.filename).is_relative_to(distributions) for frame in traceback.extract_tb(exc.__traceback__))


def forward_failure(model_file: ModelFile, batch: tuple | dict) -> FtcError | None:
    """An error for a forward that fails on example_inputs() however it runs (a shape mismatch),
    which is why no tracer could follow it; None when forward runs on the meta device."""
    model = model_file.build("meta")  # a tracer that gave up may have left its state on the modules
    try:
        with quiet():
            model(**batch) if isinstance(batch, dict) else model(*batch)
    except Exception as exc:
        where = user_frame(exc, model_file.path)
        unfakeable = missing_fake_kernel(exc)
        if unfakeable is not None:
            return FtcError(f"{model_file.path}: {unfakeable.message}{where}", unfakeable.hint)
        if fails_only_on_meta(exc):
            return None
        inputs = batch if isinstance(batch, dict) else dict(zip(input_names(model, batch).fed, batch))
        return FtcError(f"{model_file.path}: forward raised {type(exc).__name__}: {first_line(exc, limit=120)}{where}",
                        plain_failure_fix(inputs))  # fmt: skip
    return None


def compiling_path_failure(model_file: ModelFile, batch: tuple | dict, exc: BaseException) -> FtcError | None:
    """An error for a forward that fails only while it is traced, because code it runs takes
    another path then (transformers' `if attention_mask is None and not
    is_torchdynamo_compiling():` leaves the mask None while torch.export traces, and Switch
    Transformers then subscripts it, LongT5 concatenates a bias of batch 1 to one of the batch);
    None where forward, told that it is compiled (torch.compiler.is_compiling()), runs or fails
    otherwise. The inputs left None are read where the code asks and where it fails."""
    if type(exc).__module__.split(".")[0] == "torch":
        return None  # the tracer's own refusal, not the model's code failing
    model = model_file.build("meta")
    train_model(model, True, model_file.path)
    asked: dict[str, list[str]] = {}  # "file:line: source" of each place that asked -> its names that are None
    is_compiling = torch.compiler.is_compiling

    def compiling() -> bool:
        place, names = _asking_place(sys._getframe(1))
        asked.setdefault(place, names)
        return True

    torch.compiler.is_compiling = compiling
    try:
        # on the fake CPU tensors export traces on, so that code making CPU tensors runs as it did there
        with quiet(), on_fake_device(model, batch, TRACE_DEVICE) as fake_batch:
            model(**fake_batch) if isinstance(fake_batch, dict) else model(*fake_batch)
    except Exception as again:
        if not _same_failure(again, exc):
            return None
        none_names = [name for names in asked.values() for name in names] + _none_names(again)
    else:
        return None
    finally:
        torch.compiler.is_compiling = is_compiling
    inputs = inspect.signature(model.forward).parameters
    missing = [name for name in dict.fromkeys(none_names)
               if name in inputs and (not isinstance(batch, dict) or name not in batch)]  # fmt: skip
    fix = (f"pass {' and '.join(missing)} in example_inputs() (a key of its dict), so that the path forward takes "
           "while traced has it") if missing else (  # fmt: skip
        "give forward, in example_inputs(), the optional inputs that path reads (one left None there)")
    where = f" (at {next(iter(asked))})" if asked else ""
    return FtcError(
        f"{model_file.path}: forward fails only while it is traced ({type(exc).__name__}: {first_line(exc, limit=120)}"
        f"{library_frame(exc, model_file.path) or user_frame(exc, model_file.path)}): code it runs asks whether it is "
        f"being compiled (torch.compiler.is_compiling(), transformers' is_torchdynamo_compiling()){where} and then "
        "skips what it does otherwise" + (f": {', '.join(missing)} stays None there" if missing else ""),
        fix,
    )


def _asking_place(frame: FrameType) -> tuple[str, list[str]]:
    """'file:line: source' of the code that asked whether it is compiled, past the wrappers that
    only return the answer (transformers' is_torchdynamo_compiling), and the names on that line
    whose values are None there."""
    source = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    while source.startswith("return") and frame.f_back is not None:
        frame = frame.f_back
        source = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    return f"{frame.f_code.co_filename}:{frame.f_lineno}: {source}", _none_on_line(frame, frame.f_lineno)


def _same_failure(again: BaseException, exc: BaseException) -> bool:
    """Whether forward run outside the tracer failed as the traced one did: the same kind of
    error at the same line of the model's or a library's code. Not by the message, which gives
    sizes as symbols in the trace (`got s72`) and is worded otherwise by the kernels that run on
    real sizes (`Expected size 1 but got size 4`)."""
    return type(again) is type(exc) and _failing_line(again) == _failing_line(exc)


def _failing_line(exc: BaseException) -> tuple[str, int] | None:
    frame = _innermost_outside(exc)
    return None if frame is None else (frame.filename, frame.lineno)


# A line that asserts: Python's statement, or torch._assert, which export runs as one.
_ASSERTS = re.compile(r"assert\b|torch\._assert\(")


def _value_assert(exc: BaseException, model_file: ModelFile) -> str | None:
    """The cure for an assert on tensor values that stopped torch.export (`assert torch.all(x >=
    0).item()`: a guard on a value the trace does not have); None for any other failure. fx fails
    the same way on a shape check, which export traces."""
    place = _innermost_outside(exc)
    if type(exc).__name__ != "GuardOnDataDependentSymNode" or place is None or not _ASSERTS.match((place.line or "").strip()):
        return None
    path = Path(place.filename)
    if path.resolve() == model_file.path.resolve():
        return (f"the assert at {path.name}:{place.lineno} checks tensor values, which no trace can follow (a trace "
                "has shapes, not values): check the data before forward, or write the check as "
                "torch._assert_async(condition, message), which both tracers record and stage code leaves out")  # fmt: skip
    cure = (f"the library's assert at {_below_sys_path(path)}:{place.lineno} checks tensor values, which no trace "
            "can follow")  # fmt: skip
    # ProphetNet's `decoder_input_ids = self._shift_right(labels)` asserts on the labels' values;
    # given decoder_input_ids, forward does not call it.
    asserting = [frame for frame, line in traceback.walk_tb(exc.__traceback__)
                 if frame.f_code.co_filename == place.filename and line == place.lineno]  # fmt: skip
    caller = asserting[-1].f_back if asserting else None
    if caller is not None:
        code = caller.f_code
        made = re.match(r"\s*(\w+)\s*=", linecache.getline(code.co_filename, caller.f_lineno))
        if made and made.group(1) in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]:
            return (f"{cure}: it runs where {code.co_name} makes its input {made.group(1)!r} "
                    f"({_below_sys_path(Path(code.co_filename))}:{caller.f_lineno}), which it does only when "
                    f"{made.group(1)!r} is not given: give {made.group(1)!r} in example_inputs()")  # fmt: skip
    return f"{cure}: call the library with inputs that do not take that path"


def _none_names(exc: BaseException) -> list[str]:
    """The names on the failing line of the innermost frame whose values are None there."""
    frames = list(traceback.walk_tb(exc.__traceback__))
    return _none_on_line(*frames[-1]) if frames else []


def _none_on_line(frame: FrameType, line: int) -> list[str]:
    """The names on line `line` of `frame`'s code whose values are None in the frame."""
    source = linecache.getline(frame.f_code.co_filename, line)
    names = dict.fromkeys(re.findall(r"\b[A-Za-z_]\w*\b", source))
    return [name for name in names if name in frame.f_locals and frame.f_locals[name] is None]


def _eval_mode_failure(model_file: ModelFile, batch, double_batch, name: str) -> BaseException | None:
    """Why torch.export cannot trace the model in eval mode either; None where it can, which it
    could not in training mode."""
    model = model_file.build("meta")
    model.eval()
    try:
        with quiet(), drawn_from([]):
            trace_export(model, model_file, batch, double_batch, name)
    except Exception as exc:
        return exc
    return None


def _skips_layers(model_file: ModelFile, exc: BaseException) -> bool:
    """Whether the failing line branches on a random draw (transformers' layerdrop)."""
    return bool(_DRAWS.search(user_frame(exc, model_file.path) + library_frame(exc, model_file.path)))


def _training_only_branch(model_file: ModelFile, exc: BaseException) -> FtcError:
    """Python that branches on a tensor's value only in training mode: most often a random skip of
    a whole layer (transformers' layerdrop, stochastic depth), whose outcome a trace would fix
    once for every step; else a check or a log of values, or a choice between two updates of
    running state (I-BERT's QuantAct sets its running range at the first step, then averages it),
    which no configuration turns off."""
    where = f"{user_frame(exc, model_file.path)} ({type(exc).__name__}: {first_line(exc, limit=120)}" \
            f"{library_frame(exc, model_file.path)})"  # fmt: skip
    failed = f"{model_file.path}: torch.export could not trace the model in training mode{where}, but it can in eval mode"
    if _skips_layers(model_file, exc):
        return FtcError(
            f"{failed}: forward's Python branches on a tensor's value only while training, as a random skip of whole "
            "layers does",
            "turn the training-only branch off in the model's configuration (transformers: layerdrop=0.0, or "
            "encoder_layerdrop=0.0 and decoder_layerdrop=0.0), or write the skip with torch ops (scale the layer's "
            "output by a torch.bernoulli draw) so that it becomes stage code",
        )
    return FtcError(
        f"{failed}: forward's Python branches on a tensor's value only while training (a check or a log of values, "
        "or a choice between two updates of running state, as I-BERT's QuantAct sets its running range at the first "
        "step and averages it after), which no tracer can follow",
        "write the branch with torch ops: a choice between two values as torch.where(condition, one, other) "
        "(buffer = torch.where(first, value, average)); a check or a log can be left out; in a library's code, "
        "subclass the module in the model file with the branch written so and give the model's modules that class "
        "in build_model()",
    )


# Words of a line that branches on a random draw (a layer skip): `torch.rand([]) < self.layerdrop`.
_DRAWS = re.compile(r"rand|layerdrop|drop_path|dropout|bernoulli|random")


def _value_loop_owner(exc: BaseException, model_file: ModelFile) -> str | None:
    """The class whose forward export failed in on a guard at a `for` statement (iterating over
    a tensor whose length depends on values, nonzero()'s result, so the trace cannot know how
    many times to run); None where it failed elsewhere."""
    if type(exc).__name__ != "GuardOnDataDependentSymNode":
        return None
    where = user_frame(exc, model_file.path) or library_frame(exc, model_file.path)
    loop = re.search(r":(\d+): for \S.* in .+:\)$", where)
    if not loop:
        return None
    line = int(loop.group(1))
    owners = [type(frame.f_locals["self"]).__name__ for frame, number in traceback.walk_tb(exc.__traceback__)
              if number == line and isinstance(frame.f_locals.get("self"), torch.nn.Module)]  # fmt: skip
    return owners[-1] if owners else "forward"


def _assigns_into_a_proxy(exc: BaseException) -> bool:
    """Whether fx failed on `x[index] = value` (or `+=`) of a traced tensor, a Proxy, which has
    no __setitem__."""
    return isinstance(exc, TypeError) and "'Proxy' object does not support item assignment" in str(exc)


def _packs_sequences(exc: BaseException) -> bool:
    """Whether the trace failed in torch's packing of padded sequences (pack_padded_sequence)
    or in a function holding a PackedSequence (an RNN given one)."""
    packing = Path(torch.__file__).parent / "nn" / "utils" / "rnn.py"
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        if Path(frame.f_code.co_filename) == packing or any(
            isinstance(value, torch.nn.utils.rnn.PackedSequence) for value in frame.f_locals.values()
        ):
            return True
    return False


def untraceable(model_file: ModelFile, tracers: str, *errors: BaseException) -> FtcError:
    """One error for a failed trace: where in the model file it failed and why, per tracer."""
    names = ["torch.fx", "torch.export"] if len(errors) == 2 else [tracers]
    places = []
    reasons = []
    for tracer, exc in zip(names, errors):
        place = user_frame(exc, model_file.path)
        if place and place not in places:
            places.append(place)
        # Failing inside a library the model calls, the library's line says what to change.
        reasons.append(f"{tracer}: {type(exc).__name__}: {first_line(exc, limit=120)}{library_frame(exc, model_file.path)}")
    where = "".join(places)
    fix = "make forward's Python independent of tensor values and shapes (use torch ops such as torch.where instead of `if`)"
    leaves = ", ".join(sorted({cls.__name__ for cls in model_file.leaf_modules}))
    if names == ["torch.export"] and leaves:
        fix += f"; torch.export traces into LEAF_MODULES ({leaves}): --frontend fx or auto keeps them whole"
    elif leaves:
        # Listing the class that holds export's failure does not help where fx failed outside
        # LEAF_MODULES (transformers' DbrxExperts, listed, under a mask helper fx cannot trace).
        fix += (f"; only torch.fx keeps LEAF_MODULES ({leaves}) whole, and it failed on its own line above; "
                "torch.export traces into them, so make fx's line traceable (or list a class that holds it)")
    elif names == ["torch.export"]:
        fix += (", or list the class that contains that code in LEAF_MODULES and compile with --frontend fx or "
                "auto, which keep it whole (torch.export traces into LEAF_MODULES)")
    else:
        fix += ", or list the class that contains that code in LEAF_MODULES so it is kept whole"
    if "torch.export" not in names:
        fix += "; --frontend export handles shape-dependent Python"
    if any(checks_distribution_arguments(exc) for exc in errors):
        fix = ("torch.distributions checks the values of a distribution's arguments, which no tracer can "
               "follow: pass validate_args=False where forward makes the distribution (Normal(mu, std, "
               "validate_args=False)), or, where a library makes it, call "
               "torch.distributions.Distribution.set_default_validate_args(False) in build_model()")  # fmt: skip
    loop_owners = [owner for exc in errors if (owner := _value_loop_owner(exc, model_file))]
    if loop_owners:
        fix = (f"{loop_owners[0]}'s loop over a tensor (`for i in t.nonzero():`, transformers' older MoE layers "
               "loop over the experts a batch hits) runs as many times as the values say, which no trace can fix: loop over a fixed range "
               "instead and mask what the values leave out (for experts: run each expert of range(num_experts) on "
               "every token and weight its output by the routing mask, 0 for tokens routed elsewhere); in a "
               "library's module, subclass it in the model file with such a forward and give the model's modules "
               "that class in build_model()")  # fmt: skip
        if len(names) == 2 and loop_owners[0] in leaves.split(", "):
            # the loop is inside a module fx keeps whole: fx's own failure is the other cure
            fix += (f"; or, since only torch.fx keeps LEAF_MODULES ({leaves}) whole, make fx's line above traceable "
                    "and compile with --frontend fx or auto")  # fmt: skip
    if any(_packs_sequences(exc) for exc in errors):
        fix = ("a PackedSequence is sized by the lengths' values, which no tracer can follow: do the packing, the "
               "RNN and the unpacking inside one torch.nn.Module, list its class in LEAF_MODULES and compile with "
               "--frontend fx or auto (fx keeps it whole); or run the RNN on the padded batch and mask its outputs")  # fmt: skip
    # Only export's failures are guards on values; --frontend auto goes on to export, so its first
    # failure, not fx's, is the one to cure (fx's may be a decorator taking *args).
    assert_cures = [cure for exc in errors if (cure := _value_assert(exc, model_file))]
    if assert_cures:
        fix = assert_cures[0]
    if names == ["torch.fx"] and _assigns_into_a_proxy(errors[0]):
        fix = ("torch.fx cannot record an assignment into part of a traced tensor (`h[:, :4] += y`, `x[mask] = 0`): "
               "compile with --frontend export or auto, which record it as the in-place copy it is, or write it "
               "out of place (torch.cat, torch.where), or list the class that contains it in LEAF_MODULES")  # fmt: skip
    elif names == ["torch.fx"] and isinstance(errors[0], StateWrittenUntraced):
        fix = "compile with --frontend export or auto"
    elif names == ["torch.fx"] and isinstance(errors[0], (StateUntraced, RootHooked, ConstantChanged)):
        fix = "compile with --frontend export or auto"
    elif names == ["torch.fx"] and isinstance(errors[0], DrawnWhileTracing):
        fix = "compile with --frontend export or auto, or draw from a traced value (torch.rand_like(x))"
    elif names == ["torch.fx"] and isinstance(errors[0], BufferAssigned):
        fix = "compile with --frontend export or auto, or update the buffer in place (self.count.add_(1))"
    return FtcError(
        f"{model_file.path}: {'neither ' + ' nor '.join(names) + ' could' if len(names) > 1 else tracers + ' could not'} "
        f"trace the model{where} ({'; '.join(reasons)})",
        fix,
    )
