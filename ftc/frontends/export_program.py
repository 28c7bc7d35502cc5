"""torch.export's program for a model, as the export frontend needs it: the call signatures of
the layers the stages call whole kept (aten.WHOLE_CALLS, and the modules at the `kept` paths),
and the batch dimension symbolic, with the range of batch sizes forward works for where it
works only for some. export.py lowers the program into the IR; this module only obtains it, and
names why when the batch cannot stay symbolic."""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import sysconfig
import traceback
import warnings
from pathlib import Path
from typing import Any

import sympy
import torch
from torch.utils._sympy.numbers import int_oo

from ftc.ir import FtcError
from ftc.runtime.model_file import ModelFile

from .aten import WHOLE_CALLS
from .eval_mode import ModeBranch


def bounded_program(
    model: torch.nn.Module, model_file: ModelFile, args: tuple, kwargs: dict, dynamic: tuple | dict,
    kept: tuple[str, ...], branches: list[ModeBranch],
) -> tuple[torch.export.ExportedProgram, tuple[int, int] | None]:
    """torch.export's program and the batch sizes it works for (lowest, highest; None: any), for
    a forward that works only for some (a MoCo queue rolled by `torch.cat([k,
    self.queue[:-k.shape[0]]])` needs batch <= the queue's length). A named Dim refuses such a
    bound, and torch's solver may even fail on it with an AssertionError (`Expected op to be
    '==', got <= for batch <= 127/4`); Dim.AUTO takes the range forward allows, which training
    checks its micro-batches against. A forward that works at one batch size only is refused,
    naming it, and with the library's branches on self.training (`branches`), which may fix it
    only in the training mode forward is traced in."""
    inputs = list(kwargs.values()) if kwargs else list(args)
    specs = list(dynamic.values()) if isinstance(dynamic, dict) else list(dynamic)
    size = next((value.shape[next(iter(spec))] for value, spec in zip(inputs, specs) if spec), None)
    try:
        return _export(model, args, kwargs, dynamic, kept), None
    except Exception as error:
        # at batch size 1 export fixes the batch whatever forward does, which its caller names
        if size is None or size < 2 or not _batch_bounded(error):
            raise
        first = error
    unnamed = {key: _unnamed(spec) for key, spec in dynamic.items()} if isinstance(dynamic, dict) else tuple(map(_unnamed, dynamic))
    equations: list[tuple[str, str]] = []
    try:
        with _size_guards(equations):
            program = _export(model, args, kwargs, unnamed, kept)
    except Exception:
        raise first from None
    fixing = [(guard, line) for guard, line in equations if re.fullmatch(r"Eq\(.*\bs\d+\b.*, \d+\)", guard)]
    sizes = _batch_sizes(program)
    if sizes == (2, None) and not fixing and all(_holds_at_sizes(guard, _trial_sizes(size)) for guard, _ in equations):
        # torch's solver refused the named batch for an equation it could not prove, which holds
        # at every size tried (Llama 4's MoE reshape: `Eq(16*s0*Min(32, 512*s0), 512*s0)`)
        return program, None
    if sizes is not None and sizes[1] is None and sizes[0] > 2:
        raise FtcError(
            f"{model_file.path}: forward works only for batch sizes of {sizes[0]} and more (torch.export bounds "
            "the batch dimension from below: forward indexes or splits the batch at a fixed position)",
            "make forward work at any batch size; pipeline stages run micro-batches of batch_size / micro_batches",
        ) from first
    if sizes is not None and sizes[1] is None:
        # The named batch was refused for a guard that bounds no batch size: export fixed a size
        # computed from the batch (`int(n * 0.25)`, a float's truncation, which its solver keeps
        # as `TruncToInt(...) == 4`) and would write that constant into the stage code.
        at = "".join(f" at {line} ({guard})" for guard, line in (fixing or equations)[:1])
        raise FtcError(
            f"{model_file.path}: torch.export fixed a size computed from the batch size{at}, so the stages "
            f"would use, at every micro-batch size, the size that batch size {size} gives",
            "compute the size with integer arithmetic on tensor sizes (n * 3 // 4, not int(n * 0.75)), or from "
            "a fixed number (the sequence length)",
        ) from first
    if sizes is None:
        training = ""
        if branches:
            places = ", ".join(f"{branch.line} ({model_file.class_name(branch.owner)})" for branch in branches)
            training = (f"; in training mode, which ftc traces, forward also takes a branch on self.training in "
                        f"library code at {places}, which may make that size (transformers' speech models draw "
                        "their SpecAugment masks with numpy, at the batch's size)")  # fmt: skip
        lines = [line for guard, line in fixing if re.fullmatch(rf"Eq\(s\d+, {size}\)", guard)]
        at = f" at {lines[0]}" if lines else ""
        raise FtcError(
            f"{model_file.path}: torch.export fixed the batch dimension to {size}{at}, so the stages would run at "
            f"batch size {size} only, but pipeline stages run micro-batches of other sizes{training}",
            "compute sizes from the input as tensor sizes (x.shape[0], not len(x), which Python makes a fixed int; "
            "-1 in view/reshape) instead of fixed numbers; where that line is in a library, call the library "
            "so that it skips that code"
            + (" (a training-only branch: transformers' mask_time_prob=0.0 and mask_feature_prob=0.0)" if branches else ""),
        ) from first
    low, high = sizes
    # export's own lowest size is 2 (it fixes sizes 0 and 1 when it meets them), which says
    # nothing about forward: stages run a micro-batch of 1 like any other.
    return program, None if high is None else (low if low > 2 else 1, high)


def range_notes(batch_range: tuple[int, int] | None) -> list[str]:
    if batch_range is None:
        return []
    low, high = batch_range
    sizes = f"up to {high}" if low == 1 else f"{low} to {high}"
    return [
        f"forward works only for batch sizes {sizes} (torch.export bounds the batch dimension: a size computed "
        "from it is taken from a fixed-size tensor, such as a slice of a buffer); training checks that its "
        "micro-batches (batch_size / micro_batches) stay in that range"
    ]


@contextlib.contextmanager
def _size_guards(guards: list[tuple[str, str]]):
    """Collects (guard, `file:line in function`) for each equation of a symbolic size that torch's
    shape environment adds while the block runs (`Eq(s0, 8)`: `x.reshape(8, -1)`, `len(x)`;
    `Eq(TruncToInt(...), 4)`: `int(n * 0.5)`; `Eq(16*s0*Min(32, 512*s0), 512*s0)`: a reshape's
    -1 that its solver leaves unsimplified), at the model's or a library's
    code. torch reports guards only in its log, at INFO level, so the log is read while the
    block runs, kept from torch's own handlers, and the line is the innermost frame outside
    torch, ftc and Python's standard library."""
    log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    size_equation = re.compile(r"Eq\(.*\bs\d+\b.*\)")
    outside = tuple(str(Path(m.__file__).parent) for m in (torch, logging)) + (
        str(Path(__file__).parents[1]), sysconfig.get_paths()["stdlib"])

    class Guards(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            args = record.args if isinstance(record.args, tuple) else ()
            if "[guard added]" not in str(record.msg) or len(args) < 2 or not size_equation.fullmatch(str(args[1])):
                return
            frame = next((f for f in reversed(traceback.extract_stack()) if not f.filename.startswith(outside)), None)
            if frame is not None:
                guards.append((str(args[1]), f"{frame.filename}:{frame.lineno} in {frame.name}"))

    handlers, level, propagate = log.handlers, log.level, log.propagate
    log.handlers, log.propagate = [Guards()], False
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.handlers, log.propagate = handlers, propagate
        log.setLevel(level)


def _trial_sizes(size: int) -> list[int]:
    """Batch sizes to try an unproven equation at: every size up to four times the compile's,
    and sparse ones up to 2**20, where a Min or Max with a constant (`Min(64, s0)`) turns."""
    sparse = {2**k + d for k in range(5, 21) for d in (-1, 0, 1)} | {3**k for k in range(3, 13)} | {10**k for k in range(2, 7)}
    return sorted(set(range(1, 4 * size + 1)) | sparse)


def _holds_at_sizes(guard: str, sizes: list[int]) -> bool:
    """Whether a guard on symbolic sizes holds with each of its sizes at every one of `sizes`
    (False where sympy cannot read it: a function of torch's own, such as TruncToInt)."""
    try:
        equation = sympy.sympify(guard)
    except (sympy.SympifyError, TypeError, SyntaxError):
        return False
    symbols = equation.free_symbols
    return all(equation.subs({symbol: size for symbol in symbols}) is sympy.true for size in sizes)


def _batch_bounded(error: Exception) -> bool:
    """Whether torch.export refused the named batch Dim for a range forward imposes on it."""
    message = str(error)
    if isinstance(error, AssertionError):
        return message.startswith("Expected op to be '=='") and "batch" in message
    return type(error).__name__ == "UserError" and message.startswith("Constraints violated (batch)")


def _unnamed(spec: dict | None) -> dict | None:
    return {dim: torch.export.Dim.AUTO for dim in spec} if spec else spec


def _batch_sizes(program: torch.export.ExportedProgram) -> tuple[int, int | None] | None:
    """The batch sizes the program takes: (lowest, highest or None when unbounded), or None where
    export fixed the batch to the example's; read from the first batched input (AUTO dimensions
    get a symbol each, which forward's ops equate where it combines the inputs)."""
    for node in program.graph.nodes:
        value = node.meta.get("val")
        if node.op != "placeholder" or not isinstance(value, torch.Tensor):
            continue
        for size in value.shape:
            if isinstance(size, torch.SymInt) and size.node.expr in program.range_constraints:
                sizes = program.range_constraints[size.node.expr]
                # torch's int_oo says it is finite (sympy's own attribute), so compare with it
                return int(sizes.lower), None if sizes.upper == int_oo else int(sizes.upper)
    return None


RNN_FLAT_WEIGHTS = r"The tensor attributes (self\.[\w.]+\._flat_weights\[\d+\](, )?)+ were assigned during export"


def _export(
    model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: tuple | dict, kept: tuple[str, ...]
) -> torch.export.ExportedProgram:
    """torch.export's program, with the call signatures of the model's WHOLE_CALLS layers, and
    of the modules at the `kept` paths, kept
    (which values each call took and returned, in what structure). export refuses to keep them
    for a layer called with differently structured arguments (`self.lstm(x)`, then
    `self.lstm(x, state)`), naming it, or with arguments other than tensors and scalars (a size,
    `output_size=x.shape`), without naming it: the program is traced again without those
    layers' signatures (or, where neither tells the layer, any layer's), and they are lowered op
    by op."""
    layers = tuple(path for path, module in model.named_modules() if path and isinstance(module, WHOLE_CALLS))
    layers += tuple(path for path in kept if path not in layers)
    while True:
        refused: list[str] = []
        handles = [model.get_submodule(path).register_forward_pre_hook(_refuse_unkept(path, refused), with_kwargs=True)
                   for path in layers]  # fmt: skip
        try:
            with warnings.catch_warnings():
                # RNN layers set their list of flat weights again in forward; the weights are
                # parameters, adopted by name, so torch's advice to make them buffers is noise.
                warnings.filterwarnings("ignore", message=RNN_FLAT_WEIGHTS, category=UserWarning)
                return torch.export.export(model, args, kwargs or None, strict=False,
                                           dynamic_shapes=_bound_as_forward(model, dynamic),
                                           preserve_module_call_signature=layers)  # fmt: skip
        except AssertionError as error:
            if not layers:
                raise
            named = [path for path in layers if f"_export_root.{path}:" in str(error) or path in refused]
            layers = tuple(path for path in layers if path not in named) if named else ()
        finally:
            for handle in handles:
                handle.remove()


def _bound_as_forward(model: torch.nn.Module, dynamic: tuple | dict) -> tuple | dict:
    """`dynamic`, one spec per positional input, in the structure export binds them to forward's
    parameters in: the values that fill forward's *args as one tuple of specs."""
    if isinstance(dynamic, dict):
        return dynamic
    params = inspect.signature(model.forward).parameters.values()
    named = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    if not any(p.kind == p.VAR_POSITIONAL for p in params) or len(dynamic) <= named:
        return dynamic
    return (*dynamic[:named], tuple(dynamic[named:]))


def _refuse_unkept(path: str, refused: list[str]) -> Any:
    """A forward pre-hook that adds `path` to `refused` when the layer is called with an argument
    whose signature export cannot keep: one that is not a tensor, a Python scalar, a string or None
    once flattened (a symbolic size is not a Python int)."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        if not all(leaf is None or isinstance(leaf, (torch.Tensor, str, int, float, bool)) for leaf in leaves):
            refused.append(path)

    return hook
