"""ATen calls as the torch code people write.

torch.export records ATen overloads (`aten.add.Tensor`, `aten.view.default`,
`aten.scaled_dot_product_attention.default`). Stage code reads better, and stays editable, when
it says `a + b`, `x.view(batch, 16, -1)`, `F.scaled_dot_product_attention(q, k, v)` or calls the
nn module the op came from (`self.ln_1(x)`). This module maps the common ops to those spellings;
any op it does not know, or whose arguments the spelling could not express exactly, stays the
ATen call, which is always correct.

Why a hand-written table: torch has no public map from ATen overloads back to the Python API
(the decompositions go the other way), and each entry must be checked against the overload's
schema, argument by argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from ftc.ir import TorchExpr

from .common import STAGE_TRAINING

# aten.slice's "to the end" is the largest int64
_END = 2**63 - 1


@dataclass
class Call:
    """One IR operation: op is "call_function", "call_method" or "call_module"."""

    op: str
    target: str
    args: tuple
    kwargs: dict = field(default_factory=dict)


# Assertions torch.export records about metadata it already checked while tracing; without users
# they only cost time, and their device argument names the tracing device.
DROPPED = {"_assert_tensor_metadata.default", "_assert_scalar.default", "sym_constrain_range_for_size.default"}


def op_key(op: torch._ops.OpOverload) -> str:
    """'add.Tensor' for aten.add.Tensor."""
    return f"{op._schema.name.split('::')[-1]}.{op._overloadname}"


def bind(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The op's arguments by schema name, defaults filled in."""
    bound = {}
    for index, argument in enumerate(op._schema.arguments):
        if index < len(args) and not argument.kwarg_only:
            bound[argument.name] = args[index]
        elif argument.name in kwargs:
            bound[argument.name] = kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
        else:
            bound[argument.name] = None
    return bound


def _unless(a: dict, **defaults) -> dict:
    """Keyword arguments for the values that differ from torch's defaults."""
    return {name: a[name] for name, default in defaults.items() if not _equal(a[name], default)}


def _equal(value: Any, default: Any) -> bool:
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        return len(value) == len(default) and all(_equal(v, d) for v, d in zip(value, default))
    return type(value) is type(default) and value == default


def _factory(a: dict) -> dict:
    """dtype/device/... keywords of a factory op, minus those that say nothing."""
    kwargs = {}
    if a.get("dtype") is not None:
        kwargs["dtype"] = a["dtype"]
    if a.get("layout") not in (None, torch.strided):
        kwargs["layout"] = a["layout"]
    if a.get("device") is not None:
        kwargs["device"] = a["device"]
    if a.get("pin_memory"):
        kwargs["pin_memory"] = True
    return kwargs


def _function(target: str, *names: str, **defaults) -> Callable[[dict], Call]:
    return lambda a: Call("call_function", target, tuple(a[n] for n in names), _unless(a, **defaults))


def _method(target: str, *names: str, **defaults) -> Callable[[dict], Call]:
    return lambda a: Call("call_method", target, tuple(a[n] for n in names), _unless(a, **defaults))


def _spread(target: str, sizes: str) -> Callable[[dict], Call]:
    """x.view(a, b, c) for view(x, [a, b, c]); x.view([]) for a 0-dim result."""
    return lambda a: Call("call_method", target, (a["self"], *a[sizes]) if a[sizes] else (a["self"], []))


def _operator(name: str) -> Callable[[dict], Call | None]:
    def lower(a: dict) -> Call | None:
        if not _equal(a.get("alpha", 1), 1):
            return None
        return Call("call_function", f"operator.{name}", (a["self"], a["other"]))

    return lower


def _rsub(a: dict) -> Call | None:
    if not _equal(a["alpha"], 1):
        return None
    return Call("call_function", "operator.sub", (a["other"], a["self"]))


def _at_dim(source: Any, dim: int, item: Any) -> Call:
    """source[..., item, :] with `item` at dimension `dim`: `x[:, 1:]`, `x[..., 0, :]`."""
    index = (*(slice(None),) * dim, item) if dim >= 0 else (Ellipsis, item, *(slice(None),) * (-dim - 1))
    return Call("call_function", "operator.getitem", (source, index[0] if len(index) == 1 else index))


def _slice(a: dict) -> Call:
    start = None if _equal(a["start"], 0) else a["start"]
    end = None if _equal(a["end"], _END) else a["end"]
    step = None if _equal(a["step"], 1) else a["step"]
    return _at_dim(a["self"], a["dim"], slice(start, end, step))


def _select(a: dict) -> Call:
    return _at_dim(a["self"], a["dim"], a["index"])


def _advanced_index(a: dict) -> Call:
    index = tuple(slice(None) if i is None else i for i in a["indices"])
    return Call("call_function", "operator.getitem", (a["self"], index))


def _reduce(target: str) -> Callable[[dict], Call]:
    def lower(a: dict) -> Call:
        dims = a.get("dim")
        kwargs = _unless(a, keepdim=False) if "keepdim" in a else {}
        if dims is None:  # all dimensions: x.sum(), or x.sum(None, keepdim=True)
            args = (a["self"], None) if kwargs else (a["self"],)
        else:
            args = (a["self"], dims[0] if len(dims) == 1 else tuple(dims))
        if a.get("dtype") is not None:
            kwargs["dtype"] = a["dtype"]
        return Call("call_method", target, args, kwargs)

    return lower


def _spread_of(target: str) -> Callable[[dict], Call]:
    """x.var(0, unbiased=False), x.std(correction=0): var and std as _reduce spells the dims,
    with the estimator's correction, as the overload gives it, kept when it is not Bessel's."""

    def lower(a: dict) -> Call:
        call = _reduce(target)(a)
        if "unbiased" in a:
            call.kwargs.update(_unless(a, unbiased=True))
        elif a["correction"] is not None and not _equal(a["correction"], 1):
            call.kwargs["correction"] = a["correction"]
        return call

    return lower


def _softmax(target: str) -> Callable[[dict], Call | None]:
    def lower(a: dict) -> Call | None:
        if a.get("half_to_float"):
            return None
        kwargs = {"dtype": a["dtype"]} if a.get("dtype") is not None else {}
        return Call("call_function", target, (a["self"], a["dim"]), kwargs)

    return lower


def _embedding(a: dict) -> Call:
    kwargs = {}
    if not _equal(a["padding_idx"], -1):
        kwargs["padding_idx"] = a["padding_idx"]
    kwargs.update(_unless(a, scale_grad_by_freq=False, sparse=False))
    return Call("call_function", "F.embedding", (a["indices"], a["weight"]), kwargs)


def _layer_norm(a: dict) -> Call:
    return Call(
        "call_function",
        "F.layer_norm",
        (a["input"], a["normalized_shape"]),
        _unless(a, weight=None, bias=None, eps=1e-5),
    )


def _to(a: dict) -> Call | None:
    """x.to(...) for to.dtype, to.device and to.dtype_layout (whose device the frontend has
    already replaced by the stage's)."""
    if a.get("layout") not in (None, torch.strided) or a.get("pin_memory"):
        return None
    positional = "device" in a and "layout" not in a  # to.device(self, device, dtype, ...)
    args = (a["self"], a["device"]) if positional else (a["self"],)
    kwargs = {}
    if a.get("dtype") is not None:
        kwargs["dtype"] = a["dtype"]
    if not positional and a.get("device") is not None:
        kwargs["device"] = a["device"]
    kwargs.update(_unless(a, non_blocking=False, copy=False))
    if a.get("memory_format") is not None:
        kwargs["memory_format"] = a["memory_format"]
    return Call("call_method", "to", args, kwargs)


def _factory_call(target: str, *names: str) -> Callable[[dict], Call]:
    return lambda a: Call("call_function", target, tuple(a[n] for n in names), _factory(a))


def _randint(*names: str) -> Callable[[dict], Call]:
    # the schema's default dtype is long as the enum's integer (4); a traced call passes the torch object
    def lower(a: dict) -> Call:
        kwargs = _factory({**a, "dtype": None} if a["dtype"] in (4, torch.int64) else a)
        return Call("call_function", "torch.randint", tuple(a[n] for n in names), kwargs)

    return lower


def _new_factory(target: str, *names: str) -> Callable[[dict], Call]:
    return lambda a: Call("call_method", target, tuple(a[n] for n in names), _factory(a))


def _like(target: str, *names: str) -> Callable[[dict], Call]:
    def lower(a: dict) -> Call:
        kwargs = _factory(a)
        if a.get("memory_format") is not None:
            kwargs["memory_format"] = a["memory_format"]
        return Call("call_function", target, tuple(a[n] for n in names), kwargs)

    return lower


def _contiguous(a: dict) -> Call | None:
    # the schema's default is the enum's integer (0); a traced call passes the torch object
    if a["memory_format"] not in (0, torch.contiguous_format):
        return None
    return Call("call_method", "contiguous", (a["self"],))


def _clone(a: dict) -> Call:
    kwargs = {"memory_format": a["memory_format"]} if a["memory_format"] is not None else {}
    return Call("call_method", "clone", (a["self"],), kwargs)


def _dropout(a: dict) -> Call:
    # Traced in training mode, `training=True` stands for the model's `self.training` (HF's
    # `F.dropout(x, p, training=self.training)`): the stage follows its own train()/eval().
    return Call("call_function", "F.dropout", (a["input"],), {"p": a["p"], "training": _traced_training(a["train"])})


def _attention(a: dict) -> Call:
    """F.scaled_dot_product_attention; attention code passes its dropout probability only when
    training (`dropout_p=self.dropout if self.training else 0.0` in torch.nn and HF), so a traced
    probability becomes that expression again."""
    call = _function(
        "F.scaled_dot_product_attention", "query", "key", "value",
        attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
    )(a)  # fmt: skip
    dropout = call.kwargs.get("dropout_p")
    if isinstance(dropout, (int, float)) and dropout > 0:
        call.kwargs["dropout_p"] = TorchExpr(f"{float(dropout)!r} if self.training else 0.0")
    return call


def _traced_training(flag: Any) -> Any:
    """A training flag the trace (in training mode) saw as True, as the stage's own
    `self.training`, so that the stage follows its train()/eval() as the layer did."""
    return STAGE_TRAINING if flag is True else flag


def _batch_norm(a: dict) -> Call:
    # Without running statistics the layer normalizes by the batch in eval mode too.
    training = a["training"] if a["running_mean"] is None else _traced_training(a["training"])
    names = ("input", "running_mean", "running_var", "weight", "bias")
    return Call("call_function", "F.batch_norm", (*(a[n] for n in names), training, a["momentum"], a["eps"]))


def _instance_norm(a: dict) -> Call:
    # use_input_stats is `self.training or not self.track_running_stats` in torch.nn.
    stats = a["use_input_stats"] if a["running_mean"] is None else _traced_training(a["use_input_stats"])
    a = {**a, "use_input_stats": stats}
    return _function("F.instance_norm", "input", running_mean=None, running_var=None, weight=None, bias=None,
                     use_input_stats=True, momentum=0.1, eps=1e-5)(a)  # fmt: skip


def _recurrent(target: str) -> Callable[[dict], Call]:
    """torch.gru, torch.lstm, ...: the op's own binding, its flat weight list spelled out, and
    the dropout between layers following the stage's train()/eval()."""
    flags = ("has_biases", "num_layers", "dropout", "train", "bidirectional", "batch_first")
    return lambda a: Call(
        "call_function", target, (a["input"], a["hx"], a["params"]),
        {**{n: a[n] for n in flags}, "train": _traced_training(a["train"])},
    )  # fmt: skip


def _squeeze_dims(a: dict) -> Call:
    return Call("call_method", "squeeze", (a["self"], tuple(a["dim"])))


def _pool(target: str, **defaults) -> Callable[[dict], Call]:
    """F.max_pool2d(x, kernel, stride=...); ATen's empty stride means "the kernel size", as None does."""
    return lambda a: Call(
        "call_function",
        target,
        (a["self"], a["kernel_size"]),
        {"stride": a["stride"] or None, **_unless(a, **defaults)},
    )


# ATen's integer reduction (at::Reduction) as torch.nn.functional's string
REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}


def _loss(target: str, *names: str, **defaults) -> Callable[[dict], Call | None]:
    """F.cross_entropy(x, y, ...) and the other losses: ATen's `reduction` is an integer enum,
    F's a string; the other arguments keep their names (HF computes a model's loss this way
    when it is given `labels`)."""

    def lower(a: dict) -> Call | None:
        if a["reduction"] not in REDUCTIONS:
            return None
        return _function(target, *names, **defaults)({**a, "reduction": REDUCTIONS[a["reduction"]]})

    return lower


def _numpy_t(a: dict) -> Call | None:
    """x.t() for `x.T` (aten.numpy_T, all dimensions reversed) where x has at most 2."""
    x = a["self"]
    value = x.meta.get("val") if isinstance(x, fx.Node) else x
    if not isinstance(value, torch.Tensor) or value.dim() > 2:
        return None
    return Call("call_method", "t", (x,))


# aten.grid_sampler's integer modes, as F.grid_sample names them
_GRID_MODES = {0: "bilinear", 1: "nearest", 2: "bicubic"}
_GRID_PADDINGS = {0: "zeros", 1: "border", 2: "reflection"}


def _grid_sample(a: dict) -> Call | None:
    mode, padding = a["interpolation_mode"], a["padding_mode"]
    if mode not in _GRID_MODES or padding not in _GRID_PADDINGS:
        return None
    kwargs = {"mode": _GRID_MODES[mode], "padding_mode": _GRID_PADDINGS[padding], "align_corners": a["align_corners"]}
    return Call("call_function", "F.grid_sample", (a["input"], a["grid"]), kwargs)


def _index_put_(a: dict) -> Call | None:
    """`x[mask] = value`, as the model wrote it (export records an index assignment as
    index_put_, in place, its indices with None for a `:`); with accumulate=True
    `x.index_put_((i,), v, accumulate=True)`, where no index is None (Tensor.index_put_ takes
    no None). An index of 0 dimensions stays the ATen call: Python reads `x[t]` with a 0-dim
    tensor t as an integer (or a bool) index, not as index_put_'s."""
    indices = list(a["indices"])
    if a["accumulate"] is not False:
        if any(i is None for i in indices):
            return None
        return Call("call_method", "index_put_", (a["self"], indices, a["values"]), {"accumulate": a["accumulate"]})
    if all(i is None for i in indices) or any(i is not None and _dim(i) in (None, 0) for i in indices):
        return None
    while indices[-1] is None:  # a trailing `:` says nothing
        indices.pop()
    index = tuple(slice(None) if i is None else i for i in indices)
    return Call("call_function", "operator.setitem", (a["self"], index[0] if len(index) == 1 else index, a["values"]))


def _dim(value: Any) -> int | None:
    """The number of dimensions of a tensor argument (a graph node's traced value), or None."""
    value = value.meta.get("val") if isinstance(value, fx.Node) else value
    return value.dim() if isinstance(value, torch.Tensor) else None


def _unary(target: str) -> Callable[[dict], Call]:
    return lambda a: Call("call_function", target, (a["self"],))


def _listed(target: str, tensors: str, *names: str, **defaults) -> Callable[[dict], Call]:
    """torch.einsum(eq, a, b), torch.broadcast_tensors(a, b): the op's tensor list spread into
    the function's arguments, after the arguments `names`."""
    return lambda a: Call("call_function", target, (*(a[n] for n in names), *a[tensors]), _unless(a, **defaults))


# aten.upsample_* overloads as F.interpolate's mode, and whether the op takes align_corners
_INTERPOLATIONS = {
    "upsample_nearest1d.vec": ("nearest", False), "upsample_nearest2d.vec": ("nearest", False),
    "upsample_nearest3d.vec": ("nearest", False), "_upsample_nearest_exact1d.vec": ("nearest-exact", False),
    "_upsample_nearest_exact2d.vec": ("nearest-exact", False), "_upsample_nearest_exact3d.vec": ("nearest-exact", False),
    "upsample_linear1d.vec": ("linear", True), "upsample_bilinear2d.vec": ("bilinear", True),
    "upsample_bicubic2d.vec": ("bicubic", True), "upsample_trilinear3d.vec": ("trilinear", True),
}  # fmt: skip


def _interpolate(mode: str, corners: bool) -> Callable[[dict], Call | None]:
    """F.interpolate(x, size=..., mode=...) or (x, scale_factor=[...], mode=...): F.interpolate
    passes the op exactly one of the two (without recompute_scale_factor, the factors as given)."""

    def lower(a: dict) -> Call | None:
        size, factors = a["output_size"], a["scale_factors"]
        if (size is None) == (factors is None):
            return None
        kwargs = {"size": size} if size is not None else {"scale_factor": factors}
        kwargs["mode"] = mode
        if corners:
            kwargs["align_corners"] = a["align_corners"]
        return Call("call_function", "F.interpolate", (a["input"],), kwargs)

    return lower


# ATen op -> Python operator, for both the .Tensor and the .Scalar overload
OPERATORS = {
    "add": "add", "sub": "sub", "mul": "mul", "div": "truediv",
    "eq": "eq", "ne": "ne", "lt": "lt", "le": "le", "gt": "gt", "ge": "ge",
    "__and__": "and_", "__or__": "or_", "__xor__": "xor",
    "bitwise_and": "and_", "bitwise_or": "or_", "bitwise_xor": "xor", "remainder": "mod",
}  # fmt: skip
UNARY_FUNCTIONS = (
    "tanh", "sigmoid", "exp", "log", "sqrt", "rsqrt", "abs", "sin", "cos", "erf", "floor", "ceil",
    "logical_not", "isnan", "isinf", "sign", "square", "reciprocal", "log1p", "expm1", "log2", "log10",
    "exp2", "tan", "atan", "asin", "acos", "sinh", "cosh", "trunc", "frac", "round", "erfc", "erfinv",
    "lgamma", "digamma", "isfinite", "sgn",
)  # fmt: skip

LOWERINGS: dict[str, Callable[[dict], Call | None]] = {
    **{f"{name}.{overload}": _operator(op) for name, op in OPERATORS.items() for overload in ("Tensor", "Scalar")},
    "multiply.Tensor": _operator("mul"),  # torch.multiply, the alias ATen keeps as its own op
    "multiply.Scalar": _operator("mul"),
    "pow.Tensor_Scalar": lambda a: Call("call_function", "operator.pow", (a["self"], a["exponent"])),
    "pow.Tensor_Tensor": lambda a: Call("call_function", "operator.pow", (a["self"], a["exponent"])),
    "pow.Scalar": lambda a: Call("call_function", "operator.pow", (a["self"], a["exponent"])),
    "div.Tensor_mode": _function("torch.div", "self", "other", rounding_mode=None),
    "rsub.Scalar": _rsub,
    "rsub.Tensor": _rsub,
    "neg.default": _unary("operator.neg"),
    "bitwise_not.default": _unary("operator.invert"),
    "matmul.default": lambda a: Call("call_function", "operator.matmul", (a["self"], a["other"])),
    "mm.default": lambda a: Call("call_function", "operator.matmul", (a["self"], a["mat2"])),
    "bmm.default": lambda a: Call("call_function", "operator.matmul", (a["self"], a["mat2"])),
    "addmm.default": _function("torch.addmm", "self", "mat1", "mat2", beta=1, alpha=1),
    "baddbmm.default": _function("torch.baddbmm", "self", "batch1", "batch2", beta=1, alpha=1),
    "linear.default": lambda a: Call(
        "call_function", "F.linear", (a["input"], a["weight"]) + (() if a["bias"] is None else (a["bias"],))
    ),
    **{f"{name}.default": _unary(f"torch.{name}") for name in UNARY_FUNCTIONS},
    "relu.default": _unary("F.relu"),
    "silu.default": _unary("F.silu"),
    "hardswish.default": _unary("F.hardswish"),
    "hardsigmoid.default": _unary("F.hardsigmoid"),
    "view_as_complex.default": _unary("torch.view_as_complex"),
    "view_as_real.default": _unary("torch.view_as_real"),
    "type_as.default": _method("type_as", "self", "other"),
    "unflatten.int": _method("unflatten", "self", "dim", "sizes"),
    "gelu.default": _function("F.gelu", "self", approximate="none"),
    "leaky_relu.default": _function("F.leaky_relu", "self", "negative_slope"),
    "maximum.default": _function("torch.maximum", "self", "other"),
    "minimum.default": _function("torch.minimum", "self", "other"),
    "argmax.default": _function("torch.argmax", "self", dim=None, keepdim=False),
    "argmin.default": _function("torch.argmin", "self", dim=None, keepdim=False),
    "max.other": _function("torch.max", "self", "other"),
    "min.other": _function("torch.min", "self", "other"),
    "clamp.default": _method("clamp", "self", min=None, max=None),
    "softmax.int": _softmax("F.softmax"),
    "_softmax.default": _softmax("F.softmax"),
    "log_softmax.int": _softmax("F.log_softmax"),
    "_log_softmax.default": _softmax("F.log_softmax"),
    "layer_norm.default": _layer_norm,
    "rms_norm.default": _function("F.rms_norm", "input", "normalized_shape", weight=None, eps=None),
    "group_norm.default": _function("F.group_norm", "input", "num_groups", weight=None, bias=None, eps=1e-5),
    "batch_norm.default": _batch_norm,
    "clamp_min.default": _method("clamp_min", "self", "min"),
    "clamp_.default": _method("clamp_", "self", min=None, max=None),
    "clamp_min_.default": _method("clamp_min_", "self", "min"),
    "silu_.default": lambda a: Call("call_function", "F.silu", (a["self"],), {"inplace": True}),
    "softplus.default": _function("F.softplus", "self", beta=1, threshold=20),
    "nan_to_num.default": _function("torch.nan_to_num", "self", nan=None, posinf=None, neginf=None),
    "linalg_vector_norm.default": _function("torch.linalg.vector_norm", "self", ord=2, dim=None, keepdim=False, dtype=None),
    "special_expit.default": _unary("torch.special.expit"),
    "fft_rfft.default": _function("torch.fft.rfft", "self", n=None, dim=-1, norm=None),
    "mv.default": lambda a: Call("call_function", "operator.matmul", (a["self"], a["vec"])),
    "vdot.default": _function("torch.vdot", "self", "other"),
    "matrix_H.default": _method("adjoint", "self"),  # x.H (2-D only), as a call: the same view
    "scatter.src": _method("scatter", "self", "dim", "index", "src"),
    "scatter.value": _method("scatter", "self", "dim", "index", "value"),
    "scatter_.src": _method("scatter_", "self", "dim", "index", "src"),
    "scatter_.value": _method("scatter_", "self", "dim", "index", "value"),
    "scatter_add.default": _method("scatter_add", "self", "dim", "index", "src"),
    "scatter_add_.default": _method("scatter_add_", "self", "dim", "index", "src"),
    "scatter_reduce.two": _method("scatter_reduce", "self", "dim", "index", "src", "reduce", include_self=True),
    "scatter_reduce_.two": _method("scatter_reduce_", "self", "dim", "index", "src", "reduce", include_self=True),
    "index_add.default": _method("index_add", "self", "dim", "index", "source", alpha=1),
    "index_add_.default": _method("index_add_", "self", "dim", "index", "source", alpha=1),
    "index_copy.default": _method("index_copy", "self", "dim", "index", "source"),
    "index_fill.int_Scalar": _method("index_fill", "self", "dim", "index", "value"),
    "instance_norm.default": _instance_norm,
    **{f"{name}.input": _recurrent(f"torch.{name}") for name in ("gru", "lstm", "rnn_tanh", "rnn_relu")},
    "embedding.default": _embedding,
    "scaled_dot_product_attention.default": _attention,
    "dropout.default": _dropout,
    "dropout_.default": lambda a: Call("call_function", "F.dropout", (a["self"],),
                                       {"p": a["p"], "training": _traced_training(a["train"]), "inplace": True}),
    "conv1d.default": _function("F.conv1d", "input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv2d.default": _function("F.conv2d", "input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv_transpose2d.input": _function(
        "F.conv_transpose2d", "input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"
    ),
    "max_pool1d.default": _pool("F.max_pool1d", padding=0, dilation=1, ceil_mode=False),
    "max_pool2d.default": _pool("F.max_pool2d", padding=0, dilation=1, ceil_mode=False),
    "avg_pool2d.default": _pool(
        "F.avg_pool2d", padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
    ),
    "adaptive_avg_pool1d.default": _function("F.adaptive_avg_pool1d", "self", "output_size"),
    "adaptive_avg_pool2d.default": _function("F.adaptive_avg_pool2d", "self", "output_size"),
    "avg_pool3d.default": _pool(
        "F.avg_pool3d", padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
    ),
    "im2col.default": _function("F.unfold", "self", "kernel_size", "dilation", "padding", "stride"),
    "col2im.default": _function("F.fold", "self", "output_size", "kernel_size", "dilation", "padding", "stride"),
    "grid_sampler.default": _grid_sample,
    "affine_grid_generator.default": _function("F.affine_grid", "theta", "size", "align_corners"),
    "channel_shuffle.default": _function("F.channel_shuffle", "self", "groups"),
    "native_channel_shuffle.default": _function("F.channel_shuffle", "self", "groups"),
    "prelu.default": _function("F.prelu", "self", "weight"),
    "mish.default": _unary("F.mish"),
    "selu.default": _unary("F.selu"),
    "relu6.default": _unary("F.relu6"),
    "celu.default": _function("F.celu", "self", alpha=1.0),
    "elu.default": lambda a: (
        None if not (_equal(a["scale"], 1) and _equal(a["input_scale"], 1)) else _function("F.elu", "self", alpha=1)(a)
    ),
    "glu.default": _function("F.glu", "self", dim=-1),
    "hardtanh.default": _function("F.hardtanh", "self", min_val=-1, max_val=1),
    "constant_pad_nd.default": _function("F.pad", "self", "pad", value=0),
    "pad.default": _function("F.pad", "self", "pad", mode="constant", value=None),
    "cross_entropy_loss.default": _loss(
        "F.cross_entropy", "self", "target", weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0
    ),
    "nll_loss.default": _loss("F.nll_loss", "self", "target", weight=None, reduction="mean", ignore_index=-100),
    "binary_cross_entropy_with_logits.default": _loss(
        "F.binary_cross_entropy_with_logits", "self", "target", weight=None, pos_weight=None, reduction="mean"
    ),
    "mse_loss.default": _loss("F.mse_loss", "self", "target", reduction="mean"),
    "l1_loss.default": _loss("F.l1_loss", "self", "target", reduction="mean"),
    "smooth_l1_loss.default": _loss("F.smooth_l1_loss", "self", "target", reduction="mean", beta=1.0),
    "view.default": _spread("view", "size"),
    "reshape.default": _spread("reshape", "shape"),
    "reshape_as.default": _method("reshape_as", "self", "other"),
    "view_as.default": _method("view_as", "self", "other"),
    "unfold.default": _method("unfold", "self", "dimension", "size", "step"),
    "fill_.Tensor": _method("fill_", "self", "value"),
    "fill_.Scalar": _method("fill_", "self", "value"),
    "_unsafe_view.default": _spread("reshape", "size"),
    "expand.default": lambda a: None if a["implicit"] else _spread("expand", "size")(a),
    "permute.default": _spread("permute", "dims"),
    "repeat.default": _spread("repeat", "repeats"),
    "t.default": _method("t", "self"),
    "transpose.int": _method("transpose", "self", "dim0", "dim1"),
    "unsqueeze.default": _method("unsqueeze", "self", "dim"),
    "squeeze.dim": _method("squeeze", "self", "dim"),
    "squeeze.dims": _squeeze_dims,
    "squeeze.default": _method("squeeze", "self"),
    "flatten.using_ints": _method("flatten", "self", "start_dim", "end_dim"),
    "contiguous.default": _contiguous,
    "clone.default": _clone,
    "lift_fresh_copy.default": _method("clone", "self"),
    "detach_.default": _method("detach_", "self"),
    "numpy_T.default": _numpy_t,
    "expand_as.default": _method("expand_as", "self", "other"),
    "repeat_interleave.self_int": _method("repeat_interleave", "self", "repeats", dim=None, output_size=None),
    "repeat_interleave.self_Tensor": _method("repeat_interleave", "self", "repeats", dim=None, output_size=None),
    "floor_divide.default": lambda a: Call("call_function", "operator.floordiv", (a["self"], a["other"])),
    "div_.Tensor": _method("div_", "self", "other"),
    "topk.default": _function("torch.topk", "self", "k", dim=-1, largest=True, sorted=True),
    "sort.default": _function("torch.sort", "self", dim=-1, descending=False),
    "histc.default": _function("torch.histc", "self", bins=100, min=0, max=0),
    "index_put_.default": _index_put_,
    "detach.default": _method("detach", "self"),
    "split.Tensor": _method("split", "self", "split_size", "dim"),
    "split_with_sizes.default": _method("split", "self", "split_sizes", "dim"),
    "chunk.default": _method("chunk", "self", "chunks", "dim"),
    "tensor_split.indices": _method("tensor_split", "self", "indices", dim=0),
    "tensor_split.sections": _method("tensor_split", "self", "sections", dim=0),
    "unbind.int": _method("unbind", "self", "dim"),
    "roll.default": _method("roll", "self", "shifts", dims=[]),
    "flip.default": _method("flip", "self", "dims"),
    "slice.Tensor": _slice,
    "select.int": _select,
    "index.Tensor": _advanced_index,
    "narrow.default": _method("narrow", "self", "dim", "start", "length"),
    "gather.default": _method("gather", "self", "dim", "index"),
    "index_select.default": _method("index_select", "self", "dim", "index"),
    "masked_fill.Scalar": _method("masked_fill", "self", "mask", "value"),
    "masked_scatter.default": _method("masked_scatter", "self", "mask", "source"),
    "_weight_norm.default": _function("torch._weight_norm", "v", "g", dim=0),
    "masked_fill.Tensor": _method("masked_fill", "self", "mask", "value"),
    "where.self": _function("torch.where", "condition", "self", "other"),
    "where.ScalarSelf": _function("torch.where", "condition", "self", "other"),
    "where.ScalarOther": _function("torch.where", "condition", "self", "other"),
    "where.Scalar": _function("torch.where", "condition", "self", "other"),
    "sum.dim_IntList": _reduce("sum"),
    "sum.default": _reduce("sum"),
    "mean.dim": _reduce("mean"),
    "mean.default": _reduce("mean"),
    "var.dim": _spread_of("var"),
    "var.correction": _spread_of("var"),
    "std.dim": _spread_of("std"),
    "std.correction": _spread_of("std"),
    "amax.default": _reduce("amax"),
    "amin.default": _reduce("amin"),
    "max.dim": _method("max", "self", "dim", keepdim=False),
    "min.dim": _method("min", "self", "dim", keepdim=False),
    "max.default": _method("max", "self"),  # I-BERT's QuantAct: the running range's x.min(), x.max()
    "min.default": _method("min", "self"),
    "diff.default": _function("torch.diff", "self", n=1, dim=-1, prepend=None, append=None),
    "cumsum.default": _method("cumsum", "self", "dim", dtype=None),
    "tril.default": _method("tril", "self", diagonal=0),
    "triu.default": _method("triu", "self", diagonal=0),
    "cat.default": _function("torch.cat", "tensors", "dim"),
    "concatenate.default": _function("torch.cat", "tensors", "dim"),  # torch.concatenate, the alias ATen keeps
    "concat.default": _function("torch.cat", "tensors", "dim"),
    "stack.default": _function("torch.stack", "tensors", "dim"),
    "arange.default": _factory_call("torch.arange", "end"),
    "arange.start": _factory_call("torch.arange", "start", "end"),
    "arange.start_step": _factory_call("torch.arange", "start", "end", "step"),
    "ones.default": _factory_call("torch.ones", "size"),
    "eye.default": _factory_call("torch.eye", "n"),
    "eye.m": _factory_call("torch.eye", "n", "m"),
    "zeros.default": _factory_call("torch.zeros", "size"),
    "rand.default": _factory_call("torch.rand", "size"),
    "randn.default": _factory_call("torch.randn", "size"),
    "randint.default": _randint("high", "size"),
    "randint.low": _randint("low", "high", "size"),  # DAC's quantizer dropout
    # torch.tensor(n, dtype=...) of a Python number from a shape (`torch.tensor(x.shape[0])`); with
    # no dtype, scalar_tensor makes the default float dtype, where torch.tensor would infer one
    "scalar_tensor.default": lambda a: None if a["dtype"] is None else _factory_call("torch.tensor", "s")(a),
    "linspace.default": _factory_call("torch.linspace", "start", "end", "steps"),  # Deformable DETR's reference points
    "rand_like.default": _like("torch.rand_like", "self"),
    "randn_like.default": _like("torch.randn_like", "self"),
    # draws from an explicit generator stay ATen calls (the method spellings would drop it)
    "bernoulli.p": lambda a: None if a["generator"] is not None else _method("bernoulli", "self", "p")(a),
    "bernoulli.default": lambda a: None if a["generator"] is not None else _method("bernoulli", "self")(a),
    "uniform_.default": lambda a: None if a["generator"] is not None else _method("uniform_", "self", "from", "to")(a),
    "normal_.default": lambda a: None if a["generator"] is not None else _method("normal_", "self", mean=0.0, std=1.0)(a),
    "exponential_.default": lambda a: None if a["generator"] is not None else _method("exponential_", "self", lambd=1.0)(a),
    "empty.memory_format": lambda a: (
        None if a["memory_format"] is not None else _factory_call("torch.empty", "size")(a)
    ),
    "full.default": _factory_call("torch.full", "size", "fill_value"),
    "new_ones.default": _new_factory("new_ones", "self", "size"),
    "new_zeros.default": _new_factory("new_zeros", "self", "size"),
    "new_empty.default": _new_factory("new_empty", "self", "size"),
    "new_full.default": _new_factory("new_full", "self", "size", "fill_value"),
    "zeros_like.default": _like("torch.zeros_like", "self"),
    "ones_like.default": _like("torch.ones_like", "self"),
    "empty_like.default": _like("torch.empty_like", "self"),
    "full_like.default": _like("torch.full_like", "self", "fill_value"),
    "to.dtype": _to,
    "to.device": _to,
    "to.dtype_layout": _to,
    "add_.Tensor": lambda a: (
        None if not _equal(a["alpha"], 1) else Call("call_method", "add_", (a["self"], a["other"]))
    ),
    "masked_fill_.Scalar": _method("masked_fill_", "self", "mask", "value"),
    "mul_.Tensor": _method("mul_", "self", "other"),
    "copy_.default": _method("copy_", "self", "src", non_blocking=False),
    "relu_.default": lambda a: Call("call_function", "F.relu", (a["self"],), {"inplace": True}),
    # nn.LeakyReLU(inplace=True), Swin2SR's
    "leaky_relu_.default": lambda a: Call(
        "call_function", "F.leaky_relu", (a["self"],), {**_unless(a, negative_slope=0.01), "inplace": True}
    ),
    "einsum.default": lambda a: None if a["path"] is not None else _listed("torch.einsum", "tensors", "equation")(a),
    "broadcast_tensors.default": _listed("torch.broadcast_tensors", "tensors"),
    "meshgrid.indexing": lambda a: Call("call_function", "torch.meshgrid", tuple(a["tensors"]), {"indexing": a["indexing"]}),
    "meshgrid.default": lambda a: Call("call_function", "torch.meshgrid", tuple(a["tensors"]), {"indexing": "ij"}),
    **{key: _interpolate(mode, corners) for key, (mode, corners) in _INTERPOLATIONS.items()},
    **{f"conv{n}d.padding": _function(f"F.conv{n}d", "input", "weight", "bias", "stride", "padding", "dilation", "groups")
       for n in (1, 2, 3)},  # fmt: skip
    "conv3d.default": _function("F.conv3d", "input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv_transpose1d.default": _function(
        "F.conv_transpose1d", "input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"
    ),
    "conv_transpose3d.input": _function(
        "F.conv_transpose3d", "input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"
    ),
    "max_pool3d.default": _pool("F.max_pool3d", padding=0, dilation=1, ceil_mode=False),
    "avg_pool1d.default": _pool("F.avg_pool1d", padding=[0], ceil_mode=False, count_include_pad=True),
    "pixel_shuffle.default": _function("F.pixel_shuffle", "self", "upscale_factor"),
    "pixel_unshuffle.default": _function("F.pixel_unshuffle", "self", "downscale_factor"),
    "log_sigmoid.default": _unary("F.logsigmoid"),
    "hardshrink.default": _function("F.hardshrink", "self", lambd=0.5),
    "softshrink.default": _function("F.softshrink", "self", lambd=0.5),
    "threshold.default": _function("F.threshold", "self", "threshold", "value"),
    "one_hot.default": _function("F.one_hot", "self", num_classes=-1),
    "cosine_similarity.default": _function("F.cosine_similarity", "x1", "x2", dim=1, eps=1e-8),
    "pairwise_distance.default": _function("F.pairwise_distance", "x1", "x2", p=2.0, eps=1e-6, keepdim=False),
    "bilinear.default": _function("F.bilinear", "input1", "input2", "weight", bias=None),
    # ATen's compute_mode is an integer, torch.cdist's a string
    "cdist.default": lambda a: None if a["compute_mode"] is not None else _function("torch.cdist", "x1", "x2", p=2.0)(a),
    "lstm_cell.default": _function("torch.lstm_cell", "input", "hx", "w_ih", "w_hh", b_ih=None, b_hh=None),
    "gru_cell.default": _function("torch.gru_cell", "input", "hx", "w_ih", "w_hh", b_ih=None, b_hh=None),
    "fft_fft.default": _function("torch.fft.fft", "self", n=None, dim=-1, norm=None),
    "fft_ifft.default": _function("torch.fft.ifft", "self", n=None, dim=-1, norm=None),
    "fft_irfft.default": _function("torch.fft.irfft", "self", n=None, dim=-1, norm=None),
    "linalg_norm.default": _function("torch.linalg.norm", "self", ord=None, dim=None, keepdim=False, dtype=None),
    "linalg_cholesky.default": _function("torch.linalg.cholesky", "self", upper=False),
    "linalg_qr.default": _function("torch.linalg.qr", "A", mode="reduced"),
    "linalg_solve.default": _function("torch.linalg.solve", "A", "B", left=True),
    "linalg_slogdet.default": _function("torch.linalg.slogdet", "A"),
    "linalg_svdvals.default": _function("torch.linalg.svdvals", "A", driver=None),
    "linalg_det.default": _function("torch.linalg.det", "A"),
    "linalg_eigh.default": _function("torch.linalg.eigh", "self", UPLO="L"),
    "logsumexp.default": _function("torch.logsumexp", "self", "dim", keepdim=False),
    "logit.default": _function("torch.logit", "self", eps=None),
    "argsort.default": _function("torch.argsort", "self", dim=-1, descending=False),
    "argsort.stable": lambda a: Call(
        "call_function", "torch.argsort", (a["self"],), {"stable": a["stable"], **_unless(a, dim=-1, descending=False)}
    ),
    "cummax.default": _function("torch.cummax", "self", "dim"),
    "cumprod.default": _method("cumprod", "self", "dim", dtype=None),
    "prod.dim_int": _method("prod", "self", "dim", keepdim=False, dtype=None),
    "median.dim": _method("median", "self", "dim", keepdim=False),
    "any.dim": _method("any", "self", "dim", keepdim=False),
    "all.dim": _method("all", "self", "dim", keepdim=False),
    "any.default": _method("any", "self"),
    "all.default": _method("all", "self"),
    "logical_and.default": _function("torch.logical_and", "self", "other"),
    "logical_or.default": _function("torch.logical_or", "self", "other"),
    "atan2.default": _function("torch.atan2", "self", "other"),
    "outer.default": _function("torch.outer", "self", "vec2"),
    "addcmul.default": _function("torch.addcmul", "self", "tensor1", "tensor2", value=1),
    "lerp.Scalar": _method("lerp", "self", "end", "weight"),
    "lerp.Tensor": _method("lerp", "self", "end", "weight"),
    "clamp_max.default": _method("clamp_max", "self", "max"),
    "clamp.Tensor": _method("clamp", "self", min=None, max=None),
    "clip.default": _method("clip", "self", min=None, max=None),
    "clip.Tensor": _method("clip", "self", min=None, max=None),
    "polar.default": _function("torch.polar", "abs", "angle"),
    "diagonal.default": _method("diagonal", "self", offset=0, dim1=0, dim2=1),
    "diag_embed.default": _function("torch.diag_embed", "self", offset=0, dim1=-2, dim2=-1),
    "movedim.int": _method("movedim", "self", "source", "destination"),
    "unsqueeze_.default": _method("unsqueeze_", "self", "dim"),
    "bucketize.Tensor": _function("torch.bucketize", "self", "boundaries", out_int32=False, right=False),
    "searchsorted.Tensor": _function(
        "torch.searchsorted", "sorted_sequence", "self", out_int32=False, right=False, side=None, sorter=None
    ),
}


def whole_view(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> Any | None:
    """The tensor itself, for ops that view all of it (alias, `x[:]`) or return it (dropout with
    p = 0, which ATen returns unchanged: HF configs set attention_dropout=0.0), or None. Writing
    the tensor instead computes the same values and gradients; only the view object is gone."""
    if op is torch.ops.aten.alias.default:
        return args[0]
    if op is torch.ops.aten.dropout.default:
        a = bind(op, args, kwargs)
        return a["input"] if isinstance(a["p"], (int, float)) and a["p"] == 0 else None
    if op is torch.ops.aten.slice.Tensor:
        a = bind(op, args, kwargs)
        if _equal(a["start"], 0) and _equal(a["end"], _END) and _equal(a["step"], 1):
            return a["self"]
    return None


def lower(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> Call | None:
    """The op as a torch.*, F.*, operator or tensor-method call, or None to keep the ATen call."""
    lowering = LOWERINGS.get(op_key(op)) if op.namespace == "aten" else None
    return lowering(bind(op, args, kwargs)) if lowering else None


# torch.nn layers whose forward is exactly one ATen op (given the layer's settings), and the
# op's argument that is the forward's input. When that op ran inside such a layer and was the
# only op there, calling the layer says the same (its settings are the ones the op got) and keeps
# the layer's own behaviour, such as dropout and batch norm following the stage's train()/eval().
MODULE_CALLS: dict[type, tuple[str, str]] = {
    nn.Linear: ("linear.default", "input"),
    nn.Embedding: ("embedding.default", "indices"),
    nn.LayerNorm: ("layer_norm.default", "input"),
    nn.GroupNorm: ("group_norm.default", "input"),
    nn.InstanceNorm1d: ("instance_norm.default", "input"),
    nn.InstanceNorm2d: ("instance_norm.default", "input"),
    nn.InstanceNorm3d: ("instance_norm.default", "input"),
    nn.BatchNorm1d: ("batch_norm.default", "input"),  # in eval mode; training also counts batches
    nn.BatchNorm2d: ("batch_norm.default", "input"),
    nn.Dropout: ("dropout.default", "input"),
    nn.GELU: ("gelu.default", "self"),
    nn.ReLU: ("relu.default", "self"),
    nn.SiLU: ("silu.default", "self"),
    nn.Hardswish: ("hardswish.default", "self"),
    nn.Hardsigmoid: ("hardsigmoid.default", "self"),
    nn.Tanh: ("tanh.default", "self"),
    nn.Sigmoid: ("sigmoid.default", "self"),
    nn.LeakyReLU: ("leaky_relu.default", "self"),
    nn.Softmax: ("softmax.int", "self"),
    nn.Conv1d: ("conv1d.default", "input"),
    nn.Conv2d: ("conv2d.default", "input"),
    nn.Conv3d: ("conv3d.default", "input"),
    nn.ConvTranspose1d: ("conv_transpose1d.default", "input"),
    nn.ConvTranspose2d: ("conv_transpose2d.input", "input"),
    nn.MaxPool2d: ("max_pool2d.default", "self"),
    nn.AvgPool2d: ("avg_pool2d.default", "self"),
    nn.AdaptiveAvgPool1d: ("adaptive_avg_pool1d.default", "self"),
    nn.AdaptiveAvgPool2d: ("adaptive_avg_pool2d.default", "self"),
    nn.AvgPool3d: ("avg_pool3d.default", "self"),
    nn.Unfold: ("im2col.default", "self"),
    nn.Fold: ("col2im.default", "self"),
    nn.ChannelShuffle: ("channel_shuffle.default", "self"),
    nn.PReLU: ("prelu.default", "self"),
    nn.Mish: ("mish.default", "self"),
    nn.SELU: ("selu.default", "self"),
    nn.CELU: ("celu.default", "self"),
    nn.ELU: ("elu.default", "self"),
    nn.GLU: ("glu.default", "self"),
    nn.Hardtanh: ("hardtanh.default", "self"),
    nn.ReLU6: ("hardtanh.default", "self"),
    nn.RMSNorm: ("rms_norm.default", "input"),
    **{cls: ("pad.default", "self") for cls in (
        nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
        nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d, nn.ZeroPad1d, nn.ZeroPad2d,
        nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    )},  # fmt: skip
}


# torch.nn layers that take several inputs or return several outputs, whose whole call (every
# ATen op it ran) becomes one call of the layer with the call's own arguments, unpacked into its
# outputs: `self.lstm(x, (h0, c0))`. Composite layers (TransformerEncoderLayer) are not listed:
# their children become module calls themselves, and their ops stay apart so a stage boundary
# may fall inside them.
WHOLE_CALLS: tuple[type, ...] = (
    nn.RNNBase, nn.MultiheadAttention, nn.Bilinear, nn.modules.loss._Loss, nn.CosineSimilarity,
    nn.PairwiseDistance, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._MaxUnpoolNd,
)  # fmt: skip

# Names of the items of a layer's output (by position in its nested output) or of an ATen op's
# flat output, after the layer's documentation, for values no source statement names.
OUTPUT_NAMES: dict[type | str, dict[tuple, str]] = {
    nn.LSTM: {(0,): "out", (1,): "state", (1, 0): "h", (1, 1): "c"},
    nn.GRU: {(0,): "out", (1,): "h"},
    nn.RNN: {(0,): "out", (1,): "h"},
    nn.MultiheadAttention: {(0,): "out", (1,): "weights"},
    # max pooling with return_indices=True
    **{cls: {(0,): "out", (1,): "indices"} for cls in (
        nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    )},  # fmt: skip
    "lstm.input": {(0,): "out", (1,): "h", (2,): "c"},
    "lstm_cell.default": {(0,): "h", (1,): "c"},
    **{f"{name}.input": {(0,): "out", (1,): "h"} for name in ("gru", "rnn_tanh", "rnn_relu")},
    **{f"{name}.default": {(0,): "out", (1,): "indices"} for name in (
        "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
        "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    )},  # fmt: skip
}


def output_name(owner: type | str, position: tuple) -> str:
    """The name of an item of a layer's (or its base class's) or an op's output: "h" for an
    LSTM's (1, 0), else the position ("1_0")."""
    kinds = owner.__mro__ if isinstance(owner, type) else (owner,)
    names = next((OUTPUT_NAMES[kind] for kind in kinds if kind in OUTPUT_NAMES), {})
    return names.get(position) or "_".join(map(str, position))


# Recurrent cells whose forward, given a batched input and a state, is one ATen op: the call
# passes both as the layer takes them (`self.cell(x, (h, c))`).
CELL_CALLS: dict[type, tuple[str, ...]] = {
    nn.LSTMCell: ("lstm_cell.default",),
    nn.GRUCell: ("gru_cell.default",),
    nn.RNNCell: ("rnn_tanh_cell.default", "rnn_relu_cell.default"),
}


def module_call(
    op: torch._ops.OpOverload, args: tuple, kwargs: dict, module: nn.Module, path: str, tensor_of: Callable[[Any], Any]
) -> Call | None:
    """`self.<path>(x)` (a cell's `self.<path>(x, h)`) when `op`, run as the only op of
    `module`'s forward, is what that forward computes: the op is the layer's, and every tensor it
    reads besides the input (and a cell's state) is one of the layer's own parameters or
    buffers. `tensor_of(arg)` is the parameter or buffer an argument reads, or None."""
    if op_key(op) in CELL_CALLS.get(type(module), ()):
        inputs = ("input", "hx")
    else:
        expected, input_name = MODULE_CALLS.get(type(module), (None, None))
        if op_key(op) != expected:
            return None
        inputs = (input_name,)
    a = bind(op, args, kwargs)
    own = {id(t) for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))}
    for name, value in a.items():
        if name not in inputs and isinstance(value, fx.Node) and id(tensor_of(value)) not in own:
            return None
    # an LSTM cell's state is the op's list (h, c): the layer takes it as a tuple
    return Call("call_module", path, tuple(tuple(a[n]) if isinstance(a[n], list) else a[n] for n in inputs))
