"""Code in forward that changes gradients: a custom torch.autograd.Function (both tracers record
its forward's ops, not its backward; fx even under the no_grad that Function.apply sets) and a
gradient hook on a tensor (`h.register_hook(fn)`, which fx dropped as an op without users and
export did not record). The stages would train with other gradients than the model, silently at
compile time. The compile must refuse each by name; the workaround it names (a LEAF_MODULES
module that does it, kept whole by fx) must give the model's gradients."""

from __future__ import annotations

import pytest
from ftc.check import check_pipeline
from ftc.compiler import CompileOptions, compile_model
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
