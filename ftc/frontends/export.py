"""torch.export frontend (non-strict): for models whose Python torch.fx cannot trace, such as
code that computes with shapes (`torch.ones(t, t)` with `t = x.shape[1]`).

The exported ATen graph is lowered into the same IR: lifted parameters and buffers become
get_attr nodes under their original names, the batch dimension is symbolic (so stage code reads
sizes from its inputs), and factory calls that named the tracing device use the stage's device.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx
from torch.export.graph_signature import InputKind, OutputKind

from ftc.ir import Constant, FtcError, Graph, Node, Outputs, Ref, TorchExpr, unique_name
from ftc.runtime.model_file import ModelFile

from .common import constant_from_tensor, function_expr, ir_arg, module_table, state_table
from .fx import input_names

# The device the stage runs on; generated code binds `device` from a stage input.
STAGE_DEVICE = TorchExpr("device")


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
    model: torch.nn.Module, model_file: ModelFile, batch: tuple | dict, double_batch: tuple | dict, name: str
) -> Graph:
    fed, _ = input_names(model, batch)
    args, kwargs = ((), batch) if isinstance(batch, dict) else (batch, {})
    dynamic = _batch_dims(batch, double_batch)
    with torch.device("meta"):
        program = torch.export.export(model, args, kwargs or None, strict=False, dynamic_shapes=dynamic)
        structure = model(*args, **kwargs)
    signature = program.graph_signature
    modules = module_table(model, model_file)
    state = state_table(model)
    constants = {}

    names: dict[fx.Node, str] = {}
    taken: set[str] = set()
    nodes: list[Node] = []

    def ref_of(value: Any) -> Ref | None:
        return Ref(names[value]) if isinstance(value, fx.Node) else None

    user_inputs = iter(fed)
    specs = {spec.arg.name: spec for spec in signature.input_specs}
    for fx_node in program.graph.nodes:
        where = f"node {fx_node.name!r}"
        if fx_node.op == "placeholder":
            spec = specs[fx_node.name]
            if spec.kind == InputKind.USER_INPUT:
                input_name = next(user_inputs)
                names[fx_node] = unique_name(input_name, taken)
                nodes.append(Node(names[fx_node], "input", input_name))
                continue
            node = Node(unique_name(fx_node.name.removeprefix("p_").removeprefix("b_"), taken), "get_attr", spec.target)
            if spec.kind == InputKind.CONSTANT_TENSOR:
                data, dtype = constant_from_tensor(program.constants[spec.target], where)
                node.target = unique_name(f"const_{len(constants)}", set(constants) | set(state))
                constants[node.target] = Constant(data, dtype)
            elif spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER):
                raise FtcError(f"torch.export input {fx_node.name!r} of kind {spec.kind.name} is not supported")
        elif fx_node.op == "output":
            user_values = [
                value
                for value, out_spec in zip(fx_node.args[0], signature.output_specs)
                if out_spec.kind == OutputKind.USER_OUTPUT
            ]
            outputs = _outputs(structure, user_values, ref_of)
            continue
        elif fx_node.op == "call_function":
            module_path, source = _scope(fx_node, model_file)
            node = Node(
                unique_name(fx_node.name, taken), "call_function", "",
                module_path=module_path, module_class=modules.get(module_path, ""), source=source,
            )  # fmt: skip
            target = fx_node.target
            fx_args = tuple(_stage_device(a) for a in fx_node.args)
            fx_kwargs = {k: _stage_device(v) for k, v in fx_node.kwargs.items()}
            if target is torch.ops.aten.sym_size.int:
                node.op, node.target = "call_method", "size"
            elif isinstance(target, torch._ops.OpOverload):
                node.target = function_expr(target, fx_node.name)
                node.mutates = _mutated(target)
            elif isinstance(target, torch._ops.HigherOrderOperator):
                raise FtcError(
                    f"torch.export produced the higher-order op {target.name()} at {source or where}",
                    "ftc cannot split inside it yet; put that code in a LEAF_MODULES class",
                )
            else:
                node.target = function_expr(target, fx_node.name)
            node.args = tuple(ir_arg(a, ref_of, where) for a in fx_args)
            node.kwargs = {k: ir_arg(v, ref_of, where) for k, v in fx_kwargs.items()}
        else:
            raise FtcError(f"torch.export produced a {fx_node.op} node {fx_node.name!r}, which ftc does not lower")
        names[fx_node] = node.name
        nodes.append(node)

    return Graph(
        name=name, nodes=nodes, outputs=outputs, state=state, modules=modules,
        constants=constants, frontend="export",
    )  # fmt: skip


def _stage_device(value: Any) -> Any:
    if isinstance(value, torch.device) and value.type == "meta":
        return STAGE_DEVICE
    if isinstance(value, (tuple, list)):
        return type(value)(_stage_device(v) for v in value)
    return value


def _mutated(op: torch._ops.OpOverload) -> int | None:
    for index, argument in enumerate(op._schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            return index
    return None


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def _scope(fx_node: fx.Node, model_file: ModelFile) -> tuple[str, str]:
    stack = fx_node.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values() if isinstance(path, str) and not path.startswith("_")]
    module_path = paths[-1] if paths else ""
    source = ""
    for filename, line in _FRAME.findall(fx_node.meta.get("stack_trace") or ""):
        if filename.endswith(model_file.path.name):
            source = f"{model_file.path.name}:{line}"
    return module_path, source


def _outputs(structure: Any, values: list, ref_of) -> Outputs:
    refs = [ref_of(value) for value in values]
    if any(ref is None for ref in refs):
        raise FtcError("the model returns a value that is not computed in forward", "return only tensors")
    if isinstance(structure, torch.Tensor):
        return Outputs("value", refs)
    if isinstance(structure, dict):
        keys = [str(key) for key, value in structure.items() if value is not None]
        if len(keys) == len(refs):
            return Outputs("dict", refs, keys)
    elif isinstance(structure, (tuple, list)) and len(structure) == len(refs):
        return Outputs("tuple", refs)
    raise FtcError(
        f"the model's output ({type(structure).__name__}) is nested or holds non-tensors",
        "return a tensor, a flat tuple of tensors or a flat dict of tensors",
    )
