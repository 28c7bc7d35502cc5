"""torch.export frontend (non-strict): for models whose Python torch.fx cannot trace, such as
code that computes with shapes (`torch.ones(t, t)` with `t = x.shape[1]`) or Hugging Face
transformers models.

The exported ATen graph is lowered into the same IR as fx's: lifted parameters and buffers
become get_attr nodes under their original names; the common ATen ops become the torch code
people write (`a + b`, `x.view(...)`, `F.layer_norm`, see aten.py); an op that was the whole
forward of a torch.nn layer (Linear, LayerNorm, Embedding, Dropout, ...) becomes a call of that
module, so dropout follows the stage's train()/eval() mode, and so does the whole call of a
layer with several inputs or outputs (aten.WHOLE_CALLS: `self.lstm(x, (h0, c0))`), whose call
signature export keeps; nodes keep their original module
path (from nn_module_stack) for the stage comments; the batch dimension is symbolic (Dim
"batch"), so stage code reads sizes from its inputs; and factory calls that named the tracing
device use the stage's device.

What stays as traced: training flags the model's Python read while tracing outside a torch.nn
layer (`F.dropout(x, p, training=self.training)`, the dropout_p that attention code passes to
scaled_dot_product_attention when training) and any Python branch on them. Such branches are
named: the model's own from its source (training_branches.py), a library's by running forward in
both modes (eval_mode.py).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import operator
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.export.graph_signature import ConstantArgument, InputKind, OutputKind, TensorArgument
from torch.utils._pytree import TreeSpec, tree_unflatten

from ftc.interpreter import fetch_attr
from ftc.ir import Constant, FtcError, Graph, Node, Outputs, Ref, TorchExpr, unique_name
from ftc.runtime.replay import built_values
from ftc.runtime.model_file import ModelFile

from .aten import DROPPED, OUTPUT_NAMES, WHOLE_CALLS, Call, lower, module_call, op_key, output_name, whole_view
from .draws import TRACE_SEED
from .common import (
    CodeFiles,
    autocast_refused,
    constant_from_tensor,
    function_expr,
    ir_arg,
    module_table,
    named_tuple_error,
    schema_mutated,
    state_table,
)
from .eval_mode import branch_notes, followed_notes, mode_branches
from .export_program import bounded_program, range_notes
from .fx import input_names
from .buffer_assignments import buffer_assignments_as_copies
from .nested_fast_path import fast_path_note, padding_masked_encoders, zeroed_in_eval
from .overflow_guards import OverflowGuards, overflow_note
from .tidy import tidy
from .training_branches import training_branches

# The device the stage runs on; generated code binds `device` from a stage input.
STAGE_DEVICE = TorchExpr("device")

# The device forward sees while torch.export traces it. The model is built on the meta device,
# but library code branches on `x.device.type` (transformers' MoE layers count tokens per expert
# with `torch.histc` on float input on the CPU, on int input elsewhere, which the CPU refuses), so
# forward runs on fake tensors that say "cpu" without allocating anything; the graph's device
# arguments become the stage's device.
TRACE_DEVICE = torch.device("cpu")


def _batch_dims(single: tuple | dict, double: tuple | dict) -> tuple | dict:
    batch = torch.export.Dim("batch")

    def spec(a: torch.Tensor, b: torch.Tensor):
        for dim, (x, y) in enumerate(zip(a.shape, b.shape)):
            if x > 0 and y == 2 * x:
                return {dim: batch}
        return None

    if isinstance(single, dict):
        return {key: spec(single[key], double[key]) for key in single}
    return tuple(spec(a, b) for a, b in zip(single, double))


def trace_export(
    model: torch.nn.Module, model_file: ModelFile, batch: tuple | dict, double_batch: tuple | dict, name: str,
    sizes_written: set[str] | None = None,
) -> Graph:
    """The IR graph torch.export traces; with `sizes_written` (a set of buffer names), the
    model's 0-d integer non-persistent buffers other than those in it read as constants of their
    built values, and those that forward writes are added to it (_sizes_as_constants)."""
    fed = input_names(model, batch).fed
    args, kwargs = ((), batch) if isinstance(batch, dict) else (batch, {})
    dynamic = _batch_dims(batch, double_batch)
    code = CodeFiles(model_file, model)
    sizes = contextlib.nullcontext() if sizes_written is None else _sizes_as_constants(model, model_file, sizes_written)
    with sizes, on_fake_device(model, (args, kwargs), TRACE_DEVICE) as (args, kwargs):
        # a module that branches on self.training is kept as one call where it can be, so that
        # the stages follow their mode there
        own_places = training_branches(model, model_file)
        branches, notes = mode_branches(model, model_file, code, args, kwargs, own_reads=bool(own_places))
        whole = {path for branch in branches if branch.callable_whole for path in branch.paths}
        # and so is each LEAF_MODULES module, which then runs as written (for real, where it needs
        # tensor values: `.tolist()` of sizes, as transformers' JetMoE splits tokens by expert)
        whole |= {path for path, module in model.named_modules() if path and isinstance(module, model_file.leaf_modules)}
        # one call holds the calls of the modules inside it
        kept = tuple(sorted(path for path in whole if not any(path.startswith(f"{outer}.") for outer in whole)))
        op_by_op = [branch for branch in branches if branch.library and not branch.callable_whole]
        with (OverflowGuards(code) as guards, buffer_assignments_as_copies(model, model_file, code),
              padding_masked_encoders(model) as masked_encoders):
            program, batch_range = bounded_program(model, model_file, args, kwargs, dynamic, kept, op_by_op)
    _inline_grad_mode_blocks(program.graph_module)
    _split_out_variants(program.graph)
    signature = program.graph_signature
    modules = module_table(model, model_file)
    state = state_table(model)
    constants = {}

    names: dict[fx.Node, str] = {}
    taken: set[str] = set()
    nodes: list[Node] = []
    state_tensors: dict[fx.Node, torch.Tensor] = {}

    def ref_of(value: Any) -> Ref | None:
        return Ref(names[value]) if isinstance(value, fx.Node) else None

    user_inputs = iter(fed)
    batch_dim = _batch_dim_by_input(fed, dynamic)
    input_of: dict[fx.Node, str] = {}
    specs = {spec.arg.name: spec for spec in signature.input_specs}
    whole_calls = {call.members[-1]: call for call in _whole_calls(program, model, kept)}
    in_whole_call = {member for call in whole_calls.values() for member in call.members}
    # an item taken from an op's several outputs (an LSTM cell's h and c) computes nothing
    module_calls: set[fx.Node] = set()  # ops that became a call of their module
    checks = _checks_only(program.graph)
    ops_per_call = Counter(_call_key(n) for n in program.graph.nodes if n.op == "call_function" and n not in checks
                           and n.target is not operator.getitem)  # fmt: skip
    for fx_node in program.graph.nodes:
        where = f"node {fx_node.name!r}"
        if fx_node.op == "placeholder":
            spec = specs[fx_node.name]
            if spec.kind == InputKind.USER_INPUT:
                input_name = fx_node.name if fx_node.name in fed else next(user_inputs)
                names[fx_node] = unique_name(input_name, taken)
                input_of[fx_node] = input_name
                nodes.append(Node(names[fx_node], "input", input_name))
                continue
            # A tied tensor by its first name (`model.embed_tokens.weight`), whichever alias
            # export happened to pick (`lm_head.weight`).
            target = state[spec.target].alias_of or spec.target if spec.target in state else spec.target
            node = Node(unique_name(fx_node.name.removeprefix("p_").removeprefix("b_"), taken), "get_attr", target)
            if spec.kind == InputKind.CONSTANT_TENSOR:
                if _without_values(program.constants[spec.target]):
                    line = next((source for user in fx_node.users if (source := _scope(user, code)[1])), where)
                    writes = [user for user in fx_node.users if _writes(user, fx_node)]
                    if writes:
                        raise _data_write_refused(line, writes[0])
                    raise FtcError(
                        f"{line}: forward makes a tensor from Python values (torch.tensor(...)) or reads a parameter's "
                        "or buffer's .data, which torch.export, tracing on tensors without data (the model is built on "
                        "the meta device), keeps as a constant without its values",
                        "compile with --frontend fx (or auto); or make the tensor a buffer in __init__ "
                        "(self.register_buffer(name, tensor, persistent=False)), or read .detach() instead of .data",
                    )
                data, dtype = constant_from_tensor(program.constants[spec.target], where)
                node.target = unique_name(f"const_{len(constants)}", set(constants) | set(state))
                constants[node.target] = Constant(data, dtype)
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                state_tensors[fx_node] = fetch_attr(model, spec.target)
            else:
                raise FtcError(f"torch.export input {fx_node.name!r} of kind {spec.kind.name} is not supported")
        elif fx_node.op == "output":
            user_values = [
                value
                for value, out_spec in zip(fx_node.args[0], signature.output_specs)
                if out_spec.kind == OutputKind.USER_OUTPUT
            ]
            outputs = _outputs(program.call_spec.out_spec, user_values, ref_of)
            continue
        elif fx_node.op == "call_function":
            if fx_node in whole_calls:
                nodes.extend(_layer_call(whole_calls[fx_node], model, modules, code, names, taken, ref_of))
                continue
            if fx_node in in_whole_call or fx_node in checks:
                continue
            if _copies_onto_itself(fx_node):
                # export writes a buffer that forward updated in place back onto itself
                # (`count.copy_(count.add_(1))`): a no-op that would tie the update to the end.
                names[fx_node] = names[fx_node.args[0]]
                continue
            whole = whole_view(fx_node.target, fx_node.args, fx_node.kwargs) if _is_aten(fx_node) else None
            if isinstance(whole, fx.Node):
                names[fx_node] = names[whole]
                continue
            target = fx_node.target
            fx_args = tuple(_stage_device(a) for a in fx_node.args)
            fx_kwargs = {k: _stage_device(v) for k, v in fx_node.kwargs.items()}
            module_path, source = _scope(fx_node, code)
            label = fx_node.name
            node = Node("", "call_function", "")
            if target is torch.ops.aten.sym_size.int:
                node.op, node.target = "call_method", "size"
                if fx_args[1] == batch_dim.get(input_of.get(fx_args[0])):
                    label = "batch"
            elif isinstance(target, torch._ops.OpOverload):
                node.mutates = schema_mutated(target)
                call = None
                if ops_per_call[_call_key(fx_node)] == 1 and module_path in modules:
                    submodule = model.get_submodule(module_path)
                    call = module_call(target, fx_args, fx_kwargs, submodule, module_path, state_tensors.get)
                if call is not None:  # the node stands for the module call, made in the caller's scope
                    module_path, source = _scope(fx_node, code, outer=1)
                    label = _call_label(call.target, submodule)
                    module_calls.add(fx_node)
                if target in _ASSIGNED_VALUE:
                    fx_args = _assigned_scalar(fx_args, _ASSIGNED_VALUE[target], specs, program.constants)
                call = call or lower(target, fx_args, fx_kwargs)
                if call is not None and _counts_batches(target, fx_args, model, module_path, modules, state_tensors):
                    # torch.nn's BatchNorm counts batches in training mode only (`if self.training`),
                    # which the trace (in training mode) resolved: the stage counts as it trains
                    call = Call(call.op, call.target, (call.args[0], TorchExpr("1 if self.training else 0")))
                if call is None:
                    node.target = function_expr(target, fx_node.name)
                else:
                    node.op, node.target, fx_args, fx_kwargs = call.op, call.target, call.args, call.kwargs
            elif isinstance(target, torch._ops.HigherOrderOperator):
                raise _higher_order_refused(fx_node, code, model_file)
            elif getattr(target, "__module__", "") == "torch._functorch.predispatch":
                raise FtcError(
                    f"{model_file.path}: forward calls torch.vmap (torch.func) at {source or where}: torch.export "
                    "records it as functorch's batching ops, with the batch size fixed, which stage code can neither "
                    "run op by op nor split",
                    "write the per-sample function with ops that take the batch dimension (matmul, einsum and "
                    "broadcasting do), or do it inside a torch.nn.Module, list that module's class in LEAF_MODULES "
                    "and compile with --frontend fx or auto: fx keeps a leaf module whole, so it runs as it is",
                )
            else:
                node.target = function_expr(target, fx_node.name)
                label = _item_label(fx_node, module_path, model) or label
                if fx_node.args and fx_node.args[0] in module_calls:  # an item of a cell's (h, c)
                    module_path, source = _scope(fx_node, code, outer=1)
            node.args = tuple(ir_arg(a, ref_of, where) for a in fx_args)
            node.kwargs = {k: ir_arg(v, ref_of, where) for k, v in fx_kwargs.items()}
            node.name = unique_name(label, taken)
            if label == fx_node.name:
                # The ATen op's name without export's counter: "slice" for `x[:, :L]` lowered to
                # an index, where the label from the lowered call would be its name, "slice_62".
                node.label = re.sub(r"_\d+$", "", label)
            node.grad_enabled = fx_node.meta.get("ftc_grad_enabled", True)
            node.module_path, node.module_class, node.source = module_path, modules.get(module_path, ""), source
            node.callers = _frames(fx_node, code)[:-1]
        else:
            # A higher-order op's body graph is a get_attr node just before the op's call.
            for user in fx_node.users:
                if isinstance(user.target, torch._ops.HigherOrderOperator):
                    raise _higher_order_refused(user, code, model_file)
            raise FtcError(f"torch.export produced a {fx_node.op} node {fx_node.name!r}, which ftc does not lower")
        names[fx_node] = node.name
        nodes.append(node)

    # what the traced ops computed, by value name: tidy's rewrites depend on ranks and dtypes
    values = {names[n]: n.meta.get("val") for n in program.graph.nodes if n in names}
    nodes, outputs.values = tidy(nodes, outputs.values, values, constants)
    # a module called whole where it ran ops computes none that the graph lowers op by op
    lowered = {node.module_path for node in nodes if node.op != "call_module"}
    followed = [branch for branch in branches if branch.callable_whole and not any(
        scope == path or scope.startswith(f"{path}.") for path in branch.paths for scope in lowered)]  # fmt: skip
    unfollowed = [branch for branch in branches if branch not in followed]
    notes = branch_notes(unfollowed, model_file) + followed_notes(followed, model_file) + notes + overflow_note(guards.lines)
    zeroed = zeroed_in_eval(masked_encoders, nodes)
    notes += [fast_path_note(path, line) for path, line in zeroed.items()]
    followed_own = {branch.owner for branch in followed if not branch.library}
    if followed_own:
        own_places = training_branches(model, model_file, followed_own)
    return Graph(
        name=name, nodes=nodes, outputs=outputs, state=state, modules=modules,
        constants=constants, frontend="export", trace_notes=range_notes(batch_range) + notes,
        training_branches=own_places + list(dict.fromkeys([b.line for b in unfollowed if b.library] + list(zeroed.values()))),
        batch_range=batch_range,
    )  # fmt: skip


def _counts_batches(target: Any, args: tuple, model: torch.nn.Module, path: str, modules: dict, state: dict) -> bool:
    """Whether the op is a BatchNorm layer's `self.num_batches_tracked.add_(1)`."""
    if target is not torch.ops.aten.add_.Tensor or path not in modules or len(args) != 2 or args[1] != 1:
        return False
    module = model.get_submodule(path)
    return isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and state.get(args[0]) is module.num_batches_tracked


@dataclass
class _WholeCall:
    """One call of a WHOLE_CALLS layer, as the ATen graph holds it."""

    key: str  # the call's nn_module_stack key
    path: str  # the layer's module path
    members: list[fx.Node]  # the ops the call ran, in graph order
    args: tuple  # the call's arguments: graph nodes and constants, as the layer was called
    kwargs: dict[str, Any]
    outputs: dict[fx.Node, tuple]  # each returned value -> its position in the layer's nested output


def _whole_calls(program: torch.export.ExportedProgram, model: torch.nn.Module, kept: tuple[str, ...]) -> list[_WholeCall]:
    """The calls of WHOLE_CALLS layers, and of the modules at the `kept` paths, whose ops can be
    written as one call of the layer: they
    read only the call's arguments and the layer's own parameters and buffers, nothing outside
    reads them but through the call's outputs, and no other op ran between them. The layer's
    forward made those ops from those arguments, so calling it computes what they compute (and
    follows the stage's train()/eval() as the layer did)."""
    signatures = {entry.fqn: entry.signature for entry in program.module_call_graph if entry.signature is not None}
    graph_nodes = list(program.graph.nodes)
    by_name = {node.name: node for node in graph_nodes}
    position = {node: k for k, node in enumerate(graph_nodes)}
    members_of: dict[str, list[fx.Node]] = {}
    path_of: dict[str, str] = {}
    for node in graph_nodes:
        for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
            members_of.setdefault(key, []).append(node)
            path_of[key] = path
    output_node = graph_nodes[-1]
    specs = program.graph_signature
    user_outputs = {
        value for value, spec in zip(output_node.args[0], specs.output_specs) if spec.kind == OutputKind.USER_OUTPUT
    }
    state_kinds = (InputKind.PARAMETER, InputKind.BUFFER)
    state_of = {spec.arg.name: spec.target for spec in specs.input_specs if spec.kind in state_kinds}
    calls = []
    for key, ran in members_of.items():
        path = path_of[key]
        # export numbers a layer's later calls "path@1", "path@2" in its keys and signatures
        signature = signatures.get(f"{path}@{key.rpartition('@')[2]}" if "@" in key else path)
        # the root's signature is the model's own, and a layer that computed nothing is no call to write
        members = _without_sizes(ran)
        if not path or signature is None or not members:
            continue
        if not (path in kept or isinstance(model.get_submodule(path), WHOLE_CALLS)):
            continue
        leaves = [by_name.get(a.name) if isinstance(a, TensorArgument) else a for a in signature.inputs]
        if not all(isinstance(leaf, fx.Node) or isinstance(leaf, ConstantArgument) for leaf in leaves):
            continue
        arguments = [leaf.value if isinstance(leaf, ConstantArgument) else leaf for leaf in leaves]
        member_set = set(members)
        inputs = {leaf for leaf in arguments if isinstance(leaf, fx.Node)}
        returned = [by_name.get(a.name) if isinstance(a, TensorArgument) else None for a in signature.outputs]
        positions = _positions(tree_unflatten(list(range(len(returned))), signature.out_spec), ())
        outputs = {value: positions[i] for i, value in enumerate(returned) if value is not None}
        first, last = position[members[0]], position[members[-1]]
        sound = (
            not inputs & member_set
            and set(outputs) <= member_set
            and all(node in member_set or _is_size(node) or (_dropped(node) and not node.users)
                    for node in graph_nodes[first : last + 1])
            and all(
                read in member_set or read in inputs or state_of.get(read.name, "").startswith(f"{path}.")
                or _is_size(read)  # forward reads its sizes from its arguments again
                for member in members for read in member.all_input_nodes
            )
            and all(
                user in member_set or (member in outputs and (user is not output_node or member in user_outputs))
                for member in members for user in member.users
            )
        )  # fmt: skip
        if sound:
            args, kwargs = tree_unflatten(arguments, signature.in_spec)
            calls.append(_WholeCall(key, path, members, tuple(args), dict(kwargs), outputs))
    return calls


def _is_size(node: fx.Node) -> bool:
    """A Python number the graph computes (a size, or arithmetic on sizes), not a tensor."""
    return isinstance(node.meta.get("val"), (int, torch.SymInt, torch.SymBool, torch.SymFloat))


def _without_sizes(ran: list[fx.Node]) -> list[fx.Node]:
    """The ops of a layer call but the sizes it computed from values given to it (the batch
    size times the heads): export computes a size once and later code reads it from there, so
    such a size stays a value of its own, which the code after the call may read."""
    members: list[fx.Node] = []
    for node in ran:
        if not _is_size(node) or any(read in members for read in node.all_input_nodes):
            members.append(node)
    return members


def _positions(structure: Any, at: tuple) -> dict[int, tuple]:
    """Leaf index -> its position (indices and keys) in a nested output of leaf indices."""
    if isinstance(structure, int):
        return {structure: at}
    items = structure.items() if isinstance(structure, dict) else enumerate(structure)
    return {leaf: position for key, item in items for leaf, position in _positions(item, (*at, key)).items()}


def _layer_call(
    call: _WholeCall, model: torch.nn.Module, modules: dict[str, str], code: CodeFiles,
    names: dict[fx.Node, str], taken: set[str], ref_of: Any,
) -> list[Node]:  # fmt: skip
    """The IR of a whole layer call: `lstm = self.lstm(x, (h0, c0))`, then its outputs taken out
    item by item (`lstm[1][0]`), named after the layer's documented outputs (`lstm_h`); the
    naming pass gives them the source's names where a statement unpacks them."""
    module = model.get_submodule(call.path)
    label = _call_label(call.path, module)
    last = call.members[-1]
    stack = last.meta.get("nn_module_stack") or {}
    # the call is made in the scope of the module that called the layer
    callers = [path for key, (path, _) in stack.items()][: list(stack).index(call.key)]
    module_path = next((path for path in reversed(callers) if not path.startswith("_")), "")
    frames = _callers_frames(_frames(last, code), module, code)

    def made(name: str, op: str, target: str, args: tuple, kwargs: dict) -> Node:
        scope = (module_path, modules.get(module_path, ""), frames[-1] if frames else "", frames[:-1])
        node = Node(unique_name(name, taken), op, target, args, kwargs, *scope)
        node.grad_enabled = last.meta.get("ftc_grad_enabled", True)
        return node

    where = f"call of {call.path}"
    args = tuple(ir_arg(a, ref_of, where) for a in call.args)
    nodes = [made(label, "call_module", call.path, args, {k: ir_arg(v, ref_of, where) for k, v in call.kwargs.items()})]
    item_of = {(): nodes[0]}
    for value, position in call.outputs.items():
        for depth in range(1, len(position) + 1):
            if position[:depth] not in item_of:
                outer = Ref(item_of[position[: depth - 1]].name)
                name = f"{label}_{output_name(type(module), position[:depth])}"
                item = made(name, "call_function", "operator.getitem", (outer, position[depth - 1]), {})
                item_of[position[:depth]] = item
                nodes.append(item)
        names[value] = item_of[position].name
    return nodes


def _callers_frames(frames: list[str], module: torch.nn.Module, code: CodeFiles) -> list[str]:
    """The frames of a layer call's ops (outermost first) up to the line that called the layer:
    those in its forward and below are the layer's own code (a library's, whose file CodeFiles
    names), not where the model calls it."""
    forward = inspect.unwrap(type(module).forward)
    try:
        lines, first = inspect.getsourcelines(forward)
        name = code.name(inspect.getsourcefile(forward) or "")
    except (OSError, TypeError):
        return frames
    inside = {f"{name}:{line}" for line in range(first, first + len(lines))}
    return next((frames[:k] for k, frame in enumerate(frames) if frame in inside), frames)


def _item_label(fx_node: fx.Node, module_path: str, model: torch.nn.Module) -> str | None:
    """`lstm_h` for an item taken from the output of a multi-output layer op that stays as
    traced (`torch.lstm(...)[1]` in module `lstm`): the module's label and the item's name."""
    if fx_node.target is not operator.getitem or not isinstance(fx_node.args[1], int):
        return None
    source = fx_node.args[0]
    if not isinstance(source, fx.Node) or not _is_aten(source) or op_key(source.target) not in OUTPUT_NAMES:
        return None
    owner = _call_label(module_path, model.get_submodule(module_path)) if module_path else source.name
    return f"{owner}_{output_name(op_key(source.target), (fx_node.args[1],))}"


def _inline_grad_mode_blocks(module: fx.GraphModule) -> None:
    """Inline export's `wrap_with_set_grad_enabled` calls (a `with torch.no_grad():` block in
    forward becomes one call of a submodule graph) into the caller's graph, so ftc can split
    around and between their ops; every inlined node keeps the block's grad mode in
    meta["ftc_grad_enabled"], which codegen turns back into a `with torch.no_grad():` block."""
    graph = module.graph
    for call in list(graph.nodes):
        if call.op != "call_function" or call.target is not torch.ops.higher_order.wrap_with_set_grad_enabled:
            continue
        enabled, body_node, *operands = call.args
        body = getattr(module, body_node.target)
        _inline_grad_mode_blocks(body)  # nested blocks first, within the body's own graph
        env: dict[fx.Node, Any] = dict(zip([n for n in body.graph.nodes if n.op == "placeholder"], operands))
        results: Any = None
        with graph.inserting_before(call):
            for inner in body.graph.nodes:
                if inner.op == "placeholder":
                    continue
                if inner.op == "output":
                    results = fx.map_arg(inner.args[0], env.__getitem__)
                    continue
                if inner.op != "call_function":
                    raise FtcError(f"torch.export produced a {inner.op} node {inner.name!r} inside a grad-mode block")
                copy = graph.node_copy(inner, env.__getitem__)
                copy.meta["ftc_grad_enabled"] = inner.meta.get("ftc_grad_enabled", bool(enabled))
                env[inner] = copy
        for user in list(call.users):
            if user.target is not operator.getitem:
                raise FtcError(f"torch.export used the result of grad-mode block {call.name!r} as a whole")
            user.replace_all_uses_with(results[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(call)
        if not body_node.users:
            graph.erase_node(body_node)


def _higher_order_refused(call: fx.Node, code: CodeFiles, model_file: ModelFile) -> FtcError:
    bodies = [getattr(call.graph.owning_module, a.target) for a in call.args if isinstance(a, fx.Node) and a.op == "get_attr"]
    lines = [_scope(inner, code)[1] for body in bodies for inner in body.graph.nodes]
    line = _scope(call, code)[1] or next(filter(None, lines), "")
    if call.target is torch.ops.higher_order.wrap_with_autocast:
        return autocast_refused(model_file, line)
    return FtcError(
        f"torch.export produced the higher-order op {call.target.name()} at {line or model_file.path.name}",
        "ftc cannot lower it; compile with --frontend fx (which keeps LEAF_MODULES classes whole) "
        "or move that code out of forward",
    )


def _call_label(module_path: str, module: torch.nn.Module) -> str:
    """A module call's value name as fx makes it: the path with "_" for "." (and for any other
    character a name cannot hold, as in ModuleDict keys), led by the class ("linear_0_b") where
    the path starts with a Sequential's index."""
    label = re.sub(r"\W", "_", module_path)
    return f"{type(module).__name__.lower()}_{label}" if label[:1].isdigit() else label


def _batch_dim_by_input(fed: list[str], dynamic: tuple | dict) -> dict[str, int]:
    specs = dynamic.items() if isinstance(dynamic, dict) else zip(fed, dynamic)
    return {name: next(iter(spec)) for name, spec in specs if spec}


# The ops an index assignment of a number records, and the position of the value among their
# arguments: `h[mask] = 0.0` (index_put_), `h[:, 0] = 2` (fill_ of the view)
_ASSIGNED_VALUE = {torch.ops.aten.index_put_.default: 2, torch.ops.aten.fill_.Tensor: 1}


def _assigned_scalar(args: tuple, position: int, specs: dict, constants: dict) -> tuple:
    """The op's arguments with the value (at `position`) as the Python number the model
    assigned: export records `h[mask] = 0.0` as index_put_ of a fresh copy (lift_fresh_copy) of
    a 0-dim tensor constant holding the number in h's dtype, which Python's index assignment
    makes again from the number. Other values as they are."""
    if len(args) <= position or not isinstance(args[position], fx.Node):
        return args
    lifted = args[position]
    if lifted.target is not torch.ops.aten.lift_fresh_copy.default or len(lifted.users) != 1:
        return args
    source = lifted.args[0]
    spec = specs.get(source.name) if isinstance(source, fx.Node) and source.op == "placeholder" else None
    if spec is None or spec.kind != InputKind.CONSTANT_TENSOR:
        return args
    tensor = constants[spec.target]
    written = args[0].meta.get("val") if isinstance(args[0], fx.Node) else None
    if _without_values(tensor) or tensor.dim() != 0 or tensor.is_complex() or not isinstance(written, torch.Tensor):
        return args
    number = tensor.item()
    if isinstance(number, float) and written.dtype == tensor.dtype and math.isfinite(number):
        # the shortest decimal that is the same number in the tensor's dtype (0.1, not 0.10000000149011612)
        number = next(float(f"{number:.{digits}g}") for digits in range(1, 18)
                      if torch.tensor(float(f"{number:.{digits}g}"), dtype=tensor.dtype).item() == number)  # fmt: skip
    return (*args[:position], number, *args[position + 1 :])


def _is_aten(fx_node: fx.Node) -> bool:
    return isinstance(fx_node.target, torch._ops.OpOverload) and fx_node.target.namespace == "aten"


def _copies_onto_itself(fx_node: fx.Node) -> bool:
    """aten.copy_(dst, src) where src is dst after in-place ops on it."""
    if fx_node.target is not torch.ops.aten.copy_.default or len(fx_node.args) < 2:
        return False
    source = fx_node.args[1]
    while isinstance(source, fx.Node) and isinstance(source.target, torch._ops.OpOverload) and schema_mutated(source.target) == 0:
        source = source.args[0]
    return source is fx_node.args[0]


def _dropped(fx_node: fx.Node) -> bool:
    return _is_aten(fx_node) and op_key(fx_node.target) in DROPPED


def _checks_only(graph: fx.Graph) -> set[fx.Node]:
    """The assertions export recorded (DROPPED, with no users) and the Python numbers computed only
    for them: a library's `assert lengths.max().item() <= slen` (XLM) is `item`, `le` and
    `_assert_scalar`; kept without its assertion, the `item` failed on the meta device, where the
    model compiles and trains without the check of its input."""
    checks: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        if node.op != "call_function":
            continue
        if (_dropped(node) and not node.users) or (node.users and _is_size(node) and set(node.users) <= checks):
            checks.add(node)
    return checks


def _call_key(fx_node: fx.Node) -> str:
    """Which module call made the node: nn_module_stack's innermost key, one per call."""
    stack = fx_node.meta.get("nn_module_stack") or {}
    return next(reversed(stack), "")


def integer_buffers(model: torch.nn.Module, prefix: str = "") -> dict[str, tuple[torch.nn.Module, str]]:
    """The integer (and bool) buffers of `model` and its submodules, by qualified name under
    `prefix`: (module, name)."""
    return {
        f"{path}.{name}" if path else name: (module, name)
        for path, module in model.named_modules(prefix=prefix)
        for name, buffer in module._buffers.items()
        if buffer is not None and not buffer.is_floating_point() and not buffer.is_complex()
    }


def size_buffers(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
    """The model's 0-d integer non-persistent buffers, by qualified name: (module, name)."""
    return {
        key: (module, name)
        for key, (module, name) in integer_buffers(model).items()
        if module._buffers[name].dim() == 0 and name in module._non_persistent_buffers_set
    }


@contextlib.contextmanager
def _sizes_as_constants(model: torch.nn.Module, model_file: ModelFile, written: set[str]):
    """While the block runs, the model's 0-d integer non-persistent buffers, but those named in
    `written`, read as constants of the values build_model() gives them, made afresh at each read
    (as `torch.tensor(3)` in forward is), restored after. transformers' Encodec and Mimi
    convolutions pad by such buffers (`stride`, `kernel_size`, `padding_total`); as buffers,
    torch.export traces them as inputs without values, and the first Python branch on a size
    computed from them failed (GuardOnDataDependentSymNode, for Mimi in sdpa_attention.py, far from
    the cause). As constants the sizes are numbers, and the stage code pads by them, as the model
    does at every batch size (they follow the sequence length, which a pipeline fixes, not the
    batch). Only for a trace that failed so. A constant would drop a write of forward's to the
    buffer (a step counter, `self.step += 1` or `self.step.add_(1)`): such buffers are added to
    `written` (an assignment stops the trace there), for the caller to trace again with them kept
    as buffers."""
    sizes = {key: holder for key, holder in size_buffers(model).items() if key not in written}
    values = None
    if sizes:
        values = built_values(model_file, TRACE_SEED, list(sizes))
    if not values:
        yield
        return
    held: dict[int, tuple[torch.nn.Module, type, dict[str, torch.Tensor], dict[str, property]]] = {}
    handed: list[tuple[str, torch.Tensor]] = []  # every constant read, to find those written in place
    for key, (module, name) in sizes.items():
        _, _, buffers, constants = held.setdefault(id(module), (module, type(module), {}, {}))
        buffers[name] = module._buffers[name]
        constants[name] = _constant_property(key, values[key].item(), buffers[name].dtype, handed, written)
    try:
        for module, cls, buffers, constants in held.values():
            for name in buffers:
                del module._buffers[name]
            module.__class__ = type(cls.__name__, (cls,), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                                           **constants})  # fmt: skip
        yield
    finally:
        written.update(key for key, constant in handed if constant._version > 0)
        for module, cls, buffers, _ in held.values():
            module.__class__ = cls
            module._buffers.update(buffers)


class SizeBufferAssigned(Exception):
    """forward assigned a buffer read as a constant (_sizes_as_constants): the trace stops."""


def _constant_property(
    key: str, value: int | bool, dtype: torch.dtype, handed: list[tuple[str, torch.Tensor]], written: set[str]
) -> property:
    def read(_module: torch.nn.Module) -> torch.Tensor:
        constant = torch.tensor(value, dtype=dtype)
        handed.append((key, constant))
        return constant

    def assign(_module: torch.nn.Module, _value: Any) -> None:
        written.add(key)
        raise SizeBufferAssigned(key)

    return property(read, assign)


@contextlib.contextmanager
def on_fake_device(model: torch.nn.Module, inputs: Any, device: torch.device):
    """The meta model's parameters and buffers, and the meta `inputs`, as fake tensors on `device`
    (no memory) while the block runs; yields the fake inputs. Tied tensors stay one tensor."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            return t
        if id(t) not in fakes:
            value = FakeTensor(mode, t.detach(), device)
            fakes[id(t)] = torch.nn.Parameter(value, t.requires_grad) if isinstance(t, torch.nn.Parameter) else value
        return fakes[id(t)]

    # setattr, not the tables: a module may keep its own list of them (an RNN's _flat_weights)
    saved = [
        (module, key, t)
        for module in model.modules()
        for table in (module._parameters, module._buffers)
        for key, t in table.items()
        if t is not None
    ]
    try:
        for module, key, t in saved:
            setattr(module, key, fake(t))
        yield torch.utils._pytree.tree_map_only(torch.Tensor, fake, inputs)
    finally:
        for module, key, t in saved:
            setattr(module, key, t)


def _without_values(t: torch.Tensor) -> bool:
    """A tensor made while tracing, whose values the trace did not keep."""
    return t.device.type == "meta" or isinstance(t, FakeTensor)


def _stage_device(value: Any) -> Any:
    if isinstance(value, torch.device) and value.type in ("meta", TRACE_DEVICE.type):
        return STAGE_DEVICE
    if isinstance(value, (tuple, list)):
        return type(value)(_stage_device(v) for v in value)
    return value


def _split_out_variants(graph: fx.Graph) -> None:
    """`aten.div.out(a, b, out=u)` (spectral_norm's power iteration writes its buffers so) becomes
    `u.copy_(a / b)`: the write's target is a keyword, which the IR's in-place bookkeeping
    (Node.mutates, an argument's position) cannot name, so the partitioner put the buffer's
    readers and its writer in different stages and the stages' copies of it parted. Only where
    the out tensor has the result's shape and dtype (out= would resize it otherwise)."""
    for fx_node in list(graph.nodes):
        op = fx_node.target
        if fx_node.op != "call_function" or not isinstance(op, torch._ops.OpOverload):
            continue
        written = [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        if len(written) != 1 or written[0] not in fx_node.kwargs or len(op._schema.returns) != 1:
            continue
        functional = _functional_variant(op)
        out = fx_node.kwargs[written[0]]
        result, target = fx_node.meta.get("val"), getattr(out, "meta", {}).get("val")
        if functional is None or not isinstance(out, fx.Node) or not isinstance(result, torch.Tensor) \
                or not isinstance(target, torch.Tensor) or result.shape != target.shape or result.dtype != target.dtype:
            continue  # fmt: skip
        kwargs = {k: v for k, v in fx_node.kwargs.items() if k != written[0]}
        with graph.inserting_before(fx_node):
            value = graph.call_function(functional, fx_node.args, kwargs)
            copy = graph.call_function(torch.ops.aten.copy_.default, (out, value))
        value.meta, copy.meta = dict(fx_node.meta), dict(fx_node.meta)
        fx_node.replace_all_uses_with(copy)
        name = fx_node.name
        graph.erase_node(fx_node)
        copy._rename(name)  # the stage code names the written value as the source did (`div_3`)


def _functional_variant(op: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """aten.div.Tensor for aten.div.out: the overload of the same op that takes the other
    arguments, by name and type, and writes nothing."""
    wanted = [(a.name, str(a.type)) for a in op._schema.arguments if a.alias_info is None or not a.alias_info.is_write]
    for name in op.overloadpacket.overloads():
        candidate = getattr(op.overloadpacket, name)
        if candidate._schema.is_mutable or len(candidate._schema.returns) != 1:
            continue
        if [(a.name, str(a.type)) for a in candidate._schema.arguments] == wanted:
            return candidate
    return None


def _writes(fx_node: fx.Node, value: fx.Node) -> bool:
    """Whether the op changes `value` in place."""
    if not isinstance(fx_node.target, torch._ops.OpOverload):
        return False
    index = schema_mutated(fx_node.target)
    return index is not None and index < len(fx_node.args) and fx_node.args[index] is value


def _data_write_refused(line: str, write: fx.Node) -> FtcError:
    """Forward changes a parameter or buffer through `.data` (`self.weight.data.clamp_(-c, c)`):
    torch.export takes `.data` for a constant apart from the parameter, without values on the
    meta device, so the stages could neither hold nor change the parameter."""
    op = write.target._opname
    return FtcError(
        f"{line}: forward changes a parameter's or buffer's .data in place ({op}; `self.weight.data.{op}(...)`), "
        "which torch.export takes for a constant apart from the parameter, without its values (the model is "
        "built on the meta device)",
        "compile with --frontend fx (or auto), which keeps the change on the parameter; where fx cannot trace the "
        "model (transformers 5's Gemma 3n, which clamps its AltUp coefficients so in training), move the change out "
        "of forward or write it on the parameter itself under torch.no_grad() (`self.weight.clamp_(...)`)",
    )


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def _scope(fx_node: fx.Node, code: CodeFiles, outer: int = 0) -> tuple[str, str]:
    """The original module path the node ran in (`outer` levels up) and the line of the model's
    code it ran (the innermost on its stack trace)."""
    stack = fx_node.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values() if isinstance(path, str) and not path.startswith("_")]
    paths = [""] + paths[: len(paths) - outer]
    frames = _frames(fx_node, code)
    return paths[-1], frames[-1] if frames else ""


def _frames(fx_node: fx.Node, code: CodeFiles) -> list[str]:
    """'file.py:LINE' of the frames of the model's code on the node's stack trace, outermost
    first (ftc.frontends.common.user_frames)."""
    frames = []
    for filename, line in _FRAME.findall(fx_node.meta.get("stack_trace") or ""):
        name = code.name(filename)
        if name:
            frames.append(f"{name}:{line}")
    return frames


def _outputs(structure: TreeSpec, values: list, ref_of) -> Outputs:
    """The IR outputs, from the output's pytree structure: a tensor, a flat tuple or list, or a
    flat dict (Hugging Face ModelOutputs are dicts)."""
    refs = [ref_of(value) for value in values]
    if any(ref is None for ref in refs):
        raise FtcError("the model returns a value that is not computed in forward", "return only tensors")
    flat = all(child.is_leaf() for child in structure.children()) and len(refs) == structure.num_leaves
    if structure.is_leaf() and len(refs) == 1:
        return Outputs("value", refs)
    # pytree files a NamedTuple under the type `namedtuple` with the class as its context
    named = structure.context if isinstance(structure.context, type) and issubclass(structure.context, tuple) else None
    if named is not None:
        raise named_tuple_error(named.__name__)
    container = structure.type if isinstance(structure.type, type) else None
    if flat and isinstance(structure.context, list) and container is not None and issubclass(container, dict):
        return Outputs("dict", refs, [str(key) for key in structure.context])
    if flat and container is not None and issubclass(container, (tuple, list)):
        return Outputs("list" if issubclass(container, list) else "tuple", refs)
    nested = ""
    if isinstance(structure.context, list) and len(structure.context) == len(structure.children()):
        keys = [str(key) for key, child in zip(structure.context, structure.children()) if not child.is_leaf()]
        nested = f": {', '.join(map(repr, keys))} {'is' if len(keys) == 1 else 'are'} not a tensor" if keys else ""
    raise FtcError(
        f"the model's output ({getattr(structure.type, '__name__', 'value')}) is nested or holds non-tensors{nested}",
        f"return a tensor, a flat tuple of tensors or a flat dict of tensors{HF_OUTPUTS}",
    )


# What makes a Hugging Face model return more than tensors.
HF_OUTPUTS = (
    "; a Hugging Face model returns tuples with output_hidden_states or output_attentions set, and its "
    "key/value cache, past_key_values, unless its config says use_cache=False; otherwise wrap the model in "
    "a module whose forward returns the tensors the loss needs"
)


def not_a_tensor_output(exc: BaseException) -> FtcError | None:
    """torch.export's refusal of an output that is not a tensor (transformers' DynamicCache, when
    the config leaves use_cache on), as an error that says so; None for other errors."""
    found = re.search(r"Found <class '([\w.]+)'> in output, which is not a known type", str(exc))
    if found is None:
        return None
    return FtcError(
        f"forward returns a {found.group(1).rsplit('.', 1)[-1]} ({found.group(1)}), which is not a tensor",
        f"return a tensor, a flat tuple of tensors or a flat dict of tensors{HF_OUTPUTS}",
    )
