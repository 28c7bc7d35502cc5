"""torch.fx frontend: symbolic tracing into the IR.

torch.nn's own layers and the model file's LEAF_MODULES stay whole (call_module); everything
else is traced through, so the IR sees the model's Python forward as individual ops.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from pathlib import Path
from collections import Counter
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ftc.ir import Constant, FtcError, Graph, Node, Outputs, Ref, TorchExpr, unique_name
from ftc.runtime.model_file import ModelFile

from .common import (
    CodeFiles,
    TrainingFlag,
    attributes_restored,
    autocast_refused,
    constant_from_tensor,
    function_expr,
    ir_arg,
    module_table,
    mutated_arg,
    schema_mutated,
    state_table,
    user_frames,
    user_source,
)
from .eval_mode import followed_notes, mode_branches
from .gradient_code import GRADIENT_HOOKS, hook_name, hook_refused

_CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)


class _Tracer(fx.Tracer):
    # Buffers become get_attr nodes like parameters, so code may index them with traced sizes.
    proxy_buffer_attributes = True

    def __init__(
        self,
        model_file: ModelFile,
        model: torch.nn.Module,
        variadic: list[str] | None,
        whole: frozenset[int] = frozenset(),
    ):
        super().__init__()
        self.model_file = model_file
        self.code = CodeFiles(model_file, model)
        self.variadic = variadic  # the names of the values that fill forward's *args (Inputs.variadic)
        self.whole = whole  # ids of modules kept whole besides the layers below
        self.flag_reads: list[str] = []  # places self.training was read since the last op was recorded
        self.read_flags_of: list[torch.nn.Module] = []  # the modules whose self.training was read

    def is_leaf_module(self, m: torch.nn.Module, qualified_name: str) -> bool:
        if isinstance(m, self.model_file.leaf_modules) or id(m) in self.whole:
            return True
        if isinstance(m, torch.jit.ScriptModule):
            return True  # TorchScript cannot be traced through, but runs whole like a torch.nn layer
        return m.__module__.startswith("torch.nn") and not isinstance(m, _CONTAINERS)

    def create_args_for_root(self, root_fn: Any, is_module: bool, concrete_args: Any = None) -> tuple[Any, list[Any]]:
        # fx hands forward's *args one Proxy for the whole tuple, on which `len(features)` and
        # `for f in features` fail (a Proxy has no length). The example batch fixes how many
        # values fill it, so forward gets a real tuple of one placeholder per value instead: its
        # length, iteration, unpacking and indexing then run as Python, as in the model.
        root_fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        if self.variadic is None:
            return root_fn, args
        # fx's placeholder for *args is named `*features` (and that for **kwargs `**kwargs`)
        (position,) = [
            k for k, arg in enumerate(args) if isinstance(arg, fx.Proxy) and re.fullmatch(r"\*\w+", arg.node.target)
        ]
        packed = args[position].node
        with self.graph.inserting_before(packed):
            args[position] = tuple(self.create_proxy("placeholder", name, (), {}) for name in self.variadic)
        self.graph.erase_node(packed)
        return root_fn, args

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        frames = user_frames(self.code)
        node.meta["ftc_source"] = frames[-1] if frames else ""
        node.meta["ftc_callers"] = frames[:-1]
        # fx records no context managers, but `with torch.no_grad():` in forward really runs
        # while tracing, so the grad mode at this moment is the one the op ran under.
        node.meta["ftc_grad_enabled"] = torch.is_grad_enabled()
        node.meta["ftc_flag_reads"] = list(self.flag_reads)
        self.flag_reads.clear()
        if any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda")):
            raise autocast_refused(self.model_file, node.meta["ftc_source"])
        return node

    def create_proxy(self, kind: str, target: Any, *args, **kwargs) -> fx.Proxy:
        # Before fx reads the hook's arguments: it cannot record a callable (a lambda) anyway.
        if kind == "call_method" and target in GRADIENT_HOOKS:
            raise hook_refused(self.model_file, target, user_source(self.model_file) or self.model_file.path.name)
        return super().create_proxy(kind, target, *args, **kwargs)

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, TrainingFlag):
            return a  # written into stage code as the stage's `self.training` (common.ir_arg)
        return super().create_arg(a)

    @contextlib.contextmanager
    def training_flags(self, model: torch.nn.Module, branches: list[str]):
        """While tracing, every module traced through reads a TrainingFlag as `self.training`."""
        traced = [m for m in model.modules() if (m is model or not self.is_leaf_module(m, "")) and "training" in vars(m)]
        saved = [vars(m)["training"] for m in traced]
        try:
            for m in traced:
                flag = TrainingFlag(vars(m)["training"], self.model_file, branches, self.flag_reads, m, self.read_flags_of)
                object.__setattr__(m, "training", flag)
            yield
        finally:
            for m, value in zip(traced, saved):
                object.__setattr__(m, "training", value)


class Inputs(NamedTuple):
    """How an example batch feeds forward."""

    fed: list[str]  # the names of the values the batch gives, in order
    defaults: dict[str, Any]  # the parameters it leaves out, and their defaults
    variadic: list[str] | None  # the names of those that fill forward's *args; None where it takes none


def input_names(model: torch.nn.Module, example: tuple | dict) -> Inputs:
    """The values the example batch feeds forward: a tuple fills forward's positional parameters
    and then its *args, whose values are named after it and their position (`features_0`,
    `features_1`; `features_0_1` where forward has a parameter `features_0` too)."""
    params = list(inspect.signature(model.forward).parameters.values())
    variadic = next((p.name for p in params if p.kind == p.VAR_POSITIONAL), None)
    # **kwargs (Hugging Face models take options through it) is left empty: inputs are named.
    keywords = [p.name for p in params if p.kind == p.VAR_KEYWORD]
    taken = {p.name for p in params}
    params = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    names = [p.name for p in params]
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    filling: list[str] | None = None
    if isinstance(example, dict):
        if variadic is not None:
            raise FtcError(
                f"example_inputs() gives a dict (keyword inputs), but forward takes *{variadic}, "
                "which only positional inputs fill",
                f"return a tuple from example_inputs(), its values in the order forward takes them "
                f"({', '.join([*positional, f'*{variadic}'])})",
            )
        unknown = [key for key in example if key not in names]
        if unknown and keywords:
            raise FtcError(
                f"example_inputs() gives keyword inputs {unknown}, which forward takes only through **{keywords[0]}; "
                "ftc needs one named parameter per input (stage code passes inputs by name)",
                f"give forward a parameter for each of {unknown} (keys must be Python names)",
            )
        if unknown:
            raise FtcError(
                f"example_inputs() gives keyword inputs {unknown} that forward does not take (it takes {names})",
                "use forward's parameter names as the dict keys",
            )
        fed = [name for name in names if name in example]
    else:
        if len(example) > len(positional) and variadic is None:
            raise FtcError(
                f"example_inputs() gives {len(example)} inputs; forward takes {len(positional)} positionally "
                f"({positional})",
                "return one tensor per positional forward parameter",
            )
        fed = positional[: len(example)]
        if variadic is not None:
            filling = [unique_name(f"{variadic}_{k}", taken) for k in range(len(example) - len(fed))]
            fed += filling
    defaults = {}
    for p in params:
        if p.name in fed:
            continue
        if p.default is p.empty:
            raise FtcError(
                f"forward parameter {p.name!r} has no default and example_inputs() does not give it",
                _missing_input_fix(p, variadic),
            )
        defaults[p.name] = p.default
    return Inputs(fed, defaults, filling)


def _missing_input_fix(param: inspect.Parameter, variadic: str | None) -> str:
    if param.kind != param.KEYWORD_ONLY:
        return f"add {param.name!r} to example_inputs()"
    if variadic is not None:
        return (f"give {param.name!r} a default in forward: example_inputs() fills *{variadic} with a tuple, "
                "which passes no keyword inputs")  # fmt: skip
    return f"return a dict from example_inputs() that gives {param.name!r} (a keyword-only parameter)"


def _empty_var_keyword(fx_graph: fx.Graph, model: torch.nn.Module, model_file: ModelFile) -> None:
    """forward's **kwargs is empty in a pipeline (inputs are named): `kwargs.get(key, default)`
    is its default. fx traces the dict as a value, whose readers would otherwise go with it."""
    params = list(inspect.signature(model.forward).parameters.values())
    if not any(p.kind == p.VAR_KEYWORD for p in params):
        return
    (holder,) = [n for n in fx_graph.nodes if n.op == "placeholder" and n.target.startswith("**")]
    for user in list(holder.users):
        if user.op == "call_method" and user.target == "get" and len(user.args) in (2, 3) and not user.kwargs:
            default = user.args[2] if len(user.args) == 3 else None
            for reader in list(user.users):
                reader.args = fx.node.map_arg(reader.args, lambda n: default if n is user else n)
                reader.kwargs = fx.node.map_arg(reader.kwargs, lambda n: default if n is user else n)
            fx_graph.erase_node(user)
            continue
        where = user.meta.get("ftc_source") or model_file.path.name
        raise FtcError(f"{where}: forward reads **{holder.target.lstrip('*')} other than by .get(key, default) "
                       f"(node {user.name!r}), which is empty in a pipeline: inputs are named",
                       "give forward a named parameter for that option, with its default")  # fmt: skip


class StarArgs(TypeError):
    """Not an FtcError, so that --frontend auto goes on to export."""


def star_args(model: torch.nn.Module) -> StarArgs:
    """fx's failure on a forward that takes *args and more parameters than its code names (a
    decorator's `wrapper(self, *args, **kwargs)`, as transformers wraps forward), which fx
    reports as 'code: co_varnames is too small'."""
    forward = type(model).forward
    code = getattr(forward, "__code__", None)
    wrapped = code is not None and forward is not inspect.unwrap(forward)
    if not wrapped:
        return StarArgs(f"{type(model).__name__}.forward takes *args")
    package = code.co_filename.split("site-packages/", 1)[1].split("/")[0] if "site-packages/" in code.co_filename else ""
    where = " ".join(filter(None, [package, Path(code.co_filename).name]))
    return StarArgs(f"{type(model).__name__}.forward is wrapped by a decorator taking *args ({where})")


def trace_fx(model: torch.nn.Module, model_file: ModelFile, example: tuple | dict, name: str) -> Graph:
    """Trace `model` (usually on the meta device) into an IR graph without metadata or costs."""
    fed, defaults, variadic = input_names(model, example)
    state = state_table(model)
    root_hooks = [*model._forward_pre_hooks.values(), *model._forward_hooks.values()]
    if root_hooks:
        raise RootHooked(
            f"fx does not record the model's own forward hooks ({', '.join(map(hook_name, root_hooks))}); export does"
        )
    tracer, fx_graph, branches = _traced(model, model_file, defaults, variadic, frozenset())
    trace_notes: list[str] = []
    if any(module is not model for module in tracer.read_flags_of):
        # forward branched on a module's self.training: where a call of the module is the whole
        # branch, the model is traced again with those modules kept whole, so that the stages
        # follow their mode there as the model does
        args, kwargs = ((), example) if isinstance(example, dict) else (tuple(example), {})
        found, _ = mode_branches(model, model_file, tracer.code, args, kwargs, own_reads=True)
        followed = [branch for branch in found if branch.callable_whole]
        if followed:
            whole = frozenset(id(model.get_submodule(path)) for branch in followed for path in branch.paths)
            tracer, fx_graph, branches = _traced(model, model_file, defaults, variadic, whole)
            trace_notes = followed_notes(followed, model_file)
    explained: list[str] = []  # reads of self.training that chose an attention's dropout
    root = tracer.root
    _empty_var_keyword(fx_graph, model, model_file)
    modules = module_table(model, model_file)

    names: dict[fx.Node, str] = {}
    # fx's names are unique already; reserving them keeps our renames from colliding.
    taken: set[str] = {fx_node.name for fx_node in fx_graph.nodes}
    nodes: list[Node] = []
    constants = {}
    outputs = None
    # A traced model calls a few functions thousands of times; look each one up once.
    spellings: dict[Any, str] = {}  # function -> function_expr
    parameters: dict[Any, Any] = {}  # function -> its signature's parameters, or None

    def ref_of(value: Any) -> Ref | None:
        return Ref(names[value]) if isinstance(value, fx.Node) else None

    # fx keeps placeholders in the order _placeholder_params reads; those of defaults given through
    # concrete_args only feed fx's own guards on the default's value, which we drop with them.
    params = _placeholder_params(model, defaults, variadic)
    skipped: set[fx.Node] = set()
    for fx_node in fx_graph.nodes:
        where = f"node {fx_node.name!r} ({fx_node.meta.get('ftc_source') or model_file.path.name})"
        if fx_node.op == "placeholder":
            param = next(params)
            if param not in fed:
                # Its guard chain (`eq` then `_assert` for a non-None default) goes with it.
                pending = [fx_node]
                while pending:
                    guard = pending.pop()
                    if guard not in skipped:
                        skipped.add(guard)
                        pending.extend(guard.users)
                continue
            names[fx_node] = param if param == fx_node.name else unique_name(param, taken)
            nodes.append(Node(names[fx_node], "input", param))
            continue
        if fx_node in skipped:
            continue
        if fx_node.op == "call_function" and fx_node.target is torch._assert and not fx_node.users:
            # torch._assert is fx's traceable assert; its condition is a value the meta device
            # lacks (`torch._assert(torch.all(ids >= 0), ...)`), and stage code leaves checks
            # out, as it does export's (aten.DROPPED).
            continue
        if fx_node.op == "output":
            outputs = _outputs(fx_node.args[0], ref_of)
            continue
        module_path, module_class = _scope(fx_node, modules)
        node = Node(
            name=_readable_name(fx_node, names, taken, root),
            op=fx_node.op,
            target="",
            module_path=module_path,
            module_class=module_class,
            source=fx_node.meta.get("ftc_source", ""),
            callers=fx_node.meta.get("ftc_callers", []),
            grad_enabled=fx_node.meta.get("ftc_grad_enabled", True),
        )
        if fx_node.op == "get_attr":
            node.target = fx_node.target
            if fx_node.target not in state:
                value = _fetch(root, fx_node.target)
                if isinstance(value, torch.Generator):
                    raise FtcError(
                        f"{where}: forward draws from a torch.Generator of the model's own (generator=...), which "
                        "stage code cannot hold",
                        "draw from torch's default generator (leave generator= out: ftc seeds it for every stage "
                        "and micro-batch), or list the class that draws in LEAF_MODULES, so that it runs as it is",
                    )
                if not isinstance(value, torch.Tensor):
                    raise FtcError(f"{where}: reads attribute {fx_node.target!r}, which is not a tensor")
                if value.device.type == "meta" and fx_node.target.startswith("_tensor_constant"):
                    # fx made this constant from a tensor forward computed out of state it never saw
                    # as traced values (`for p in self.parameters()`); export traces it.
                    raise StateUntraced(
                        f"{where}: fx would fix as a constant a tensor made from parameters() or buffers()"
                    )
                data, dtype = constant_from_tensor(value, where)
                node.target = unique_name(f"const_{len(constants)}", set(constants) | set(state) | taken)
                node.name = node.target
                constants[node.target] = Constant(data, dtype)
        else:
            if fx_node.op == "call_function":
                if fx_node.target not in spellings:
                    spellings[fx_node.target] = function_expr(fx_node.target, fx_node.name)
                node.target = spellings[fx_node.target]
            else:
                node.target = fx_node.target
            node.args = tuple(ir_arg(a, ref_of, where) for a in fx_node.args)
            node.kwargs = {k: ir_arg(v, ref_of, where) for k, v in _explicit_kwargs(fx_node, parameters).items()}
            if fx_node.op == "call_function" and fx_node.target is F.scaled_dot_product_attention:
                explained.extend(_attention_dropout(node, fx_node.meta.get("ftc_flag_reads", [])))
            module = root.get_submodule(fx_node.target) if fx_node.op == "call_module" else None
            if isinstance(fx_node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):  # torch.library
                node.mutates = schema_mutated(fx_node.target)
            else:
                node.mutates = mutated_arg(fx_node.op, node.target, node.kwargs, module)
            changed = fx_node.args[node.mutates] if node.mutates is not None and node.mutates < len(fx_node.args) else None
            if isinstance(changed, fx.Node) and changed.op == "get_attr" and changed.target.startswith("_tensor_constant"):
                # `t = torch.tensor([...]); t.add_(h)`: fx records the change on a constant of its
                # own and makes another for each later read of t, which then misses the change
                # (and the first constant, a stage buffer, would add up the changes call by call)
                raise ConstantChanged(
                    f"{fx_node.meta.get('ftc_source') or model_file.path.name}: a torch.tensor(...) changed in place: "
                    "fx loses the change, export records it"
                )
        names[fx_node] = node.name
        nodes.append(node)

    # A place whose every read chose an attention's dropout probability now follows the stage's
    # mode; the others still keep what training mode computed there.
    reads = Counter(place for fx_node in fx_graph.nodes for place in fx_node.meta.get("ftc_flag_reads", []))
    reads.update(tracer.flag_reads)  # read after the last op
    explained_reads = Counter(explained)
    return Graph(
        name=name,
        nodes=nodes,
        outputs=outputs,
        state=state,
        modules=modules,
        constants=constants,
        frontend="fx",
        training_branches=[place for place in branches if explained_reads[place] < reads[place]],
        trace_notes=trace_notes,
    )


def _traced(
    model: torch.nn.Module, model_file: ModelFile, defaults: dict[str, Any], variadic: list[str] | None,
    whole: frozenset[int],
) -> tuple[_Tracer, fx.Graph, list[str]]:
    """fx's graph of the model, with the modules whose ids are in `whole` kept whole; its tracer;
    and the places where forward read self.training other than to pass it on."""
    tracer = _Tracer(model_file, model, variadic, whole)
    branches: list[str] = []
    # fx records ops on the tensors it hands out (get_attr proxies); a parameter or buffer forward
    # takes another way (`self.teacher.parameters()`, `named_buffers()`) is the real tensor, and an
    # in-place write to it runs once while tracing and is lost. Its version counter tells.
    versions = {name: t._version for name, t in [*model.named_parameters(), *model.named_buffers()]}
    draws: list[str] = []
    with attributes_restored(model):
        with tracer.training_flags(model, branches), _EagerDraws(model_file, draws), _tensors_of_traced_values(tracer):
            try:
                fx_graph = tracer.trace(model, concrete_args=defaults or None)
            except ValueError as exc:
                raise (star_args(model) if "co_varnames is too small" in str(exc) else exc) from exc
        _untraced_changes_refused(model, draws, versions)
    return tracer, fx_graph, branches


def _untraced_changes_refused(model: torch.nn.Module, draws: list[str], versions: dict[str, int]) -> None:
    """Raise where the trace left what fx does not record: a draw, a buffer assigned, state
    written in place that forward took other than by attribute."""
    if draws:
        raise DrawnWhileTracing(
            f"{', '.join(dict.fromkeys(draws))} draws with no traced argument: the stage code would fix the draw; "
            "export records it as an op"
        )
    # `self.count += 1` leaves fx's Proxy in the buffer's slot.
    assigned = [name for name, value in model.named_buffers() if isinstance(value, fx.Proxy)]
    if assigned:
        raise BufferAssigned(
            f"forward assigns buffer {', '.join(assigned)} (+= or =), which fx does not record; export does"
        )
    state_now = [*model.named_parameters(), *model.named_buffers()]
    written = [name for name, t in state_now if isinstance(t, torch.Tensor) and t._version != versions.get(name, t._version)]
    if written:
        more = f" and {len(written) - 1} more" if len(written) > 1 else ""
        raise StateWrittenUntraced(
            f"forward writes {written[0]}{more} in place, taken from parameters() or buffers(): fx would drop the write"
        )


@contextlib.contextmanager
def _tensors_of_traced_values(tracer: _Tracer) -> Iterator[None]:
    """While tracing, `torch.tensor(...)` of a traced value (`torch.tensor(x.shape[-1])`, a size)
    is recorded as a call, as the model wrote it; fx itself fails there with a TypeError about
    `__cuda_array_interface__` (torch.tensor reads the Proxy as an array)."""
    make = torch.tensor

    def tensor(data: Any, *args: Any, **kwargs: Any) -> Any:
        if any(isinstance(item, fx.Proxy) for item in pytree.tree_leaves((data, args, kwargs))):
            return tracer.create_proxy("call_function", make, (data, *args), kwargs)
        return make(data, *args, **kwargs)

    torch.tensor = tensor
    try:
        yield
    finally:
        torch.tensor = make


def _attention_dropout(node: Node, flag_reads: list[str]) -> list[str]:
    """`F.scaled_dot_product_attention(..., dropout_p=p if self.training else 0.0)`, the way
    torch.nn, timm and nanoGPT pass attention dropout: the flag is read right before the call,
    and the traced call has a positive constant probability. It becomes that expression again,
    so the stage follows its own train()/eval(); returns the reads it explains. A probability
    chosen without reading self.training (Monte Carlo dropout) stays as it is."""
    if not flag_reads:
        return []
    if "dropout_p" in node.kwargs:
        dropout, put = node.kwargs["dropout_p"], lambda v: node.kwargs.__setitem__("dropout_p", v)
    elif len(node.args) > 4:
        dropout, put = node.args[4], lambda v: setattr(node, "args", (*node.args[:4], v, *node.args[5:]))
    else:
        return []
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or dropout <= 0:
        return []
    put(TorchExpr(f"{float(dropout)!r} if self.training else 0.0"))
    return flag_reads


def _placeholder_params(model: torch.nn.Module, defaults: dict[str, Any], variadic: list[str] | None) -> Iterator[str]:
    """The forward parameter each of fx's placeholders stands for, in fx's order: the named
    parameters (keyword-only ones too), the values of *args (`variadic`), then **kwargs. fx makes
    one placeholder per pytree leaf of a concrete_args value: a tuple default gives several, an
    empty one none."""
    params = inspect.signature(model.forward).parameters.values()
    for param in [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]:
        yield from [param] * (len(pytree.tree_leaves(defaults[param])) if param in defaults else 1)
    yield from variadic or []
    yield from [p.name for p in params if p.kind == p.VAR_KEYWORD]


class BufferAssigned(Exception):
    """fx cannot trace this model; not an FtcError, so that --frontend auto tries export."""


class DrawnWhileTracing(BufferAssigned):
    """forward draws from torch's generator with arguments fx does not trace (`torch.rand([])`,
    a fairseq-style LayerDrop's `torch.empty(1).uniform_()`): the draw runs while tracing and its
    outcome, or a branch on it, is fixed in the stage code; export traces it."""


class _EagerDraws(TorchDispatchMode):
    """Records the model-code line of each seeded aten op that runs while fx traces: ops on fx's
    proxies are recorded, not run, so one that runs is a draw whose outcome the trace fixes."""

    def __init__(self, model_file: ModelFile, draws: list[str]):
        super().__init__()
        self.model_file = model_file
        self.draws = draws

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.nondeterministic_seeded in func.tags:
            where = user_source(self.model_file) or self.model_file.path.name
            self.draws.append(f"{func.overloadpacket.__name__} at {where}")
        return func(*args, **(kwargs or {}))


class RootHooked(BufferAssigned):
    """The model itself has forward hooks or pre-hooks: fx traces `model.forward`, not the
    model's call that runs them (it records the hooks of the modules inside); export traces the
    call."""


class ConstantChanged(BufferAssigned):
    """forward makes a tensor from Python values and changes it in place with a traced value;
    export traces both."""


class StateUntraced(BufferAssigned):
    """forward computes with state fx never saw as traced values (an L2 term over
    `self.parameters()`); export traces it."""


class StateWrittenUntraced(BufferAssigned):
    """forward writes a parameter or buffer that fx never saw (an EMA teacher updated from
    `zip(self.teacher.parameters(), self.student.parameters())`); export records the write."""


def _explicit_kwargs(fx_node: fx.Node, parameters: dict[Any, Any]) -> dict[str, Any]:
    """fx records keyword arguments that torch.nn.functional passes along with their default
    values (F.softmax adds `_stacklevel=3, dtype=None`); drop those equal to the default.
    `parameters` holds the signatures looked up so far (function -> parameters or None)."""
    if fx_node.op != "call_function" or not fx_node.kwargs:
        return dict(fx_node.kwargs)
    if fx_node.target not in parameters:
        try:
            parameters[fx_node.target] = inspect.signature(fx_node.target).parameters
        except (TypeError, ValueError):  # builtins without a Python signature
            parameters[fx_node.target] = None
    params = parameters[fx_node.target]
    if params is None:
        return dict(fx_node.kwargs)
    return {
        key: value
        for key, value in fx_node.kwargs.items()
        if not (key in params and _same(params[key].default, value))
    }


def _same(default: Any, value: Any) -> bool:
    if default is inspect.Parameter.empty or isinstance(value, fx.Node):
        return False
    return type(default) is type(value) and default == value


def _fetch(root: torch.nn.Module, target: str) -> Any:
    module_path, _, attr = target.rpartition(".")
    return getattr(root.get_submodule(module_path), attr, None)


def _scope(fx_node: fx.Node, modules: dict[str, str]) -> tuple[str, str]:
    """The module whose forward made this node: the innermost entry of fx's module stack that is
    not the called leaf itself."""
    stack = fx_node.meta.get("nn_module_stack") or {}
    scopes = [path for path, _ in stack.values() if not (fx_node.op == "call_module" and path == fx_node.target)]
    path = scopes[-1] if scopes else ""
    return path, modules.get(path, "")


def _readable_name(fx_node: fx.Node, names: dict[fx.Node, str], taken: set[str], root: torch.nn.Module) -> str:
    """fx's name, except that an attribute read is named after the attribute ('shape' for fx's
    'getattr_2'), unpacked items read as '<source>_<index>' instead of 'getitem_7' (when that
    name is free; 'shape_1' for `x.shape[1]`) and tensor constants as their constant."""
    if fx_node.op == "call_function" and fx_node.target is getattr:
        attribute = fx_node.args[1] if len(fx_node.args) == 2 else None
        if isinstance(attribute, str) and attribute.isidentifier() and not attribute.startswith("_"):
            return unique_name(attribute, taken)
    if fx_node.op == "call_function" and getattr(fx_node.target, "__name__", "") == "getitem":
        source, index = fx_node.args
        if isinstance(source, fx.Node) and isinstance(index, int) and index >= 0:
            name = f"{names[source]}_{index}"
            if name not in taken:
                taken.add(name)
                return name
    if fx_node.op == "call_module" and fx_node.name.startswith("_"):
        # a module of a root Sequential: "linear_2" reads better than fx's "_2"
        return unique_name(f"{type(root.get_submodule(fx_node.target)).__name__.lower()}{fx_node.name}", taken)
    return fx_node.name


def _outputs(structure: Any, ref_of) -> Outputs:
    def value_ref(value: Any, where: str) -> Ref:
        ref = ref_of(value)
        if isinstance(value, (tuple, list, dict)):
            raise FtcError(
                f"model output {where} is a {type(value).__name__}: the output is nested",
                "return a tensor, a flat tuple of tensors or a flat dict of tensors (e.g. unpack "
                "hidden_states into their own keys, or leave them out)",
            )
        if ref is None:
            raise FtcError(
                f"model output {where} is {type(value).__name__} ({value!r:.40}), not a value computed in forward",
                "return only tensors computed from the inputs (a tensor, a tuple of them or a dict of them)",
            )
        return ref

    if isinstance(structure, (tuple, list)):
        kind = "list" if isinstance(structure, list) else "tuple"  # what loss_fn is given, as the model returns it
        return Outputs(kind, [value_ref(v, f"[{i}]") for i, v in enumerate(structure)])
    if isinstance(structure, dict):
        return Outputs("dict", [value_ref(v, f"[{k!r}]") for k, v in structure.items()], [str(k) for k in structure])
    return Outputs("value", [value_ref(structure, "")])
