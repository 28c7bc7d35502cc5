"""Values are named after the variables the model's source assigns them to; an item a statement
takes on the way (`x.shape[0]`) is not one of the items its tuple target unpacks."""

from __future__ import annotations

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
