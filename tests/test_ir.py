"""Tests of the IR package ftc.ir: lossless JSON round trip, format check, and validation."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from ftc.ir import (
    FORMAT,
    Constant,
    Cost,
    FtcError,
    Graph,
    Node,
    OtherMeta,
    Outputs,
    Ref,
    ScalarMeta,
    SeqMeta,
    StateTensor,
    TensorMeta,
    TorchExpr,
    dumps,
    graph_from_dict,
    graph_to_dict,
    load,
    loads,
    save,
    validate,
)

# ---------------------------------------------------------------------------------------------
# Helpers


def strict_equal(a, b, path="graph") -> None:
    """Assert a and b are equal *and* of the same types all the way down.

    Plain `==` is too lenient for a round trip: True == 1, 1 == 1.0, and nan != nan. This walks
    dataclasses, containers and slices, checks exact types at every level, compares nan by
    math.isnan and keeps the sign of zero."""
    assert type(a) is type(b), f"{path}: type {type(a).__name__} != {type(b).__name__} ({a!r} vs {b!r})"
    if dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            strict_equal(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)} (order matters)"
        for key in a:
            strict_equal(key, next(k for k in b if k == key), f"{path} key {key!r}")
            strict_equal(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            strict_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, slice):
        for part in ("start", "stop", "step"):
            strict_equal(getattr(a, part), getattr(b, part), f"{path}.{part}")
    elif isinstance(a, float):
        if math.isnan(a):
            assert math.isnan(b), f"{path}: nan became {b!r}"
        else:
            assert a == b and math.copysign(1, a) == math.copysign(1, b), f"{path}: {a!r} != {b!r}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def t(shape, dtype="float32", requires_grad=False, batch_dim=None) -> TensorMeta:
    return TensorMeta(list(shape), dtype, requires_grad, batch_dim)


def rich_graph() -> Graph:
    """A small but valid two-stage graph that uses every argument kind, every Meta kind, every
    field of Cost, state of both kinds, a constant, and a dict output."""
    # Every argument kind the serializer supports, nested inside each other.
    kitchen_sink = {
        "ref": Ref("x"),
        "dtype": TorchExpr("torch.float32"),
        "tuple": (1, 2, (3,), ()),
        "list": [1, 2, [3], []],
        "list_of_tuples": [(Ref("x"), 1), ((),)],
        "tuple_of_lists": ([1], [Ref("h")]),
        "nested": {"a": {"b": [Ref("x"), {"c": (None,)}]}, "empty": {}},
        "int_key_dict": {1: "one", 2: Ref("x")},
        "slice_refs": slice(Ref("x"), None, Ref("h")),
        "slice_none": slice(None, None, None),
        "slice_ints": slice(1, -1, 2),
        "ellipsis": Ellipsis,
        "index": (Ellipsis, slice(None, 2, None), None, 0),
        "inf": float("inf"),
        "-inf": float("-inf"),
        "nan": float("nan"),
        "-0.0": -0.0,
        "float_one": 1.0,
        "int_one": 1,
        "true": True,
        "false": False,
        "zero": 0,
        "big_int": 2**70,
        "none": None,
        "str": "héllo \"world\"\n\t{ref}",
        "tag_like_str": "ref",
        "empty_str": "",
    }
    nodes = [
        Node("x", "input", "x", meta=t([4, 8], batch_dim=0)),
        Node("flag", "input", "flag", meta=ScalarMeta("bool", True)),
        Node("weight", "get_attr", "lin.weight", meta=t([8, 8], requires_grad=True)),
        Node("scale", "get_attr", "const_0", meta=t([2], "float64")),
        Node(
            "h",
            "call_module",
            "lin",
            args=(Ref("x"),),
            module_path="lin",
            module_class="torch.nn.Linear",
            source="model.py:12",
            callers=["model.py:40", "blocks/attention.py:7"],
            meta=t([4, 8], requires_grad=True, batch_dim=0),
            cost=Cost(fwd_flops=512, bwd_flops=1024, param_bytes=256, fwd_time=1.5e-6, bwd_time=3.25e-6,
                      peak_memory=4096),
            stage=0,
        ),
        Node(
            "odd",
            "call_function",
            "torch.ops.aten.odd.default",
            args=(Ref("h"), kitchen_sink, (1, 2), [1, 2], True, 1, 1.0, None, "s"),
            kwargs={"dtype": TorchExpr("torch.bfloat16"), "dim": -1, "keepdim": False,
                    "opt": float("nan"), "idx": (Ellipsis, slice(Ref("x"), None, None))},
            module_path="",
            meta=SeqMeta("tuple", [
                t([4, 8], batch_dim=0),
                SeqMeta("list", [ScalarMeta("int", 4, batch_dependent=True), OtherMeta("NoneType")]),
                SeqMeta("size", [ScalarMeta("int", 4), ScalarMeta("int", 8)]),
                ScalarMeta("float", 0.5),
                SeqMeta("tuple", []),
            ]),
            cost=Cost(fwd_time=0.1, bwd_time=0.2),
            stage=1,
        ),
        Node(
            "y",
            "call_method",
            "add_",
            args=(Ref("h"), Ref("scale")),
            kwargs={"alpha": 2},
            mutates=0,
            meta=t([4, 8], "bfloat16", batch_dim=0),
            cost=Cost(fwd_time=1e-300, bwd_time=12345.678),
            stage=1,
        ),
        Node("other", "call_function", "builtins.print", args=(Ref("y"),), meta=OtherMeta("NoneType"), stage=1),
    ]
    return Graph(
        name="rich",
        nodes=nodes,
        outputs=Outputs("dict", [Ref("y"), Ref("h")], ["logits", "hidden"]),
        state={
            "lin.weight": StateTensor("parameter", t([8, 8], requires_grad=True)),
            "lin.bias": StateTensor("parameter", t([8], requires_grad=True)),
            "running": StateTensor("buffer", t([8], "int64"), persistent=True),
            "cache": StateTensor("buffer", t([1, 8], "float16", batch_dim=0), persistent=False),
        },
        modules={"": "model.Net", "lin": "torch.nn.Linear"},
        constants={"const_0": Constant([[1.5, -2], [3, 4.0]], "float64")},
        frontend="export",
        batch_size=4,
        num_stages=2,
        stage_devices=[0, 0],
        kind_costs={"torch.nn.Linear": Cost(fwd_time=2.5e-6, bwd_time=1e-5)},
    )


def chain(num_stages: int = 0) -> Graph:
    """A valid graph: input -> parameter read -> linear -> relu, dict-free value output."""
    stage = 0 if num_stages else None
    return Graph(
        name="chain",
        nodes=[
            Node("x", "input", "x"),
            Node("w", "get_attr", "fc.weight"),
            Node("c", "get_attr", "const_0"),
            Node("fc", "call_module", "fc", args=(Ref("x"),), stage=stage),
            Node("mm", "call_function", "torch.matmul", args=(Ref("fc"), Ref("w")), stage=stage),
            Node("relu", "call_method", "relu", args=(Ref("mm"),), kwargs={"s": slice(Ref("c"), None)},
                 stage=num_stages - 1 if num_stages else None),
        ],
        outputs=Outputs("value", [Ref("relu")]),
        state={"fc.weight": StateTensor("parameter", t([2, 2], requires_grad=True))},
        modules={"": "Net", "fc": "torch.nn.Linear"},
        constants={"const_0": Constant([1], "int64")},
        num_stages=num_stages,
        stage_devices=list(range(num_stages)),
    )


def raises_naming(graph: Graph, *names: str) -> FtcError:
    """validate(graph) must raise FtcError whose message names each of `names`."""
    with pytest.raises(FtcError) as info:
        validate(graph)
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not in error message {message!r}"
    return info.value


# ---------------------------------------------------------------------------------------------
# JSON round trip


def test_rich_graph_is_valid():
    """The round-trip fixture is itself a valid IR graph (so the round trip tests real IR)."""
    validate(rich_graph())


def test_round_trip_is_structurally_lossless():
    """loads(dumps(g)) reproduces every field with identical types (tuple/list, bool/int/float,
    nan, +-inf, -0.0, Ellipsis, slices with Refs, nested dicts, every Meta kind, ...)."""
    graph = rich_graph()
    back = loads(dumps(graph))
    strict_equal(graph, back)


def test_round_trip_dataclass_equality_except_nan():
    """Plain dataclass equality holds once the nan arguments (never equal to themselves) are
    taken out on both sides."""
    graph, back = rich_graph(), loads(dumps(rich_graph()))
    odd, odd_back = graph.node("odd"), back.node("odd")
    assert math.isnan(odd_back.kwargs["opt"]) and math.isnan(odd_back.args[1]["nan"])
    for node in (odd, odd_back):
        node.kwargs["opt"] = "nan was here"
        node.args[1]["nan"] = "nan was here"
    assert back == graph


def test_round_trip_keeps_tuple_and_list_distinct():
    """Tuples come back as tuples and lists as lists, at every depth."""
    back = loads(dumps(rich_graph())).node("odd")
    sink = back.args[1]
    assert type(back.args) is tuple
    assert back.args[2] == (1, 2) and type(back.args[2]) is tuple
    assert back.args[3] == [1, 2] and type(back.args[3]) is list
    assert type(sink["tuple"]) is tuple and type(sink["tuple"][2]) is tuple and sink["tuple"][3] == ()
    assert type(sink["list"]) is list and type(sink["list"][2]) is list and sink["list"][3] == []
    assert type(sink["list_of_tuples"][0]) is tuple
    assert type(sink["tuple_of_lists"]) is tuple and type(sink["tuple_of_lists"][1]) is list


def test_round_trip_special_floats_and_scalars():
    """inf, -inf, nan, -0.0 survive; bool stays bool, int stays int, float stays float."""
    sink = loads(dumps(rich_graph())).node("odd").args[1]
    assert sink["inf"] == math.inf and sink["-inf"] == -math.inf
    assert math.isnan(sink["nan"])
    assert sink["-0.0"] == 0.0 and math.copysign(1, sink["-0.0"]) == -1
    assert sink["true"] is True and sink["false"] is False
    assert type(sink["int_one"]) is int and type(sink["float_one"]) is float and type(sink["zero"]) is int
    assert sink["big_int"] == 2**70
    assert sink["ellipsis"] is Ellipsis
    assert sink["none"] is None


def test_round_trip_slices_and_refs():
    """Slices keep Ref and None parts; Refs and TorchExprs come back as their classes."""
    back = loads(dumps(rich_graph())).node("odd")
    sink = back.args[1]
    assert sink["slice_refs"] == slice(Ref("x"), None, Ref("h"))
    assert sink["slice_none"] == slice(None, None, None)
    assert sink["slice_ints"] == slice(1, -1, 2)
    assert sink["ref"] == Ref("x") and sink["dtype"] == TorchExpr("torch.float32")
    assert back.kwargs["idx"] == (Ellipsis, slice(Ref("x"), None, None))
    assert back.refs() == ["h", "x"]


def test_round_trip_nested_dict_keeps_key_order_and_types():
    """Nested dict arguments keep their key order, and non-string keys keep their type."""
    sink = loads(dumps(rich_graph())).node("odd").args[1]
    assert list(sink) == list(rich_graph().node("odd").args[1])
    assert list(sink["int_key_dict"]) == [1, 2]
    assert sink["nested"] == {"a": {"b": [Ref("x"), {"c": (None,)}]}, "empty": {}}
    assert type(sink["nested"]["a"]["b"][1]["c"]) is tuple


def test_round_trip_metas_state_constants_outputs():
    """Every Meta kind, Cost, StateTensor (parameter, non-persistent buffer), Constant, dict
    Outputs with keys, per-node stages and stage_devices come back equal."""
    graph, back = rich_graph(), loads(dumps(rich_graph()))
    assert back.node("x").meta == TensorMeta([4, 8], "float32", False, 0)
    assert back.node("odd").meta == graph.node("odd").meta
    assert isinstance(back.node("odd").meta.items[1], SeqMeta)
    assert back.node("other").meta == OtherMeta("NoneType")
    assert back.node("flag").meta == ScalarMeta("bool", True) and back.node("flag").meta.value is True
    assert back.node("h").cost == Cost(512, 1024, 256, 1.5e-6, 3.25e-6, 4096)
    assert back.node("y").cost.fwd_time == 1e-300 and back.node("y").mutates == 0
    assert back.state["cache"] == StateTensor("buffer", TensorMeta([1, 8], "float16", False, 0), False)
    assert back.state["lin.weight"].kind == "parameter"
    assert list(back.state) == list(graph.state)
    assert back.constants == {"const_0": Constant([[1.5, -2], [3, 4.0]], "float64")}
    strict_equal(back.constants, graph.constants)
    assert back.outputs == Outputs("dict", [Ref("y"), Ref("h")], ["logits", "hidden"])
    assert [n.stage for n in back.nodes] == [None, None, None, None, 0, 1, 1, 1]
    assert back.num_stages == 2 and back.stage_devices == [0, 0]
    assert back.frontend == "export" and back.batch_size == 4
    assert back.modules == graph.modules and list(back.modules) == list(graph.modules)
    validate(back)


def test_dumps_is_a_fixed_point():
    """dumps(loads(dumps(g))) is byte for byte dumps(g), and the text is strict JSON."""
    text = dumps(rich_graph())
    assert dumps(loads(text)) == text
    # Strict JSON: no bare NaN/Infinity tokens.
    json.loads(text, parse_constant=lambda token: pytest.fail(f"non-standard JSON constant {token}"))
    assert json.loads(text)["format"] == FORMAT


def test_dict_round_trip_and_file_round_trip(tmp_path):
    """graph_to_dict/graph_from_dict and save/load agree with dumps/loads."""
    graph = rich_graph()
    strict_equal(graph_from_dict(graph_to_dict(graph)), graph)
    path = tmp_path / "g.json"
    save(graph, path)
    assert path.read_text() == dumps(graph)
    strict_equal(load(path), graph)


def test_round_trip_minimal_graph():
    """A graph with only defaults (no stages, no state, value output) round-trips too."""
    graph = Graph("tiny", [Node("x", "input", "x")], Outputs("value", [Ref("x")]))
    text = dumps(graph)
    strict_equal(loads(text), graph)
    assert dumps(loads(text)) == text


def test_an_ir_json_without_callers_reads_as_no_callers():
    """ir.json leaves `callers` out where a node has none, as every node did before the field."""
    data = graph_to_dict(rich_graph())
    assert "callers" in data["nodes"][4] and all("callers" not in node for node in data["nodes"][:4])
    del data["nodes"][4]["callers"]
    assert graph_from_dict(data).node("h").callers == []


def test_round_trip_non_finite_constant_and_scalar_meta():
    """Non-finite numbers outside arguments must also round-trip: a tensor literal such as an
    attention mask constant holding -inf, and a float ScalarMeta whose value is inf or nan.

    (The argument encoder tags non-finite floats, but Constant.data and ScalarMeta.value go
    through dataclasses.asdict untagged, and dumps uses allow_nan=False.)"""
    graph = Graph(
        "mask",
        [
            Node("x", "input", "x", meta=ScalarMeta("float", float("inf"))),
            Node("m", "get_attr", "const_0", meta=t([2])),
            Node("y", "call_function", "torch.add", args=(Ref("m"), Ref("x")), meta=ScalarMeta("float", float("nan"))),
        ],
        Outputs("value", [Ref("y")]),
        constants={"const_0": Constant([0.0, float("-inf")], "float32")},
    )
    validate(graph)
    back = loads(dumps(graph))
    strict_equal(back, graph)


def test_wrong_format_is_rejected():
    """Loading JSON whose "format" is not FORMAT raises FtcError that names the format."""
    data = json.loads(dumps(rich_graph()))
    data["format"] = "ftc-ir/999"
    with pytest.raises(FtcError) as info:
        loads(json.dumps(data))
    assert "ftc-ir/999" in str(info.value) and FORMAT in str(info.value)
    assert "format" in str(info.value)


def test_missing_format_is_rejected():
    """JSON without a "format" key is rejected with an FtcError about the format."""
    data = json.loads(dumps(rich_graph()))
    del data["format"]
    with pytest.raises(FtcError, match="format"):
        graph_from_dict(data)


def test_unknown_argument_tag_is_rejected():
    """A tagged argument with an unknown tag raises FtcError naming the tag."""
    data = json.loads(dumps(chain()))
    data["nodes"][3]["args"] = [{"mystery": 1}]
    with pytest.raises(FtcError, match="mystery"):
        graph_from_dict(data)


def test_unserializable_argument_is_rejected():
    """An argument of a type the IR does not support raises FtcError naming its type."""
    graph = chain()
    graph.nodes[3].args = (object(),)
    with pytest.raises(FtcError, match="object"):
        dumps(graph)


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("num_stages", [0, 1, 3])
def test_valid_graph_passes(num_stages):
    """A well-formed graph validates, unstaged and staged."""
    validate(chain(num_stages))


def test_duplicate_node_name():
    graph = chain()
    graph.nodes.append(Node("mm", "call_function", "torch.neg", args=(Ref("relu"),)))
    raises_naming(graph, "'mm'")


def test_unknown_op():
    graph = chain()
    graph.nodes[4].op = "call_magic"
    raises_naming(graph, "'mm'", "call_magic")


def test_reference_to_unknown_value():
    graph = chain()
    graph.nodes[4].args = (Ref("fc"), Ref("ghost"))
    raises_naming(graph, "'mm'", "ghost")


def test_reference_to_unknown_value_nested_in_kwargs_slice():
    """References hidden inside a slice in a nested kwarg are resolved too."""
    graph = chain()
    graph.nodes[5].kwargs = {"idx": {"k": [(Ellipsis, slice(None, Ref("phantom")))]}}
    raises_naming(graph, "'relu'", "phantom")


def test_reference_to_later_value():
    """Reading a value defined later in program order (no cycle) names the reader and value."""
    graph = chain()
    graph.nodes[3].args = (Ref("x"), Ref("relu"))  # fc reads relu; relu does not depend on fc...
    graph.nodes[4].args = (Ref("x"), Ref("w"))  # ...once mm stops reading fc
    error = raises_naming(graph, "'fc'", "'relu'")
    assert "later" in str(error) or "order" in str(error)


def test_cycle_between_two_nodes():
    """fc reads relu and relu (through mm) reads fc: the error names the nodes on the cycle."""
    graph = chain()
    graph.nodes[3].args = (Ref("relu"),)
    raises_naming(graph, "fc", "mm", "relu")


def test_self_reference():
    """A node that reads its own value is a cycle (or forward reference) that names it."""
    graph = chain()
    graph.nodes[4].args = (Ref("mm"),)
    raises_naming(graph, "mm")


def test_get_attr_target_not_in_state_or_constants():
    graph = chain()
    graph.nodes[1].target = "fc.missing"
    raises_naming(graph, "'w'", "fc.missing")


def test_get_attr_target_naming_a_module():
    """A module name is not a tensor, so get_attr cannot read it."""
    graph = chain()
    graph.nodes[1].target = "fc"
    raises_naming(graph, "'w'", "'fc'")


def test_call_module_target_not_in_modules():
    graph = chain()
    graph.nodes[3].target = "encoder.fc"
    raises_naming(graph, "'fc'", "encoder.fc")


def test_output_refers_to_unknown_value():
    graph = chain()
    graph.outputs = Outputs("tuple", [Ref("relu"), Ref("nowhere")])
    raises_naming(graph, "nowhere", "outputs")


def test_dict_output_key_count_mismatch():
    """A dict output must have one key per value (the message is about the outputs' keys)."""
    graph = chain()
    graph.outputs = Outputs("dict", [Ref("relu"), Ref("mm")], ["logits"])
    error = raises_naming(graph, "outputs")
    assert "key" in str(error) and "dict" in str(error)
    graph.outputs = Outputs("dict", [Ref("relu")], ["logits", "extra"])
    raises_naming(graph, "outputs")
    graph.outputs = Outputs("dict", [Ref("relu"), Ref("mm")], ["logits", "hidden"])
    validate(graph)


def test_compute_node_without_stage():
    graph = chain(num_stages=2)
    graph.nodes[4].stage = None
    raises_naming(graph, "'mm'", "None")


@pytest.mark.parametrize("stage", [2, 7, -1])
def test_compute_node_stage_out_of_range(stage):
    graph = chain(num_stages=2)
    graph.nodes[5].stage = stage
    raises_naming(graph, "'relu'", str(stage))


def test_stages_not_checked_when_unstaged():
    """With num_stages == 0 stages are not assigned yet, so stage None (or any value) is fine."""
    graph = chain(num_stages=0)
    graph.nodes[4].stage = None
    validate(graph)


def test_non_compute_nodes_need_no_stage():
    """Inputs and get_attr nodes may keep stage None in a staged graph."""
    graph = chain(num_stages=2)
    assert all(n.stage is None for n in graph.nodes if not n.is_compute)
    validate(graph)


@pytest.mark.parametrize("devices", [[0], [0, 1, 2], []])
def test_stage_devices_length_mismatch(devices):
    graph = chain(num_stages=2)
    graph.stage_devices = devices
    raises_naming(graph, f"{len(devices)} stage devices", "2 stages")


def test_stage_devices_may_share_a_device():
    """Several stages on one device is allowed."""
    graph = chain(num_stages=3)
    graph.stage_devices = [0, 0, 0]
    validate(graph)
