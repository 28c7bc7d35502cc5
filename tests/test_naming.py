"""Values are named after the variables the model's source assigns them to; an item a statement
takes on the way (`x.shape[0]`) is not one of the items its tuple target unpacks."""

from __future__ import annotations

import json
import re

import pytest

from ftc.compiler import CompileOptions, compile_model

UNPACKED = """
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.out = nn.Linear(8, 8)

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], 3, 8).unbind(1)
        B, D = q.shape
        a, b = q[:, :4], k[:, 4:]
        return self.out(q * k + v) * B / D + torch.cat([a, b], 1)


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_tuple_targets_name_only_the_items_of_the_statements_value(tmp_path, frontend):
    path = tmp_path / "unpacked.py"
    path.write_text(UNPACKED)
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=1, frontend=frontend))
    code = (compiled.folder / "stage0.py").read_text()
    assert "q = unbind[0]" in code and "k = unbind[1]" in code and "v = unbind[2]" in code, code
    assert "q = shape" not in code and "q = size" not in code, code
    assert re.search(r"\ba = q\[", code) and re.search(r"\bb = k\[", code), code  # a tuple of expressions
    if frontend == "fx":  # export reads the sizes from its symbolic shapes instead
        assert re.search(r"B = shape\w*\[0\]", code) and re.search(r"D = shape\w*\[1\]", code), code


ATTRIBUTES = """
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return torch.fft.irfft(torch.fft.rfft(x @ self.weight.T, dim=1), n=x.shape[1], dim=1)


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""


def test_attribute_reads_and_their_items_are_named_after_the_attribute(tmp_path):
    """fx names `x.shape` 'getattr_2' and its item 'getattr_2_1', which stage code printed as
    `getattr_2_1 = shape[1]` (and as a stage's output, `getattr_3 = self.weight.T`). The item
    is named after the keyword the call takes it as, `n`."""
    path = tmp_path / "attributes.py"
    path.write_text(ATTRIBUTES)
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=1, frontend="fx"))
    code = (compiled.folder / "stage0.py").read_text()
    assert "getattr" not in code, code
    assert "T = self.weight.T" in code and "n = shape[1]" in code and "n=n" in code, code


RUNNING_MEAN = """
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.register_buffer("mean", torch.zeros(8))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = self.inp(x)
        with torch.no_grad():
            self.mean.mul_(0.9).add_(0.1 * h.mean(0))
            self.count += 1
        return self.out(h - self.mean)


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""


def test_an_in_place_op_is_named_after_the_tensor_it_writes(tmp_path):
    """export named the running mean's update `add__7` (in stage code, and in pipeline.json where
    it crossed stages); it is the buffer `mean`."""
    path = tmp_path / "running_mean.py"
    path.write_text(RUNNING_MEAN)
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=1))
    code = (compiled.folder / "stage0.py").read_text()
    assert "mean = self.mean.mul_(0.9)" in code and re.search(r"mean_\d+ = mean\.add_\(", code), code
    assert re.search(r"out\(\w+\)", code) and "__" not in code.replace("__init__", ""), code


LAYER_WITH_AN_EXPRESSION = """
import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.stem = nn.Sequential(nn.Linear(8, 8), nn.GELU())
        self.blocks = nn.Sequential(Block())
        self.head = nn.Linear(8, 4)

    def forward(self, ids):
        x = self.embed(ids)
        encoded = self.encoder(x, src_key_padding_mask=ids == 0)
        decoded = self.decoder(encoded, x)
        h = self.blocks(self.stem(decoded))
        return self.head(h.mean(1))


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randint(1, 16, (batch_size, 6)),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
"""


def test_a_statement_that_ends_in_a_lowered_torch_layer_names_the_layers_value(tmp_path):
    """Through export, a torch.nn layer's own ops carry the caller's line; the statement's name
    goes to the layer's last op (its value), not to the argument computed at the caller's level
    (`ids == 0`), also where no op is at the caller's level (`decoded = self.decoder(...)`); but
    not to a layer whose value goes on into a module of the model's own in the same statement
    (`h = self.blocks(self.stem(decoded))`: the stem's GELU is not h)."""
    from ftc.check import check_pipeline

    from .conftest import assert_local_trains_like_single

    path = tmp_path / "expression.py"
    path.write_text(LAYER_WITH_AN_EXPRESSION)
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=2, batch_size=4, frontend="export"))
    code = "".join((compiled.folder / f"stage{k}.py").read_text() for k in range(2))
    assert "encoded = self.encoder.norm2(" in code and "eq = ids == 0" in code, code
    assert "decoded = self.decoder.norm3(" in code and "h = self.stem" not in code, code
    assert "self.encoder.self_attn(" in code, code
    assert check_pipeline(compiled.folder, batch_size=4).ok
    assert_local_trains_like_single(compiled.folder)


LAYERS_OF_ITS_OWN = """
import torch
import torch.nn as nn


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return x * self.gain


class Halves(nn.Module):
    def forward(self, x):
        first, second = x.chunk(2, dim=-1)
        return first, second


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.scale = Scale()
        self.halves = Halves()

    def forward(self, x):
        h = self.inp(x)
        a, b = self.halves(self.scale(h))
        return a * b


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_layer_of_the_models_own_names_its_value_after_its_attribute(tmp_path, frontend):
    """A module of the model's code without submodules, traced into, is a layer: its value is
    named after it where the caller reads it, as a torch.nn layer's call is (`scale`, not the
    tracer's `mul`); not where it returns several values (`first` and `second` stay)."""
    path = tmp_path / "layers.py"
    path.write_text(LAYERS_OF_ITS_OWN)
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=1, frontend=frontend))
    code = (compiled.folder / "stage0.py").read_text()
    assert "scale = h * self.scale.gain" in code and "chunk = scale.chunk(" in code, code
    assert re.search(r"\bfirst = \w+\[0\]", code) and re.search(r"\bsecond = \w+\[1\]", code), code
    assert not re.search(r"\bhalves\w* = ", code), code


CONTAINER_ITEMS = """
import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, x):
        return x + self.mlp(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""


def test_an_item_of_a_container_is_named_after_the_container_and_its_index(tmp_path):
    """`self.blocks[1].mlp[0](x)` gives `mlp_0`, as one would name it, not the whole path
    `blocks_1_mlp_0`; a second block's items are told apart by the usual counter; the stages
    still compute what the model does."""
    from ftc.check import check_pipeline

    path = tmp_path / "items.py"
    path.write_text(CONTAINER_ITEMS)
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=1, frontend="fx"))
    code = (compiled.folder / "stage0.py").read_text()
    assert re.search(r"\bmlp_0 = self\.blocks\[0\]\.mlp\[0\]\(x\)", code), code
    assert re.search(r"\bmlp_2_1 = self\.blocks\[1\]\.mlp\[2\]\(mlp_1_1\)", code), code
    assert "blocks_0_mlp" not in code and "blocks_1_mlp" not in code, code
    check_pipeline(compiled.folder)


CALLED = """
import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(x).relu()


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.lin(x))


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()

    def forward(self, x):
        return self.inner(x * 2)


class Pair(nn.Module):
    def forward(self, x):
        return x.sigmoid(), x.cos()


class Halves(nn.Module):
    def forward(self, x):
        return x.chunk(2, dim=-1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(4))
        self.outer = Outer()
        self.pair = Pair()
        self.halves = Halves()
        self.pre = Block()
        self.post = Block()
        self.body = nn.Sequential(Block(), Block())
        self.head = nn.Linear(48, 2)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        y = self.outer(x)
        a, b = self.pair(y)
        h, c = self.halves(a)
        z = self.post(self.pre(b))
        s = self.body(z)
        return self.head(torch.cat([x, y, z, s, h, c, a + b], -1))


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_called_modules_value_is_named_after_the_callers_variable(tmp_path, frontend):
    """A module the tracer goes into ends in `return <expr>`, which names nothing; the caller's
    `x = block(x)` does, and so the value, a stage's input or output among them, reads `x_2`
    rather than the tracer's `add_2`."""
    import json

    from ftc.check import check_pipeline

    path = tmp_path / "called.py"
    path.write_text(CALLED)
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend=frontend))
    code = "".join((compiled.folder / f"stage{k}.py").read_text() for k in range(2))
    manifest = json.loads((compiled.folder / "pipeline.json").read_text())
    boundary = [name for stage in manifest["stages"] for name in stage["inputs"] + stage["outputs"]]
    assert "x_4" in boundary and not [name for name in boundary if name.startswith("add")], boundary
    assert len(re.findall(r"\bx(_\d+)? = x\w* \+ relu\w*", code)) == 4, code  # each block's `return x + ...`
    assert re.search(r"\by = torch\.tanh\(", code), code  # through Outer's `return self.inner(x * 2)`
    assert re.search(r"\ba = (torch\.sigmoid\(\w+|\w+\.sigmoid\()", code), code
    assert re.search(r"\bb = (torch\.cos\(\w+|\w+\.cos\()", code), code
    assert re.search(r"\bh = \w+\[0\]", code) and re.search(r"\bc = \w+\[1\]", code), code
    # `z = self.post(self.pre(b))`: pre's value is not z, post's is
    assert len(re.findall(r"\bz(_\d+)? = ", code)) == 1 and re.search(r"\bz = \w+ \+ relu\w*", code), code
    # a Sequential's value is its last child's, not each child's
    assert len(re.findall(r"\bs(_\d+)? = ", code)) == 1 and re.search(r"\bs = \w+ \+ relu\w*", code), code
    assert check_pipeline(compiled.folder, batch_size=4).ok


TUPLES_AND_SIZES = """
import torch
import torch.nn as nn
import torch.nn.functional as F


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class Cell(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 12, 3, padding=1)

    def forward(self, x, state):
        h, c = state
        i, g, o = self.conv(torch.cat([x, h], dim=1)).chunk(3, dim=1)
        c = c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class NamedCell(Cell):
    def forward(self, x, state):
        h, c = super().forward(x, state)
        return h, c


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = Cell()
        self.cell2 = NamedCell()
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, frames):
        B, T, C, H, W = frames.shape
        s = (frames.new_zeros(B, 4, H, W), frames.new_zeros(B, 4, H, W))
        for t in range(3):
            s = self.cell(frames[:, t], s)
        for t in range(2):
            s = self.cell2(frames[:, t], s)
        y = self.out(rotate_half(s[0]))
        return F.interpolate(y, size=frames.shape[-2:], mode="bilinear") + s[1].mean()


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 3, 2, 6, 6),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
"""


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_tuples_built_or_split_in_one_statement_and_sizes_taken_on_the_way_are_named(tmp_path, frontend):
    """`s = (zeros, zeros)` named its second item `s` and its first `new_zeros`; `s =
    self.cell(frames[:, t], s)` named the argument `frames[:, t]` `s`, and the cell's returned
    `(sigmoid(o) * tanh(c), c)` left its first item `mul`; `x1, x2 = x[..., :n], x[..., n:]`
    (several ops per element) named neither; `size=x.shape[-2:]` was `getitem`. Now the items
    are `s_0`, `s_1` (c keeps its own name), `x1`, `x2`, and `size` (the keyword it is passed as)."""
    from ftc.check import check_pipeline

    path = tmp_path / "tuples_and_sizes.py"
    path.write_text(TUPLES_AND_SIZES)
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend=frontend))
    code = "".join((compiled.folder / f"stage{k}.py").read_text() for k in range(2))
    assert re.search(r"\bs_0 = frames\.new_zeros\(", code) and re.search(r"\bs_1 = frames\.new_zeros\(", code), code
    assert not re.search(r"\bgetitem\w* = (shape|size)", code), code
    assert re.search(r"\bs_0_1 = sigmoid\w* \* tanh\w*\n", code) and not re.search(r"\bs(_\d+)? = frames\[", code), code
    if frontend == "fx":  # export's sizes are constants here, and rotate_half's ops carry its caller's line
        assert re.search(r"\bx1 = \w+\[\.\.\., :\w+\]", code) and re.search(r"\bx2 = \w+\[\.\.\., \w+:\]", code), code
        assert re.search(r"\b(size\w*) = shape\w*\[-2:\]\n\s*\w+ = F\.interpolate\(y, size=\1,", code), code
    assert check_pipeline(compiled.folder, batch_size=4).ok


UNNAMED_OPS = """
import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(8, 8, 3, padding=2)

    def forward(self, x):
        return self.conv(x)[..., : x.shape[-1]] / 2 + x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*(Block() for _ in range(4)))

    def forward(self, x):
        return self.blocks(x)


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8, 16),)
"""


def test_an_unnamed_value_exports_lowered_is_named_after_its_op_without_the_traces_counter(tmp_path):
    """Export's `slice_62` (an ATen slice, written as an index) and `div_5` were written as such
    in every stage: numbered across the whole model, where other unnamed values are numbered
    within their stage ("mul", "mul_1")."""
    path = tmp_path / "unnamed.py"
    path.write_text(UNNAMED_OPS)
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend="export"))
    for stage in ("stage0.py", "stage1.py"):  # two blocks each
        code = (compiled.folder / stage).read_text()
        assert re.search(r"\bslice_ = conv\[:, :, :16\]", code) and re.search(r"\bdiv = slice_ / 2\b", code), code
        assert sorted(set(re.findall(r"\b(?:slice|div)_\d*\b", code))) == ["div_1", "slice_", "slice_1"], code


LOOPED = """
import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.fc(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.attn = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.mlp = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.taps = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x, mask):
        h = x * 2
        for block in self.blocks:
            h = h + block(h) * mask.unsqueeze(-1)
        for attn, mlp in zip(self.attn, self.mlp):
            h = h + attn(h) + mlp(h)
        skips = 0
        for tap in self.taps:
            skips = skips + tap(h).sigmoid()
        state = h
        for _ in range(3):
            state = state * 0.5 + h
        out = self.attn[0](h.relu()).relu()
        return out + skips + state


def build_model():
    return Net()


def example_inputs(batch_size):
    return torch.randn(batch_size, 8), torch.rand(batch_size)
"""


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_each_run_of_a_statement_a_loop_repeats_is_named_after_its_variable(tmp_path, frontend):
    """`h = h + block(h)` in a loop runs once per block; all its runs were one group, so only the
    last run's value was `h` and the others kept the tracer's `add_3` (a WaveNet's `skips = skips +
    s` sent `add_7` between stages). Each run is now `h_1`, `h_2`, ..., also where export shares one
    op between the runs (`mask.unsqueeze(-1)`), where a run writes two adds (`h + attn(h) + mlp(h)`:
    the first stays `add`) and where no module runs between them; one statement that repeats an op
    (`self.attn[0](h.relu()).relu()`) is still one run."""
    from ftc.check import check_pipeline

    path = tmp_path / "looped.py"
    path.write_text(LOOPED)
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=1, frontend=frontend))
    code = (compiled.folder / "stage0.py").read_text()
    for k in range(1, 4):
        assert re.search(rf"\bh_{k} = h\w* \+ mul\w*\n", code), code
    for k in (4, 5):
        assert re.search(rf"\badd\w* = h_{k - 1} \+ attn\w*\n\s+mlp\w* = .*\n\s+h_{k} = add\w* \+ mlp\w*\n", code), code
    if frontend == "fx":
        assert re.search(r"\bskips = 0 \+ sigmoid\n", code), code
        assert re.search(r"\bskips_1 = skips \+ sigmoid_1\n", code), code
        assert re.search(r"\bskips_2 = skips_1 \+ sigmoid_2\n", code), code
    else:  # export's `sigmoid + 0` is sigmoid (tidy)
        assert re.search(r"\bskips = sigmoid \+ sigmoid_1\n", code), code
        assert re.search(r"\bskips_1 = skips \+ sigmoid_2\n", code), code
    assert re.search(r"\bstate = mul\w* \+ h_5\n", code) and re.search(r"\bstate_2 = mul\w* \+ h_5\n", code), code
    assert re.search(r"\brelu = (F\.relu\(h_5\)|h_5\.relu\(\))\n", code), code
    assert re.search(r"\bout = (F\.relu\(attn\w*\)|attn\w*\.relu\(\))\n", code), code
    assert check_pipeline(compiled.folder, batch_size=4).ok


TIED_HEAD = """
import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 8)
        self.mix = nn.Linear(8, 8)

    def forward(self, x):
        h = torch.tanh(self.mix(torch.tanh(self.embed(x))))
        return F.linear(h, self.embed.weight)


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""


def test_an_unnamed_value_that_crosses_stages_has_no_counter_that_fx_would_not_give_it(tmp_path):
    """Export counts the linears of the layers too, so the model's output, F.linear after two
    layers, was `linear_2` in pipeline.json and in the stage's code, where fx wrote `linear`."""
    from ftc.check import check_pipeline

    path = tmp_path / "tied_head.py"
    path.write_text(TIED_HEAD)
    outputs = {}
    for frontend in ("fx", "export"):
        compiled = compile_model(path, tmp_path / frontend, CompileOptions(stages=2, frontend=frontend, method="uniform"))
        manifest = json.loads((compiled.folder / "pipeline.json").read_text())
        outputs[frontend] = manifest["outputs"]
        assert "return (linear,)" in (compiled.folder / manifest["stages"][-1]["file"]).read_text()
        assert check_pipeline(compiled.folder, batch_size=4).ok
    assert outputs == {"fx": ["linear"], "export": ["linear"]}


ROUTED = """
import torch
import torch.nn as nn


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        logits = self.proj(x)
        return {"out": x * torch.sigmoid(logits), "aux": logits.softmax(-1).pow(2).mean()}


LEAF_MODULES = (Gate,)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()
        self.head = nn.Linear(8, 8)

    def forward(self, x):
        routed = self.gate(x)
        out = self.head(routed["out"])
        return out, routed["aux"]


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""


def test_an_item_of_a_dict_that_no_statement_names_is_named_after_its_key(tmp_path):
    """`return out, routed["aux"]`: the item was the tracer's `getitem_1` in pipeline.json and
    in the stage that returns it. `out = self.head(routed["out"])`, whose item the tracer takes
    out ahead of `routed["aux"]` (which ftc moves up to the call), named the item `out` and the
    model's output `out_1`."""
    from ftc.check import check_pipeline

    path = tmp_path / "routed.py"
    path.write_text(ROUTED)
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend="fx", method="uniform"))
    manifest = json.loads((compiled.folder / "pipeline.json").read_text())
    assert manifest["outputs"] == ["out", "aux"]
    code = "".join((compiled.folder / stage["file"]).read_text() for stage in manifest["stages"])
    assert 'aux = routed["aux"]' in code and "out = self.head(routed_out)" in code and "getitem" not in code, code
    assert check_pipeline(compiled.folder, batch_size=3).ok
