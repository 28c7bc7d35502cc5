"""Frontends: a model file in, an IR graph with value metadata out.

`fx` (torch.fx symbolic tracing) reads the model's Python; `export` (torch.export, non-strict)
handles models fx cannot trace, such as Python that depends on shapes. `auto` tries fx first,
and export as well when fx's graph calls a whole torch.nn transformer stack (nn.Transformer,
nn.TransformerEncoder, nn.TransformerDecoder) as one op that no split could cut.
The model is built on the meta device, so no weights are allocated whatever its size. Tracing
runs with the random generators seeded (draws.py), so that every compile gives the same bytes.
When a tracer fails, failures.py says why and what to change.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn.modules.transformer as transformer_module
import torch.utils.checkpoint as checkpoint_module
from torch._dynamo.eval_frame import OptimizedModule

from ftc.ir import FtcError, Graph, unique_name
from ftc.passes.naming import default_label
from ftc.runtime.mode import train_model
from ftc.runtime.replay import built_values
from ftc.runtime.model_file import ModelFile

from .common import quiet, user_source
from .conversions import unchanging_conversions_kept
from .gradient_code import backward_hooks_kept, global_hooks_refused, gradient_code_refused
from .draws import TRACE_SEED, draws_note, drawn_from, trace_seeded
from .export import integer_buffers, size_buffers, trace_export
from .failures import export_failure, flex_attention_refused, forward_failure, one_line, untraceable, written_size_refused
from .fx import trace_fx
from .python_state import python_state_refused
from .meta import annotate_meta

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
    fx_error = None
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
        with quiet(), drawn_from(draws), gradient_code_refused(model_file), python_state_refused(model_file):
            graph, model = _export_sizing_by_buffers(model, model_file, batch, double_batch, name)
    except FtcError:
        raise
    except Exception as exc:
        raise export_failure(model_file, model, exc, frontend, fx_error, batch, double_batch, batch_size, name) from exc
    graph.batch_size = batch_size
    if frontend == "auto":
        graph.trace_notes.append(f"traced with torch.export, as torch.fx could not: {one_line(model_file, fx_error, noted=True)}")
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
                raise written_size_refused(model_file, written) from exc
            raise
        if len(written) == known:
            return graph, fresh


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
        with quiet(), drawn_from(draws), gradient_code_refused(model_file), python_state_refused(model_file):
            return trace_export(fresh, model_file, batch, double_batch, name), fresh
    except Exception as exc:
        # Said where the compile prints its notes: the stack is one op, so the split is as good as
        # that op allows (nn.Transformer with a tgt_mask: one stage held it all, balance 1.95).
        graph.trace_notes.append(
            f"kept {', '.join(stacks)} whole, one op that no split can cut: torch.export, which would lower it "
            f"into ops, could not trace the model: {one_line(model_file, exc)}"
        )
        return graph, model


