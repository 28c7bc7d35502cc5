"""Code in forward that changes gradients: a custom torch.autograd.Function (both tracers record
its forward's ops, not its backward; fx even under the no_grad that Function.apply sets) and a
gradient hook on a tensor (`h.register_hook(fn)`, which fx dropped as an op without users and
export did not record). The stages would train with other gradients than the model, silently at
compile time. The compile must refuse each by name; the workaround it names (a LEAF_MODULES
module that does it, kept whole by fx) must give the model's gradients."""

from __future__ import annotations

import pytest
import torch
from ftc.check import check_pipeline
from ftc.compiler import CompileOptions, compile_model
from ftc.frontends.gradient_code import GLOBAL_HOOKS
from ftc.ir import FtcError

MODEL = """
import torch
import torch.nn as nn


class HalfGradient(torch.autograd.Function):
    # A straight-through estimator: forward clamps, backward passes half the gradient on.
    @staticmethod
    def forward(ctx, x):
        return x.clamp(-0.5, 0.5)

    @staticmethod
    def backward(ctx, grad):
        return grad * 0.5


class Clamp(nn.Module):
    def forward(self, x):
        return HalfGradient.apply(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(4)])
        self.clamp = Clamp()

    def forward(self, x):
        for layer in self.layers:
            x = CALL
        return x


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""


@pytest.mark.parametrize("frontend", ["auto", "export"])
def test_a_custom_function_in_forward_is_refused_by_name(frontend, tmp_path):
    path = tmp_path / "ste.py"
    path.write_text(MODEL.replace("CALL", "HalfGradient.apply(layer(x))"))
    with pytest.raises(FtcError) as caught:
        compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend=frontend))
    assert "custom autograd.Function HalfGradient at ste.py:" in caught.value.message
    assert "LEAF_MODULES" in caught.value.hint


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_gradient_hook_in_forward_is_refused_by_name(frontend, tmp_path):
    path = tmp_path / "hooked.py"
    path.write_text(MODEL.replace("CALL", "torch.tanh(layer(x))\n            x.register_hook(lambda grad: grad * 0.1)"))
    with pytest.raises(FtcError) as caught:
        compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend=frontend))
    assert "forward calls Tensor.register_hook at hooked.py:" in caught.value.message
    assert "LEAF_MODULES" in caught.value.hint


def test_a_custom_function_in_a_leaf_module_keeps_its_backward(tmp_path):
    path = tmp_path / "ste_leaf.py"
    path.write_text(MODEL.replace("CALL", "self.clamp(layer(x))") + "\nLEAF_MODULES = (Clamp,)\n")
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend="fx"))
    assert check_pipeline(compiled.folder, batch_size=4).ok
    # ftc check compares the stages' gradients with the original model's, where the Function's
    # backward halves them at each clamp; the stage code calls the leaf module whole.
    assert all("self.clamp(" in (compiled.folder / f"stage{k}.py").read_text() for k in range(2))


PENALTY = """
import torch
import torch.nn as nn


class Penalized(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x):
        x = x if x.requires_grad else x.requires_grad_(True)
        y = self.f(x)
        (grad,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        return y.squeeze(-1), grad.norm(dim=-1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.penalized = Penalized()
        self.post = nn.Linear(1, 1)

    def forward(self, x):
        y, penalty = self.penalized(torch.tanh(self.pre(x)))
        return self.post(y.unsqueeze(-1)).squeeze(-1), penalty


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 4),)
"""


@pytest.mark.parametrize("frontend", ["auto", "export"])
def test_a_backward_pass_in_forward_is_refused_by_name(frontend, tmp_path):
    # A gradient penalty (torch.autograd.grad with create_graph=True) in forward: fx recorded the
    # call as one op and profiling then stopped with "internal error: RuntimeError: The
    # differentiated Tensor at index 0 appears to not have been used in the graph".
    path = tmp_path / "penalty.py"
    path.write_text(PENALTY)
    with pytest.raises(FtcError) as caught:
        compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend=frontend))
    assert "forward calls torch.autograd.grad at penalty.py:14" in caught.value.message
    assert "LEAF_MODULES" in caught.value.hint


def test_a_backward_pass_in_a_leaf_module_keeps_the_models_gradients(tmp_path):
    path = tmp_path / "penalty_leaf.py"
    path.write_text(PENALTY + "\nLEAF_MODULES = (Penalized,)\n")
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend="fx"))
    assert check_pipeline(compiled.folder, batch_size=4).ok


LIBRARY = """
import torch


class Halve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        return grad * 0.5


class LibraryGelu(torch.nn.Module):
    def forward(self, x):
        return Halve.apply(torch.nn.functional.gelu(x))
"""

LIBRARY_MODEL = """
import sys

import torch

sys.path.insert(0, LIBRARY_DIR)
from halving_library import LibraryGelu


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.act = LibraryGelu()
        self.b = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.act(self.a(x)))


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 4),)
"""


def test_a_custom_function_applied_by_a_library_names_the_librarys_module_and_line(tmp_path):
    # transformers' BLOOM applies its GeLUFunction inside BloomGelu: the refusal said only
    # "at hf_bloom.py:" (no line of the model's own code makes the call) and its fix, a
    # LEAF_MODULES class, cannot help where fx cannot trace the model (transformers 5).
    library, model = tmp_path / "lib", tmp_path / "model"
    library.mkdir()
    model.mkdir()
    (library / "halving_library.py").write_text(LIBRARY)
    path = model / "uses_library.py"
    path.write_text(LIBRARY_MODEL.replace("LIBRARY_DIR", repr(str(library))))
    with pytest.raises(FtcError) as caught:
        compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend="export"))
    assert "custom autograd.Function Halve at uses_library.py:" in caught.value.message
    assert "(in halving_library.LibraryGelu at " in caught.value.message
    assert "halving_library.py:17)" in caught.value.message
    assert "replace halving_library.LibraryGelu in build_model()" in caught.value.hint



def test_a_model_file_subclass_of_the_library_module_is_named_by_the_model_files_name(tmp_path):
    """A model-file subclass of a library module (as a cure of I-BERT's QuantAct subclasses it)
    whose library forward applies the Function was named by ftc's alias of the model file,
    `ftc_model_file.uses_library_<digest>.Mine`."""
    library, model = tmp_path / "lib", tmp_path / "model"
    library.mkdir()
    model.mkdir()
    (library / "halving_library.py").write_text(LIBRARY)
    path = model / "uses_library.py"
    path.write_text(LIBRARY_MODEL.replace("LIBRARY_DIR", repr(str(library))).replace(
        "self.act = LibraryGelu()", "self.act = Mine()") + "\n\nclass Mine(LibraryGelu):\n    pass\n")  # fmt: skip
    with pytest.raises(FtcError) as caught:
        compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend="export"))
    assert "(in uses_library.Mine at " in caught.value.message
    assert "replace uses_library.Mine in build_model()" in caught.value.hint

SAVED_CHANGE = """
import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.cls = nn.Parameter(torch.randn(16))
        self.hidden = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        a = self.inp(x)
        a.relu_()
        a.add_(self.cls)
        for layer in self.hidden:
            a = torch.tanh(layer(a))
        return self.out(a.mean(1))


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 5, 8),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
"""


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_an_in_place_change_of_a_value_saved_for_the_backward_is_named_when_compiling(frontend, tmp_path):
    """relu_ saves its result, which add_ then changes: the model's own backward
    fails (plain PyTorch says so only once backward runs); the compile names both lines. The same
    model changing a clone trains."""
    path = tmp_path / "saved_change.py"
    path.write_text(SAVED_CHANGE)
    model = {}
    exec(compile(SAVED_CHANGE, str(path), "exec"), model)
    net, x = model["build_model"](), model["example_inputs"](2)[0]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        net(x).sum().backward()  # the truth: plain PyTorch
    with pytest.raises(FtcError) as info:
        compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend=frontend))
    assert "(saved_change.py:18) changes in place a value that node" in info.value.message
    assert "(saved_change.py:17) saved for its backward" in info.value.message
    assert "out of place" in info.value.hint
    path.write_text(SAVED_CHANGE.replace("a.relu_()", "a = a.relu().clone()"))
    folder = compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend=frontend, force=True)).folder
    assert check_pipeline(folder).ok


SAVED_BY_A_DROPPED_CALL = """
import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.probe = nn.Linear(16, 4)
        self.act = nn.ReLU(inplace=True)
        self.c = nn.Linear(16, 3)

    def forward(self, x):
        h = self.a(x)
        self.probe(h)
        self.act(h)
        return self.c(h)


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
"""


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_change_of_a_value_only_a_dropped_call_saved_is_no_error(frontend, tmp_path):
    """probe's value is dropped, so no backward reaches it and ReLU(inplace=True)'s change of the
    input it saved is harmless: plain PyTorch trains the model, and the compile refused it, saying
    that the model's backward would fail."""
    from .conftest import assert_local_trains_like_single

    path = tmp_path / "saved_by_dropped.py"
    path.write_text(SAVED_BY_A_DROPPED_CALL)
    model = {}
    exec(compile(SAVED_BY_A_DROPPED_CALL, str(path), "exec"), model)
    net, x = model["build_model"](), model["example_inputs"](2)[0]
    net(x).sum().backward()  # the truth: plain PyTorch runs the backward
    folder = compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend=frontend)).folder
    assert check_pipeline(folder).ok
    assert_local_trains_like_single(folder)


BACKWARD_HOOKED = """
import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.linear(x))


def amplify(module, grad_input, grad_output):
    return (grad_input[0] * 10.0,)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(4)])
        self.blocks[1].register_full_backward_hook(amplify)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_backward_hook_on_a_module_traced_through_is_refused_by_name(frontend, tmp_path):
    # Both tracers record the hooked block's ops and drop its hook (fx only warned that the
    # output was a Proxy): the compile passed and the stages trained with 10 times smaller
    # gradients below the block.
    path = tmp_path / "backward_hooked.py"
    path.write_text(BACKWARD_HOOKED)
    with pytest.raises(FtcError) as caught:
        compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend=frontend))
    assert "module blocks.1 (Block) has backward hooks (amplify (backward_hooked.py:15))" in caught.value.message
    assert "LEAF_MODULES" in caught.value.hint


def test_a_backward_hook_on_a_leaf_module_keeps_the_models_gradients(tmp_path):
    path = tmp_path / "backward_hooked_leaf.py"
    path.write_text(BACKWARD_HOOKED + "\nLEAF_MODULES = (Block,)\n")
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend="fx"))
    # ftc check compares the stages' gradients with the original model's, where the hook
    # amplifies them below blocks.1; the stage code calls the block, and so its hook.
    assert check_pipeline(compiled.folder, batch_size=4).ok


HOOKED_EVERYWHERE = """
import torch
import torch.nn as nn


def halve(module, inputs, output):
    if isinstance(module, (Block, Net)):
        return output * 0.5
    return None


def count_gradients(module, grad_input, grad_output):
    module.backward_calls = getattr(module, "backward_calls", 0) + 1


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return torch.tanh(self.norm(self.linear(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(4)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def build_model():
    model = Net()
    REGISTER
    return model


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""


@pytest.fixture
def global_hooks_restored():
    """The model file registers its global hook in this process; later tests must not run it."""
    registry = torch.nn.modules.module
    tables = [getattr(registry, table) for _, table, _ in GLOBAL_HOOKS]
    saved = [dict(table) for table in tables]
    yield
    for table, entries in zip(tables, saved):
        table.clear()
        table.update(entries)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize(("register", "per_module"), [
    ("torch.nn.modules.module.register_module_forward_hook(halve)", "register_forward_hook(halve)"),
    ("torch.nn.modules.module.register_module_full_backward_hook(count_gradients)",
     "register_full_backward_hook(count_gradients)"),
])  # fmt: skip
def test_a_global_module_hook_is_refused_by_name(frontend, register, per_module, tmp_path, global_hooks_restored):
    # fx recorded the hook inside the blocks it traced into and dropped it on the model itself;
    # export's stages ran it once more on the layers they call whole; and ftc check, which then
    # imported the model file once per batch size, ran it twice on the original model: wrong
    # values either way.
    path = tmp_path / "global_hook.py"
    path.write_text(HOOKED_EVERYWHERE.replace("REGISTER", register))
    with pytest.raises(FtcError) as caught:
        compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend=frontend))
    function = register.split(".")[-1].split("(")[0]
    assert f"{function} registered the global hook " in caught.value.message
    assert "(global_hook.py:" in caught.value.message
    assert f"module.{per_module}" in caught.value.hint


def test_forward_hooks_on_every_module_keep_the_models_outputs_and_gradients(tmp_path):
    # The fix the refusal names. fx traced the model's forward, not its call, and so dropped the
    # hook on the model itself (outputs 2x the model's); auto now takes export, which records it.
    path = tmp_path / "hooked_modules.py"
    path.write_text(HOOKED_EVERYWHERE.replace("REGISTER", "for module in model.modules():\n        module.register_forward_hook(halve)"))
    with pytest.raises(FtcError) as caught:
        compile_model(path, tmp_path / "fx", CompileOptions(stages=2, frontend="fx"))
    assert "fx does not record the model's own forward hooks (halve (hooked_modules.py:6))" in caught.value.message
    compiled = compile_model(path, tmp_path / "auto", CompileOptions(stages=2))
    assert compiled.graph.frontend == "export"
    assert check_pipeline(compiled.folder, batch_size=4).ok


def test_a_custom_function_in_a_leaf_module_under_export_names_the_frontend_as_the_fix(tmp_path):
    # The hint said to list a module's class in LEAF_MODULES, where the class was listed already:
    # export traces into it, fx keeps it whole.
    path = tmp_path / "ste_leaf.py"
    path.write_text(MODEL.replace("CALL", "self.clamp(layer(x))") + "\nLEAF_MODULES = (Clamp,)\n")
    with pytest.raises(FtcError) as caught:
        compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend="export"))
    assert "custom autograd.Function HalfGradient at ste_leaf.py:" in caught.value.message
    assert caught.value.hint.startswith("Clamp is in LEAF_MODULES already") and "--frontend fx or auto" in caught.value.hint
