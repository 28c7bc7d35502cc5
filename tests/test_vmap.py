"""torch.vmap in forward (found in an unseen-model sweep). torch.fx cannot trace it (vmap refuses a
Proxy); torch.export records functorch's batching ops (`_vmap_increment_nesting(8, ...)`,
`_add_batch_dim`, `_remove_batch_dim`) with the batch size fixed, which ftc wrote into the IR, and
the meta run then stopped with "node 'matmul' failed on the meta device: Cannot access storage of
BatchedTensorImpl" and a fix saying forward fails in plain PyTorch, which it does not. The compile
must name the vmap call and its line; the workaround it names (a LEAF_MODULES module that calls
vmap, kept whole by fx) must compute the model's outputs and gradients."""

from __future__ import annotations

import pytest
from ftc.check import check_pipeline
from ftc.compiler import CompileOptions, compile_model
from ftc.ir import FtcError

MODEL = """
import torch
import torch.nn as nn


class PerSample(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6) * 0.3)

    def forward(self, x):
        return torch.vmap(lambda v: torch.tanh(self.w @ v) + v.outer(v).sum(0) * 0.01)(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 6)
        self.per_sample = PerSample()
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.per_sample(torch.relu(self.inp(x))))


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 6),)
"""


@pytest.mark.parametrize("frontend", ["auto", "export"])
def test_vmap_in_forward_is_refused_by_name(frontend, tmp_path):
    path = tmp_path / "mapped.py"
    path.write_text(MODEL)
    with pytest.raises(FtcError) as caught:
        compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend=frontend))
    assert "forward calls torch.vmap (torch.func) at mapped.py:12" in caught.value.message
    assert "LEAF_MODULES" in caught.value.hint


def test_vmap_in_a_leaf_module_computes_the_model(tmp_path):
    path = tmp_path / "mapped_leaf.py"
    path.write_text(MODEL + "\nLEAF_MODULES = (PerSample,)\n")
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend="auto"))
    assert "self.per_sample(" in "".join((compiled.folder / f"stage{k}.py").read_text() for k in range(2))
    assert check_pipeline(compiled.folder).ok
