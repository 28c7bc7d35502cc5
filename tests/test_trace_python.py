"""Python in forward that a tracer runs once, at compile time: draws from Python's and NumPy's
random generators (their outcome is fixed in the stage code: the same in every compile, and the
compile says so) and forward's constant options (their defaults are baked into the stage code)."""

from __future__ import annotations

import random

import numpy
import pytest

from ftc.check import check_pipeline
from ftc.compiler import CompileOptions, compile_model

DRAWS = """
import random

import numpy
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x) * SCALE
        return self.b(h)


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 4),)
"""
SCALES = {
    "python": ("random.randint(1, 10**6)", "Python's random module"),
    "numpy": ("int(numpy.random.randint(1, 10**6))", "NumPy's random module"),
}


def compiled_stages(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.glob("stage*.py"))}


@pytest.mark.parametrize("generator", sorted(SCALES))
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_draw_in_forward_is_the_same_in_every_compile_and_named(generator, frontend, tmp_path):
    scale, name = SCALES[generator]
    path = tmp_path / "draws.py"
    path.write_text(DRAWS.replace("SCALE", scale))
    compiles = []
    for seed in (1, 2):  # whatever state the caller left the generators in
        random.seed(seed)
        numpy.random.seed(seed)
        states = random.getstate(), numpy.random.get_state()[1].tobytes()
        compiled = compile_model(path, tmp_path / f"out{seed}", CompileOptions(stages=2, frontend=frontend))
        assert (random.getstate(), numpy.random.get_state()[1].tobytes()) == states  # restored after tracing
        (note,) = [note for note in compiled.notes if "while tracing" in note]
        assert f"forward draws from {name} while tracing" in note and "torch's random ops" in note
        compiles.append(compiled_stages(compiled.folder))
    assert compiles[0] == compiles[1]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_forward_without_draws_gets_no_note(frontend, tmp_path):
    path = tmp_path / "steady.py"
    path.write_text(DRAWS.replace("SCALE", "2.0"))
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend=frontend))
    assert not [note for note in compiled.notes if "draws" in note], compiled.notes


OPTIONS = """
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x, scale=(1.5, 2.0), nothing=(), opts={"shift": 3.0, "pair": (0.5, 0.25)}, mask=None):
        h = torch.tanh(self.a(x)) * scale[0] + scale[1] + len(nothing)
        h = h * opts["pair"][0] - opts["shift"] * opts["pair"][1]
        return self.b(h if mask is None else h * mask)


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""


def test_fx_bakes_in_tuple_and_dict_defaults_of_forward(tmp_path):
    """fx makes one placeholder per leaf of a default it is given (two for a pair, none for an
    empty tuple); reading them as one per parameter ran past forward's (StopIteration)."""
    path = tmp_path / "options.py"
    path.write_text(OPTIONS)
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend="fx"))
    assert compiled.graph.inputs == ["x"]
    code = "".join(stage.decode() for stage in compiled_stages(compiled.folder).values())
    assert "* 1.5" in code and "+ 2.0" in code and "* 0.5" in code
    assert check_pipeline(compiled.folder, batch_size=4).ok


SIZE_AS_TENSOR = """
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        scale = torch.tensor(h.shape[-1])
        return self.b(h / scale.sqrt())


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""


def test_fx_records_torch_tensor_of_a_traced_size_as_written(tmp_path):
    """`torch.tensor(h.shape[-1])` under --frontend fx failed with fx's TypeError
    ("`__cuda_array_interface__` must be a dict": torch.tensor read the Proxy as an array); fx now
    records the call, and the stages compute what the model computes."""
    path = tmp_path / "sized.py"
    path.write_text(SIZE_AS_TENSOR)
    folder = compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend="fx")).folder
    text = "".join((folder / f"stage{k}.py").read_text() for k in range(2))
    assert "torch.tensor(size)" in text, text
    assert check_pipeline(folder, batch_size=4).ok
