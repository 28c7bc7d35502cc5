"""Frontends: a model file in, an IR graph with value metadata out.

`fx` (torch.fx symbolic tracing) reads the model's Python; `export` (torch.export, non-strict)
handles models fx cannot trace, such as Python that depends on shapes. `auto` tries fx first,
and export as well when fx's graph calls a whole torch.nn transformer stack (nn.Transformer,
nn.TransformerEncoder, nn.TransformerDecoder) as one op that no split could cut.
The model is built on the meta device, so no weights are allocated whatever its size. Tracing
runs with the random generators seeded (draws.py), so that every compile gives the same bytes.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import linecache
import logging
import re
import sys
import sysconfig
import traceback
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.attention.flex_attention as flex_attention_module
import torch.nn.modules.transformer as transformer_module
import torch.utils.checkpoint as checkpoint_module
from torch._dynamo.eval_frame import OptimizedModule

from ftc.ir import FtcError, Graph, unique_name
from ftc.passes.naming import default_label
from ftc.runtime import model_file as model_file_module
from ftc.runtime.mode import train_model
from ftc.runtime.materialize import built_values
from ftc.runtime.model_file import ModelFile, first_line, user_frame

from .common import user_source
from .conversions import unchanging_conversions_kept
from .gradient_code import backward_hooks_kept, global_hooks_refused, gradient_code_refused
from .draws import TRACE_SEED, draws_note, drawn_from, trace_seeded
from .export import integer_buffers, not_a_tensor_output, size_buffers, trace_export
from .fx import BufferAssigned, ConstantChanged, DrawnWhileTracing, RootHooked, StateUntraced, StateWrittenUntraced, trace_fx
from .python_state import python_state_refused
from .meta import annotate_meta, fails_only_on_meta, missing_fake_kernel, plain_failure_fix

FRONTENDS = ("auto", "fx", "export")


class Traced(NamedTuple):
    graph: Graph
    model: torch.nn.Module  # on the meta device
    batch: tuple | dict  # meta-device example inputs at the compile batch size


def trace(model_file: ModelFile, batch_size: int, frontend: str = "auto", name: str | None = None) -> Traced:
    """Trace the model file's model into an IR graph annotated with value metadata."""
    try:
        with trace_seeded():
            return _trace(model_file, batch_size, frontend, name)
    except FtcError as exc:
        flex = flex_attention_refused(model_file, exc)
        if flex is not None:
            raise flex from exc
        if str(model_file.path) in exc.message:
            raise
        raise FtcError(f"{model_file.path}: {exc.message}", exc.hint) from exc


def _trace(model_file: ModelFile, batch_size: int, frontend: str, name: str | None) -> Traced:
    if frontend not in FRONTENDS:
        raise FtcError(f"unknown frontend {frontend!r}", f"use one of {', '.join(FRONTENDS)}")
    name = name or model_file.stem
    model = _in_training_mode(model_file, leaf_sizes=frontend in ("auto", "fx"))
    global_hooks_refused(model_file)
    batch = model_file.inputs(batch_size, device="meta")
    double_batch = model_file.inputs(2 * batch_size, device="meta")
    checkpoints: list[str] = []
    draws: list[str] = []
    with _checkpoints_as_calls(model_file, checkpoints), _causal_masks_as_given(), unchanging_conversions_kept():
        traced = _trace_with(model, model_file, batch, double_batch, batch_size, frontend, name, draws)
    backward_hooks_kept(traced.graph, traced.model, model_file)
    if checkpoints:
        traced.graph.trace_notes.append(
            f"forward calls torch.utils.checkpoint at {', '.join(dict.fromkeys(checkpoints))}: traced as a plain call; "
            "ftc recomputes whole stages instead, where --recompute says (the stage code keeps no checkpoint)"
        )
    if draws:
        traced.graph.trace_notes.append(draws_note(draws))
    compiled = [path for path, module in model.named_modules() if isinstance(module, OptimizedModule)]
    if compiled:
        traced = traced._replace(graph=_compiled_as_original(traced.graph, compiled))
        traced.graph.trace_notes.append(
            f"{', '.join(compiled)} {'is' if len(compiled) == 1 else 'are'} torch.compile'd: traced through the "
            "original module, so the stage code runs it eagerly (compile the stages to have it compiled again)"
        )
    return traced


def _in_training_mode(model_file: ModelFile, leaf_sizes: bool = False) -> torch.nn.Module:
    """The model on the meta device after `model.train()`, as a training loop starts: the model's
    own train() may keep layers in eval mode (frozen BatchNorm), and the trace must see them so.
    A torch.compile'd submodule runs its original module: neither fx nor export can trace dynamo's
    frame, and dynamo would compile and run real kernels on fake tensors (a segmentation fault).
    With `leaf_sizes` (for fx, which calls LEAF_MODULES whole), their integer buffers hold the
    values build_model() gives them (_leaf_sizes)."""
    model = model_file.build("meta")
    train_model(model, True, model_file.path)
    for module in model.modules():
        if isinstance(module, OptimizedModule):
            module.forward = _original_call(module._orig_mod)
    if leaf_sizes:
        _leaf_sizes(model, model_file)
    return model


def _compiled_as_original(graph: Graph, compiled: list[str]) -> Graph:
    """The graph of a model with torch.compile'd submodules (at the paths `compiled`) as people
    know the model: ops that ran in a wrapped module are said to run at the wrapper's path
    (`blocks.0`, not `blocks.0._orig_mod`) in the original class (MLP, not OptimizedModule), and
    values drop `_orig_mod` from their names (`blocks_0_fc`). Call targets and state keys keep it:
    they are the keys of the model's state_dict, which the stages adopt."""
    wrappers = set(compiled)

    def unwrapped(path: str) -> str:
        kept: list[str] = []
        walked = ""
        for part in path.split(".") if path else []:
            if not (part == "_orig_mod" and walked in wrappers):
                kept.append(part)
            walked = f"{walked}.{part}" if walked else part
        return ".".join(kept)

    modules = {path: graph.modules.get(f"{path}._orig_mod", cls) if path in wrappers else cls
               for path, cls in graph.modules.items()}  # fmt: skip
    taken = {node.name for node in graph.nodes}
    renames: dict[str, str] = {}
    for node in graph.nodes:
        plain = re.sub(r"__orig_mod(?=_|$)", "", node.name)
        if plain != node.name:
            taken.discard(node.name)
            renames[node.name] = unique_name(plain, taken)

    nodes = [
        replace(
            node,
            module_path=unwrapped(node.module_path),
            module_class=modules.get(node.module_path, node.module_class),
            # what the stage code calls the value, as the tracer's name gave it (`fc`)
            label=(node.label or default_label(node)) if node.name in renames else node.label,
        )
        for node in graph.nodes
    ]
    return replace(graph, nodes=nodes, modules=modules).renamed(renames)


def _original_call(original: torch.nn.Module):
    """A call of `original` looked up when it is made: a tracer that patches torch.nn.Module's
    __call__ while it runs (export does, to know the module each op ran in) sees it, where the
    bound method taken before the trace went around the patch."""
    return lambda *args, **kwargs: original(*args, **kwargs)


def _leaf_sizes(model: torch.nn.Module, model_file: ModelFile) -> None:
    """Give the integer buffers of LEAF_MODULES instances, in place, the values build_model()
    gives them, as CPU tensors. A leaf may compute sizes from them (transformers' Encodec and Mimi
    convolutions pad by 0-d int64 buffers `stride`, `kernel_size`, `padding_total`): built on the
    meta device they hold none, and the leaf's output shapes, learned by running it (on the meta
    device, else as a CPU copy), would be wrong or its run would fail. The stages adopt the
    module, whose buffers the runtime builds with their values, so only the compile lacks them."""
    holders = {
        key: holder
        for leaf_path, leaf in model.named_modules()
        if isinstance(leaf, model_file.leaf_modules)
        for key, holder in integer_buffers(leaf, leaf_path).items()
    }
    if not holders:
        return
    values = built_values(model_file, TRACE_SEED, list(holders))
    if values is None:
        return  # the leaf then runs with its integer buffers 0, and a failure names them
    for key, (module, name) in holders.items():
        module._buffers[name] = values[key]


def _trace_with(model, model_file, batch, double_batch, batch_size, frontend, name, draws) -> Traced:
    if frontend in ("auto", "fx"):
        try:
            with drawn_from(draws), gradient_code_refused(model_file), python_state_refused(model_file):
                graph = trace_fx(model, model_file, batch, name)
        except FtcError:
            raise
        except Exception as exc:
            if frontend == "fx":
                raise forward_failure(model_file, batch) or untraceable(model_file, "torch.fx", exc) from exc
            fx_error = exc
            model = _in_training_mode(model_file)  # fx may have left tracing state on the modules
        else:
            stacks = _whole_stacks(graph, model, model_file) if frontend == "auto" else []
            if stacks:
                graph, model = _lower_stacks(graph, model, model_file, batch, double_batch, name, stacks, draws)
            graph.batch_size = batch_size
            return Traced(annotate_meta(graph, model, batch, double_batch), model, batch)
    try:
        with _quiet(), drawn_from(draws), gradient_code_refused(model_file), python_state_refused(model_file):
            graph, model = _export_sizing_by_buffers(model, model_file, batch, double_batch, name)
    except FtcError:
        raise
    except Exception as exc:
        failure = (
            not_a_tensor_output(exc) or forward_failure(model_file, batch) or compiling_path_failure(model_file, batch, exc)
        )
        if failure is not None:
            raise failure from exc
        if batch_size == 1 and "Constraints violated" in str(exc):
            raise FtcError(
                f"{model_file.path}: torch.export cannot trace at batch size 1 (it fixes dimensions of size 1, "
                "so the batch dimension cannot stay symbolic)",
                "compile with --batch-size 2 or more",
            ) from exc
        scripted: list[str] = []  # the outermost ones: what the model file scripted
        for path, module in model.named_modules():
            if isinstance(module, torch.jit.ScriptModule) and not any(path.startswith(f"{s}.") for s in scripted):
                scripted.append(path)
        if scripted:
            raise FtcError(
                f"{model_file.path}: torch.export cannot trace TorchScript submodules "
                f"({', '.join(repr(path) for path in scripted)}): {_one_line(model_file, exc)}",
                "compile with --frontend fx (or auto), which keeps them whole"
                if frontend == "export"
                else f"torch.fx could not trace the model either ({_one_line(model_file, fx_error)}): fix that, "
                "or use the plain nn.Module instead of its torch.jit.script form",
            ) from exc
        # A distribution's argument check fails only where forward makes one, and GroupViT makes its
        # Gumbel only while training: the check, not a layer skip, is what to turn off.
        if type(exc).__name__ == "GuardOnDataDependentSymNode" and not checks_distribution_arguments(exc):
            in_eval_mode = _eval_mode_failure(model_file, batch, double_batch, name)
            if in_eval_mode is None:
                raise _training_only_branch(model_file, exc) from exc
            if _skips_layers(model_file, exc):
                # The layer skip comes first in training mode and hides the eval-mode failure
                # (NLLB-MoE: layerdrop, then its expert loop): both must go.
                eval_error = untraceable(model_file, "torch.export", in_eval_mode)
                training_error = _training_only_branch(model_file, exc)
                raise FtcError(
                    training_error.message.replace(", but it can in eval mode", "")
                    + f"; in eval mode, where the skip is off, {eval_error.message.split(': ', 1)[1]}",
                    f"{training_error.hint}; and for eval mode's failure: {eval_error.hint}",
                ) from exc
        if frontend == "auto":
            raise untraceable(model_file, "torch.fx and torch.export", fx_error, exc) from exc
        raise untraceable(model_file, "torch.export", exc) from exc
    graph.batch_size = batch_size
    if frontend == "auto":
        graph.trace_notes.append(f"traced with torch.export, as torch.fx could not: {_one_line(model_file, fx_error, noted=True)}")
    return Traced(annotate_meta(graph, model, batch, double_batch, reshape_views=True), model, batch)


def _export_sizing_by_buffers(model, model_file, batch, double_batch, name) -> tuple[Graph, torch.nn.Module]:
    """torch.export's graph and the model it traced; where a guard on a value export could not
    know failed and the model holds 0-d integer buffers (sizes, as transformers' Encodec and Mimi
    convolutions keep their padding), a fresh model traced again with those buffers read as
    constants of their values (export._sizes_as_constants), but those forward writes (a step
    counter), which stay buffers so that the stages keep the write: found while tracing, each
    such buffer takes one more trace. A failure of the last trace is the one to report: it got
    past the sizes."""
    try:
        return trace_export(model, model_file, batch, double_batch, name), model
    except Exception as exc:
        if type(exc).__name__ != "GuardOnDataDependentSymNode" or not size_buffers(model):
            raise
    written: set[str] = set()
    while True:
        fresh = _in_training_mode(model_file)  # a failed trace may have left its state on the modules
        known = len(written)
        try:
            graph = trace_export(fresh, model_file, batch, double_batch, name, sizes_written=written)
        except Exception as exc:
            if len(written) > known:
                continue
            if written and type(exc).__name__ == "GuardOnDataDependentSymNode":
                raise _written_size_refused(model_file, written) from exc
            raise
        if len(written) == known:
            return graph, fresh


def _written_size_refused(model_file: ModelFile, written: set[str]) -> FtcError:
    """A trace that failed on a size even with the 0-d integer buffers forward writes kept as
    buffers, the others read as constants: a size depends on a buffer forward writes."""
    names = ", ".join(sorted(written))
    return FtcError(
        f"{model_file.path}: forward computes a size from 0-d integer buffers, which torch.export traces without "
        f"values, and writes {names} (a counter): ftc reads such buffers as constants of the values build_model() "
        "gives them, which would drop that write, so it stays a buffer, and a size computed from it cannot be traced",
        f"compute sizes only from buffers forward does not write, and keep the counter ({names}) apart from them",
    )


@contextlib.contextmanager
def _checkpoints_as_calls(model_file: ModelFile, sources: list[str]):
    """While tracing, torch.utils.checkpoint runs its function as a plain call, and the model-file
    line of each call is added to `sources`. Its reentrant form runs the function under no_grad
    inside an autograd.Function, which a tracer would record as a no_grad block (frozen weights
    in the stage code); either form is a memory saving that stage-level recomputation replaces."""
    reentrant = checkpoint_module.CheckpointFunction.apply
    generator = checkpoint_module._checkpoint_without_reentrant_generator

    def plain_call(function, _preserve_rng_state, *args):
        sources.append(user_source(model_file) or model_file.path.name)
        return function(*args)

    def no_hooks(*_args, **_kwargs):
        sources.append(user_source(model_file) or model_file.path.name)
        yield

    checkpoint_module.CheckpointFunction.apply = plain_call
    checkpoint_module._checkpoint_without_reentrant_generator = no_hooks
    try:
        yield
    finally:
        checkpoint_module.CheckpointFunction.apply = reentrant
        checkpoint_module._checkpoint_without_reentrant_generator = generator


@contextlib.contextmanager
def _causal_masks_as_given():
    """While tracing, torch.nn's transformer stacks take a mask for causal only where forward says
    so (`tgt_is_causal=True`), without comparing its values to a causal mask's, which no tracer can
    follow (export failed on nn.TransformerDecoder given a `tgt_mask`). The answer only picks a
    kernel: the layers apply the mask they are given either way, so the stages compute what the
    model computes."""
    detect = transformer_module._detect_is_causal_mask
    transformer_module._detect_is_causal_mask = lambda mask, is_causal=None, size=None: is_causal is True
    try:
        yield
    finally:
        transformer_module._detect_is_causal_mask = detect


def _one_line(model_file: ModelFile, exc: BaseException, noted: bool = False) -> str:
    """fx's error in one line: where in the model file, and what. For a note ir.json keeps
    (`noted`), files go by the names stage comments give them (the model file's own name, a
    library's path below its sys.path entry), so that the bytes do not depend on how the model
    file was named on the command line or where the library is installed."""
    where = user_frame(exc, model_file.path)
    if where and noted:
        where = where.replace(f" (at {model_file.path}:", f" (at {model_file.path.name}:", 1)
    return f"{type(exc).__name__}: {first_line(exc, limit=120)}{where or library_frame(exc, model_file.path, noted)}"


# torch.nn modules that hold a whole stack of layers in one call.
STACKS = (torch.nn.Transformer, torch.nn.TransformerEncoder, torch.nn.TransformerDecoder)


def _whole_stacks(graph: Graph, model: torch.nn.Module, model_file: ModelFile) -> list[str]:
    """The module paths of fx's graph that call a whole layer stack (not listed in LEAF_MODULES)."""
    return [
        node.target
        for node in graph.nodes
        if node.op == "call_module"
        and isinstance(module := model.get_submodule(node.target), STACKS)
        and not isinstance(module, model_file.leaf_modules)
    ]


def _lower_stacks(
    graph, model, model_file, batch, double_batch, name, stacks, draws
) -> tuple[Graph, torch.nn.Module]:
    """fx keeps torch.nn's layers whole, and a whole transformer stack is one op no split can
    cut; export lowers it into ops. fx's graph (and model) stay the answer if export fails."""
    fresh = _in_training_mode(model_file)  # fx may have left tracing state on the modules
    try:
        with _quiet(), drawn_from(draws), gradient_code_refused(model_file), python_state_refused(model_file):
            return trace_export(fresh, model_file, batch, double_batch, name), fresh
    except Exception as exc:
        # Said where the compile prints its notes: the stack is one op, so the split is as good as
        # that op allows (nn.Transformer with a tgt_mask: one stage held it all, balance 1.95).
        graph.trace_notes.append(
            f"kept {', '.join(stacks)} whole, one op that no split can cut: torch.export, which would lower it "
            f"into ops, could not trace the model: {_one_line(model_file, exc)}"
        )
        return graph, model


@contextlib.contextmanager
def _quiet():
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
    skipped = [Path(torch.__file__).parent, Path(__file__).parents[1], Path(model_file_module.__file__).parent,
               Path(sysconfig.get_paths()["stdlib"])]  # fmt: skip
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = Path(frame.filename)
        if frame.filename.startswith("<") or any(path.is_relative_to(root) for root in skipped):
            continue
        if path.resolve() == model_path.resolve():
            return ""
        shown = _below_sys_path(path) if below_sys_path else path
        return f" (at {shown}:{frame.lineno}: {(frame.line or '').strip()})"
    return ""


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
        with _quiet():
            model(**batch) if isinstance(batch, dict) else model(*batch)
    except Exception as exc:
        where = user_frame(exc, model_file.path)
        unfakeable = missing_fake_kernel(exc)
        if unfakeable is not None:
            return FtcError(f"{model_file.path}: {unfakeable.message}{where}", unfakeable.hint)
        if fails_only_on_meta(exc):
            return None
        names = inspect.signature(model.forward).parameters
        inputs = batch if isinstance(batch, dict) else dict(zip(names, batch))
        return FtcError(f"{model_file.path}: forward raised {type(exc).__name__}: {first_line(exc, limit=120)}{where}",
                        plain_failure_fix(inputs))  # fmt: skip
    return None


def compiling_path_failure(model_file: ModelFile, batch: tuple | dict, exc: BaseException) -> FtcError | None:
    """An error for a forward that fails only while it is traced, because code it runs takes
    another path then (transformers' `if attention_mask is None and not
    is_torchdynamo_compiling():` leaves the mask None while torch.export traces, and Switch
    Transformers then subscripts it); None where forward, told that it is compiled
    (torch.compiler.is_compiling()), runs or fails otherwise."""
    if type(exc).__module__.split(".")[0] == "torch":
        return None  # the tracer's own refusal, not the model's code failing
    model = model_file.build("meta")
    train_model(model, True, model_file.path)
    is_compiling = torch.compiler.is_compiling
    torch.compiler.is_compiling = lambda: True
    try:
        with _quiet():
            model(**batch) if isinstance(batch, dict) else model(*batch)
    except Exception as again:
        if type(again) is not type(exc) or str(again) != str(exc):
            return None
        none_names = _none_names(again)
    else:
        return None
    finally:
        torch.compiler.is_compiling = is_compiling
    inputs = inspect.signature(model.forward).parameters
    missing = [name for name in none_names if name in inputs and (not isinstance(batch, dict) or name not in batch)]
    fix = (f"pass {' and '.join(missing)} in example_inputs() (a key of its dict), so that the path forward takes "
           "while traced has it") if missing else (  # fmt: skip
        "give forward, in example_inputs(), the optional inputs that path reads (one left None there)")
    return FtcError(
        f"{model_file.path}: forward fails only while it is traced ({type(exc).__name__}: {first_line(exc, limit=120)}"
        f"{library_frame(exc, model_file.path) or user_frame(exc, model_file.path)}): code it runs asks whether it is "
        "being compiled (torch.compiler.is_compiling(), transformers' is_torchdynamo_compiling()) and then skips "
        "what it does otherwise" + (f": {', '.join(missing)} stays None there" if missing else ""),
        fix,
    )


def _none_names(exc: BaseException) -> list[str]:
    """The names on the failing line of the innermost frame whose values are None there."""
    frames = list(traceback.walk_tb(exc.__traceback__))
    if not frames:
        return []
    frame, line = frames[-1]
    source = linecache.getline(frame.f_code.co_filename, line)
    names = dict.fromkeys(re.findall(r"\b[A-Za-z_]\w*\b", source))
    return [name for name in names if name in frame.f_locals and frame.f_locals[name] is None]


def _eval_mode_failure(model_file: ModelFile, batch, double_batch, name: str) -> BaseException | None:
    """Why torch.export cannot trace the model in eval mode either; None where it can, which it
    could not in training mode."""
    model = model_file.build("meta")
    model.eval()
    try:
        with _quiet(), drawn_from([]):
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
    if names == ["torch.fx"] and isinstance(errors[0], StateWrittenUntraced):
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
