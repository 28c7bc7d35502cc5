"""ftc.ir: the pipeline IR (data model, JSON round trip, validation). Depends on nothing of ours."""

from .errors import FtcError
from .graph import (
    COMPUTE_OPS,
    FORMAT,
    OPS,
    Arg,
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
    arg_refs,
    map_refs,
    meta_nbytes,
    meta_tensors,
    unique_name,
)
from .serialize import dumps, graph_from_dict, graph_to_dict, load, loads, save, strict_json
from .validate import dataflow, validate

__all__ = [
    "COMPUTE_OPS", "FORMAT", "OPS", "Arg", "Constant", "Cost", "FtcError", "Graph", "Meta", "Node",
    "OtherMeta", "Outputs", "Ref", "ScalarMeta", "SeqMeta", "StateTensor", "TensorMeta",
    "TorchExpr", "arg_refs", "dataflow", "dumps", "graph_from_dict", "graph_to_dict", "load",
    "loads", "map_refs", "meta_nbytes", "meta_tensors", "save", "strict_json", "unique_name", "validate",
]  # fmt: skip
