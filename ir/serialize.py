"""Lossless JSON round trip of the IR.

Arguments are encoded so that every JSON object is a tagged value: {"ref": name},
{"tuple": [...]}, {"slice": [start, stop, step]}, {"torch": "torch.float32"}, {"float": "inf"},
{"ellipsis": true}, {"dict": [[key, value], ...]}. JSON arrays are Python lists, and plain JSON
scalars are themselves, so tuples stay tuples and keys keep their order.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

from .errors import FtcError
from .graph import (
    FORMAT,
    Constant,
    Cost,
    Graph,
    Meta,
    Node,
    OtherMeta,
    Outputs,
    Ref,
    ScalarMeta,
    SeqMeta,
    StateTensor,
    TensorMeta,
    TorchExpr,
)


def encode_arg(arg: Any) -> Any:
    if isinstance(arg, Ref):
        return {"ref": arg.name}
    if isinstance(arg, TorchExpr):
        return {"torch": arg.expr}
    if arg is Ellipsis:
        return {"ellipsis": True}
    if isinstance(arg, float) and not math.isfinite(arg):
        return {"float": repr(arg)}
    if isinstance(arg, tuple):
        return {"tuple": [encode_arg(item) for item in arg]}
    if isinstance(arg, list):
        return [encode_arg(item) for item in arg]
    if isinstance(arg, dict):
        return {"dict": [[key, encode_arg(value)] for key, value in arg.items()]}
    if isinstance(arg, slice):
        return {"slice": [encode_arg(arg.start), encode_arg(arg.stop), encode_arg(arg.step)]}
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return arg
    raise FtcError(f"cannot serialize argument {arg!r} of type {type(arg).__name__}")


def decode_arg(data: Any) -> Any:
    if isinstance(data, list):
        return [decode_arg(item) for item in data]
    if not isinstance(data, dict):
        return data
    (tag, value), = data.items()
    if tag == "ref":
        return Ref(value)
    if tag == "torch":
        return TorchExpr(value)
    if tag == "ellipsis":
        return Ellipsis
    if tag == "float":
        return float(value)
    if tag == "tuple":
        return tuple(decode_arg(item) for item in value)
    if tag == "dict":
        return {key: decode_arg(item) for key, item in value}
    if tag == "slice":
        return slice(*(decode_arg(part) for part in value))
    raise FtcError(f"unknown argument tag {tag!r} in IR JSON")


def encode_meta(meta: Meta | None) -> Any:
    if meta is None:
        return None
    if isinstance(meta, TensorMeta):
        return {"tensor": tensor_meta_to_dict(meta)}
    if isinstance(meta, ScalarMeta):
        return {"scalar": {**asdict(meta), "value": encode_arg(meta.value)}}
    if isinstance(meta, SeqMeta):
        return {"seq": {"type": meta.type, "items": [encode_meta(item) for item in meta.items]}}
    return {"other": meta.type}


def tensor_meta_to_dict(meta: TensorMeta) -> dict:
    """Without other_batch_dims and unbatched_dims where they are empty, as almost everywhere:
    IR written before they existed reads the same."""
    data = asdict(meta)
    for key in ("other_batch_dims", "unbatched_dims"):
        if not data[key]:
            del data[key]
    return data


def decode_meta(data: Any) -> Meta | None:
    if data is None:
        return None
    (tag, value), = data.items()
    if tag == "tensor":
        return TensorMeta(**value)
    if tag == "scalar":
        return ScalarMeta(**{**value, "value": decode_arg(value["value"])})
    if tag == "seq":
        return SeqMeta(value["type"], [decode_meta(item) for item in value["items"]])
    if tag == "other":
        return OtherMeta(value)
    raise FtcError(f"unknown metadata tag {tag!r} in IR JSON")


def node_to_dict(node: Node) -> dict:
    return {
        "name": node.name,
        "op": node.op,
        "target": node.target,
        "args": [encode_arg(arg) for arg in node.args],
        "kwargs": {key: encode_arg(value) for key, value in node.kwargs.items()},
        "module_path": node.module_path,
        "module_class": node.module_class,
        "source": node.source,
        # callers and updates only where there are some, which keeps ir.json short
        **({"callers": node.callers} if node.callers else {}),
        "mutates": node.mutates,
        **({"updates": node.updates} if node.updates else {}),
        "label": node.label,
        "grad_enabled": node.grad_enabled,
        "meta": encode_meta(node.meta),
        "cost": asdict(node.cost),
        "stage": node.stage,
    }


def node_from_dict(data: dict) -> Node:
    return Node(
        name=data["name"],
        op=data["op"],
        target=data["target"],
        args=tuple(decode_arg(arg) for arg in data["args"]),
        kwargs={key: decode_arg(value) for key, value in data["kwargs"].items()},
        module_path=data["module_path"],
        module_class=data["module_class"],
        source=data["source"],
        callers=list(data.get("callers", [])),
        mutates=data["mutates"],
        updates=list(data.get("updates", [])),
        label=data["label"],
        grad_enabled=data["grad_enabled"],
        meta=decode_meta(data["meta"]),
        cost=Cost(**data["cost"]),
        stage=data["stage"],
    )


def graph_to_dict(graph: Graph) -> dict:
    return (
        {
            "format": FORMAT,
            "name": graph.name,
            "frontend": graph.frontend,
            "batch_size": graph.batch_size,
            "num_stages": graph.num_stages,
            "stage_devices": graph.stage_devices,
            "modules": graph.modules,
            "state": {
                name: {"kind": t.kind, "meta": tensor_meta_to_dict(t.meta), "persistent": t.persistent}
                | ({"alias_of": t.alias_of} if t.alias_of is not None else {})
                for name, t in graph.state.items()
            },
            "constants": {name: {"data": encode_arg(c.data), "dtype": c.dtype} for name, c in graph.constants.items()},
            "nodes": [node_to_dict(node) for node in graph.nodes],
            "stage_cost": asdict(graph.stage_cost),
            "loss_cost": asdict(graph.loss_cost) if graph.loss_cost is not None else None,
            "outputs": {
                "kind": graph.outputs.kind,
                "values": [ref.name for ref in graph.outputs.values],
                "keys": graph.outputs.keys,
            },
        }
        | ({"kind_costs": {kind: asdict(cost) for kind, cost in graph.kind_costs.items()}} if graph.kind_costs else {})
        | ({"training_branches": graph.training_branches} if graph.training_branches else {})
        | ({"batch_range": list(graph.batch_range)} if graph.batch_range is not None else {})
        | ({"trace_notes": graph.trace_notes} if graph.trace_notes else {})
    )


def graph_from_dict(data: dict) -> Graph:
    if data.get("format") != FORMAT:
        raise FtcError(f"IR format {data.get('format')!r} is not {FORMAT!r}; recompile the model with this ftc")
    outputs = data["outputs"]
    return Graph(
        name=data["name"],
        frontend=data["frontend"],
        batch_size=data["batch_size"],
        num_stages=data["num_stages"],
        stage_devices=data["stage_devices"],
        modules=data["modules"],
        state={
            name: StateTensor(t["kind"], TensorMeta(**t["meta"]), t["persistent"], t.get("alias_of"))
            for name, t in data["state"].items()
        },
        constants={name: Constant(decode_arg(c["data"]), c["dtype"]) for name, c in data["constants"].items()},
        nodes=[node_from_dict(node) for node in data["nodes"]],
        # IR written before profiles priced stage calls and the loss lacks both: it had neither.
        stage_cost=Cost(**data.get("stage_cost", {})),
        loss_cost=Cost(**data["loss_cost"]) if data.get("loss_cost") is not None else None,
        kind_costs={kind: Cost(**cost) for kind, cost in data.get("kind_costs", {}).items()},
        outputs=Outputs(outputs["kind"], [Ref(name) for name in outputs["values"]], outputs["keys"]),
        training_branches=data.get("training_branches", []),
        batch_range=tuple(data["batch_range"]) if data.get("batch_range") is not None else None,
        trace_notes=data.get("trace_notes", []),
    )


def dumps(graph: Graph) -> str:
    return json.dumps(graph_to_dict(graph), indent=1, allow_nan=False) + "\n"


def loads(text: str) -> Graph:
    return graph_from_dict(strict_json(text))


def strict_json(text: str) -> Any:
    """json.loads, except that an object with a key twice is a ValueError naming the key: these
    files are edited by hand, and json.loads would silently keep the last value."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice in one object")
        seen[key] = value
    return seen


def save(graph: Graph, path) -> None:
    with open(path, "w") as f:
        f.write(dumps(graph))


def load(path) -> Graph:
    with open(path) as f:
        return loads(f.read())
