"""Ops whose output shape depends on tensor values, as in a mixture of experts with top-1
routing (`flat[idx == e]`): the meta device cannot size them. The compile must say so in the
user's terms (torch's own text advises a private config flag), and the fix it names (the router
in LEAF_MODULES, run for real to learn its shapes) must give the model's numbers."""

from __future__ import annotations

import pytest

from ftc.check import check_pipeline
from ftc.compiler import CompileOptions, compile_model
from ftc.ir import FtcError

from .conftest import MODELS, assert_local_trains_like_single

MODEL = """
import torch
import torch.nn as nn


class TopOneExperts(nn.Module):
    def __init__(self, width, count):
        super().__init__()
        self.router = nn.Linear(width, count)
        self.experts = nn.ModuleList([nn.Linear(width, width) for _ in range(count)])

    def forward(self, x):
        weight, chosen = self.router(x).softmax(-1).max(-1)
        out = torch.zeros_like(x)
        for index, expert in enumerate(self.experts):
            picked = chosen == index
            out[picked] = expert(x[picked]) * weight[picked].unsqueeze(-1)
        return out


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.moes = nn.ModuleList([TopOneExperts(8, 3) for _ in range(2)])
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = self.inp(x)
        for moe in self.moes:
            h = h + moe(h)
        return self.out(h)


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""


@pytest.mark.parametrize("frontend", ["auto", "export"])  # fx cannot trace `out[picked] = ...`
def test_a_value_shaped_op_is_named_with_a_fix(frontend, tmp_path):
    path = tmp_path / "moe.py"
    path.write_text(MODEL)
    with pytest.raises(FtcError) as caught:
        compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend=frontend))
    assert "moe.py:" in caught.value.message and "shape depends on tensor values" in caught.value.message
    assert "meta_nonzero" not in caught.value.message
    assert "LEAF_MODULES" in caught.value.hint


def test_repeat_interleave_with_tensor_repeats_is_named_as_value_shaped(tmp_path):
    """torch says only "cannot repeat_interleave a meta tensor without output_size", which ftc
    reported as a generic meta failure that advised against `.item()` the model does not call."""
    path = tmp_path / "repeats.py"
    path.write_text(
        "import torch\n\n\n"
        "class Repeats(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(4, 4)\n\n"
        "    def forward(self, x, counts):\n"
        "        h = self.fc(x)\n"
        "        return h + torch.repeat_interleave(h, counts, dim=0).mean(0)\n\n\n"
        "def build_model():\n    return Repeats()\n\n\n"
        "def example_inputs(batch_size):\n"
        "    return (torch.randn(batch_size, 4), torch.ones(batch_size, dtype=torch.long))\n"
    )
    with pytest.raises(FtcError) as caught:
        compile_model(path, tmp_path / "out", CompileOptions(stages=1, frontend="fx"))
    assert "repeats.py:11" in caught.value.message and "shape depends on tensor values" in caught.value.message
    assert "repeat_interleave" in caught.value.message and "LEAF_MODULES" in caught.value.hint


def test_a_value_shaped_op_in_a_leaf_module_compiles_exactly(tmp_path):
    path = tmp_path / "moe_leaf.py"
    path.write_text(MODEL + "\nLEAF_MODULES = (TopOneExperts,)\n")
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend="fx"))
    assert check_pipeline(compiled.folder, batch_size=4).ok  # against the original model


def test_a_leaf_module_that_refuses_zero_lengths_compiles_and_trains_exactly(tmp_path):
    """ftc ran the packing leaf on stand-in lengths of 0, which pack_padded_sequence refuses, and
    reported that forward failed on example_inputs() on any device, which it did not."""
    compiled = compile_model(MODELS / "packed_lstm.py", tmp_path / "out", CompileOptions(stages=2, frontend="fx"))
    assert check_pipeline(compiled.folder).ok
    assert_local_trains_like_single(compiled.folder)


@pytest.mark.parametrize("frontend", ["auto", "export"])
def test_packing_outside_a_leaf_module_names_the_leaf_module_as_the_fix(frontend, tmp_path):
    """Packed in the model's own forward, the trace failed with fx's `__cuda_array_interface__
    must be a dict` and export's `zeros(): argument 'size' ... FakeTensor`, and the fix said to
    make forward's Python independent of tensor values."""
    path = tmp_path / "packed_inline.py"
    path.write_text(
        (MODELS / "packed_lstm.py").read_text().replace("LEAF_MODULES = (PackedLSTM,)", "")
    )
    with pytest.raises(FtcError) as caught:
        compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend=frontend))
    assert caught.value.hint.startswith("a PackedSequence is sized by the lengths' values")
    assert "list its class in LEAF_MODULES and compile with --frontend fx or auto" in caught.value.hint


def test_a_leaf_module_that_fails_on_stand_in_inputs_says_they_were_stand_ins(tmp_path):
    path = tmp_path / "picky.py"
    path.write_text(
        (MODELS / "packed_lstm.py")
        .read_text()
        .replace("lengths.cpu()", "(lengths - 2).cpu()")  # fine on lengths of 3 to 9
    )
    with pytest.raises(FtcError) as caught:
        compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend="fx"))
    assert "module rnn (PackedLSTM) cannot run on the meta device" in caught.value.message
    assert "stand-in inputs" in caught.value.hint and "not example_inputs()'s values" in caught.value.hint


PADDED_BY_BUFFERS = """
import torch
import torch.nn as nn
import torch.nn.functional as F


class PaddedConv(nn.Module):
    # transformers' Encodec and Mimi pad their convolutions by 0-d int64 buffers
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 4, stride=2)
        self.stride = nn.Buffer(torch.tensor(2), persistent=False)
        self.kernel_size = nn.Buffer(torch.tensor(4), persistent=False)

    def forward(self, x):
        frames = torch.ceil((x.shape[-1] - self.kernel_size) / self.stride).long() + 1
        return self.conv(F.pad(x, (0, int(frames * self.stride + self.kernel_size - x.shape[-1]))))


LEAF_MODULES = (PaddedConv,)


def build_model():
    return nn.Sequential(PaddedConv(), nn.ReLU(), PaddedConv(), nn.Flatten())


def example_inputs(batch_size):
    return (torch.randn(batch_size, 2, 15),)


def example_targets(batch_size):
    return torch.randn(batch_size, 8)


def loss_fn(output, target):
    return F.mse_loss(output, target)
"""


def test_a_leaf_module_that_sizes_by_its_integer_buffers_gets_their_values(tmp_path):
    """Built on the meta device, a leaf module's integer buffers hold no values: its CPU copy
    had them 0, and the compile failed (before, wrong output shapes). The frontend gives them the
    values build_model() gives them, so the stages, which call the module whole, compute the
    model's numbers at every batch size."""
    path = tmp_path / "padded.py"
    path.write_text(PADDED_BY_BUFFERS)
    folder = compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend="fx", batch_size=4)).folder
    for batch_size in (4, 3):
        report = check_pipeline(folder, batch_size=batch_size)
        assert report.ok, report.problems
    assert_local_trains_like_single(folder)


MASKED_ASSIGNMENT = """
import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.image = nn.Linear(3, 4)
        self.head = nn.Linear(4, 10)

    def forward(self, ids, mask, image):
        h = self.embed(ids)
        h[mask] = self.image(image).reshape(-1, 4)  # Kosmos-2 places its image embeddings so
        return self.head(torch.tanh(h))


def build_model():
    return Net()


def example_inputs(batch_size):
    mask = torch.zeros(batch_size, 6, dtype=torch.bool)
    mask[:, 1:3] = True
    return (torch.randint(0, 10, (batch_size, 6)), mask, torch.randn(batch_size, 2, 3))


def example_targets(batch_size):
    return torch.randint(0, 10, (batch_size, 6))


def loss_fn(output, target):
    return F.cross_entropy(output.flatten(0, 1), target.flatten())
"""


def test_an_assignment_through_a_boolean_mask_compiles_and_trains_exactly(tmp_path):
    """The gradient of `h[mask] = v` selects by the mask (nonzero), which the meta device cannot
    size: the analytic profile's backward count stopped the compile with an internal error
    (Kosmos-2). The backward is now estimated, and the stages compute the model's outputs and
    gradients."""
    path = tmp_path / "masked.py"
    path.write_text(MASKED_ASSIGNMENT)
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend="export"))
    assert check_pipeline(compiled.folder).ok



def test_a_module_that_sizes_by_its_integer_buffers_compiles_through_export(tmp_path):
    """Not kept whole, the buffers were inputs of torch.export's trace without values, and the pad
    computed from them failed to trace (GuardOnDataDependentSymNode). They now read as constants
    of their built values, so the stage code pads by numbers, which hold at every batch size."""
    path = tmp_path / "padded.py"
    path.write_text(PADDED_BY_BUFFERS.replace("LEAF_MODULES = (PaddedConv,)", ""))
    folder = compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend="export", batch_size=4)).folder
    text = "".join((folder / f"stage{k}.py").read_text() for k in range(2))
    assert "F.pad(input_, [0, 3])" in text and "F.pad(relu_1, [0, 2])" in text, text
    assert ".clone()" not in text  # export's copies of the constants, which nothing reads
    for batch_size in (4, 3):
        report = check_pipeline(folder, batch_size=batch_size)
        assert report.ok, report.problems
    assert_local_trains_like_single(folder)

COUNTED_PADDING = PADDED_BY_BUFFERS.replace("LEAF_MODULES = (PaddedConv,)", "").replace(
    "    return nn.Sequential(PaddedConv(), nn.ReLU(), PaddedConv(), nn.Flatten())",
    """    return Counted()


class Counted(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(PaddedConv(), nn.ReLU(), PaddedConv(), nn.Flatten())
        self.step = nn.Buffer(torch.tensor(0), persistent=False)  # a 0-d integer buffer too

    def forward(self, x):
        WRITE
        return self.body(x)""",
)


@pytest.mark.parametrize("write", ["self.step += 1", "self.step.add_(1)"])
def test_a_counter_beside_the_size_buffers_keeps_its_write(tmp_path, write):
    """The retry that reads 0-d integer buffers as constants read the step counter so too: the
    stage code added 1 to a fresh constant (the model's count was lost, and only `ftc check`
    found it), or `+=` failed on the constant ("property 'step' has no setter"). A buffer that
    forward writes stays a buffer, so the stages count as the model does."""
    path = tmp_path / "counted.py"
    path.write_text(COUNTED_PADDING.replace("WRITE", write))
    folder = compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend="export", batch_size=4)).folder
    text = "".join((folder / f"stage{k}.py").read_text() for k in range(2))
    assert "self.step.add_(1)" in text and "F.pad(x, [0, 3])" in text, text
    report = check_pipeline(folder, batch_size=4)
    assert report.ok, report.problems


def test_a_size_computed_from_a_counter_is_refused_by_name(tmp_path):
    path = tmp_path / "counted.py"
    path.write_text(COUNTED_PADDING.replace("WRITE", "self.step += 1\n        x = x[..., : x.shape[-1] + 1 - int(self.step)]"))
    with pytest.raises(FtcError) as caught:
        compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend="export", batch_size=4))
    assert "writes step (a counter)" in caught.value.message and "would drop that write" in caught.value.message
    assert "keep the counter (step) apart" in caught.value.hint


VALUE_SIZED_LEAF = """
import torch
import torch.nn as nn


class Trim(nn.Module):
    # keeps as many frames as the largest length says: its output size follows input values
    def forward(self, x, lengths):
        return x[:, : int(lengths.max()) + 1]


LEAF_MODULES = (Trim,)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.trim = Trim()
        self.b = nn.Linear(4, 4)

    def forward(self, x, lengths):
        return self.b(torch.relu(self.trim(self.a(x), lengths)))


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8, 4), torch.full((batch_size,), 5))
"""


def test_a_shape_the_compile_learned_from_stand_in_values_is_not_blamed_on_a_hand_edit(tmp_path):
    """A leaf whose output size follows its input values is sized at compile time on stand-in
    integers (6 frames at run time, 1 compiled): `ftc check` said to keep stage outputs as
    pipeline.json lists them or to recompile, which gives the same shapes again. For stages as
    ftc wrote them it says why the compiled shape differs and what to change; a hand-edited
    stage keeps the hand-edit fix."""
    path = tmp_path / "trim.py"
    path.write_text(VALUE_SIZED_LEAF)
    folder = compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend="fx", batch_size=4)).folder
    report = check_pipeline(folder, batch_size=4)
    text = "\n".join(report.problems)
    assert not report.ok and "value trim is float32[4, 6, 4], but pipeline.json says float32[4, 1, 4]" in text
    assert "stage0.py is as ftc wrote it, so recompiling gives the same shapes" in text
    assert "make the size independent of tensor values" in text and "or recompile" not in text
    stage = folder / "stage0.py"
    stage.write_text(stage.read_text() + "\n# edited\n")
    assert "keep stage outputs as pipeline.json lists them, or recompile" in "\n".join(check_pipeline(folder, batch_size=4).problems)
