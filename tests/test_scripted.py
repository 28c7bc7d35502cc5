"""A torch.jit.script'ed submodule with parameters: fx cannot trace into TorchScript (it failed
on the module's `_c` attribute), so it is kept whole like a torch.nn layer. `ftc check` copies
the model, and deepcopy gives a ScriptModule parameters that are not leaves, which then got no
gradients (a false failure). Compile, check and local training against mode single."""

from __future__ import annotations

import pytest

from ftc.check import check_pipeline
from ftc.compiler import CompileOptions, compile_model
from ftc.ir import FtcError

from .conftest import assert_local_trains_like_single

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

MODEL = """
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 8)

    def forward(self, x):
        return x * torch.sigmoid(self.gate(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(4)])
        self.gates = nn.ModuleList([torch.jit.script(Gated()) for _ in range(4)])

    def forward(self, x):
        for layer, gate in zip(self.layers, self.gates):
            x = gate(layer(x))
        return x


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
"""


def test_a_scripted_submodule_compiles_checks_and_trains(tmp_path):
    path = tmp_path / "scripted.py"
    path.write_text(MODEL)
    folder = compile_model(path, tmp_path / "generated", CompileOptions(stages=2, frontend="fx")).folder
    assert 'self.gates["3"](' in (folder / "stage1.py").read_text()
    assert check_pipeline(folder, batch_size=4).ok
    assert_local_trains_like_single(folder)


def test_save_memory_mode_names_a_scripted_submodule(tmp_path):
    """Measuring one module at a time moves its weights off the meta device with to_empty, which
    TorchScript refuses: an error naming the module, not an internal error."""
    path = tmp_path / "scripted.py"
    path.write_text(MODEL)
    options = CompileOptions(stages=2, frontend="fx", profile="measure", save_memory=True, cache=False)
    with pytest.raises(FtcError) as caught:
        compile_model(path, tmp_path / "generated", options)
    assert "cannot measure gates.0 alone: it is a TorchScript module" in caught.value.message
    assert "--save-memory" in caught.value.hint


def test_export_names_the_scripted_submodules_it_cannot_trace(tmp_path):
    path = tmp_path / "scripted.py"
    path.write_text(MODEL)
    with pytest.raises(FtcError) as caught:
        compile_model(path, tmp_path / "generated", CompileOptions(stages=2, frontend="export"))
    assert "torch.export cannot trace TorchScript submodules ('gates.0', 'gates.1', 'gates.2', 'gates.3'): TypeError" in caught.value.message
    assert "--frontend fx" in caught.value.hint
