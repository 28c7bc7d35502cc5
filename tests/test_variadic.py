"""A forward that takes a variable number of inputs (`forward(self, *features)`, `forward(self,
x, *extra, scale=2.0)`) was refused ("ftc needs named inputs"). The values that fill *args are
inputs named after it and their position (`features_0`, `features_1`, ...); forward's code that
counts, loops over, unpacks or indexes them traces to what the model computes, in both frontends,
and the pipeline trains as the model does."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from ftc.check import check_pipeline
from ftc.compiler import CompileOptions, compile_model
from ftc.frontends.fx import input_names
from ftc.ir import FtcError

from .conftest import MODELS, assert_local_trains_like_single

INPUTS = {
    "variadic_features": ["features_0", "features_1", "features_2"],
    "variadic_extra": ["x", "extra_0", "extra_1"],
}


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("model", sorted(INPUTS))
def test_a_variadic_forward_computes_and_trains_as_the_model(model, frontend, stages, tmp_path):
    compiled = compile_model(MODELS / f"{model}.py", tmp_path, CompileOptions(stages=stages, frontend=frontend))
    manifest = json.loads((compiled.folder / "pipeline.json").read_text())
    assert manifest["inputs"] == INPUTS[model]
    assert len(manifest["stages"]) == stages
    report = check_pipeline(compiled.folder, batch_size=4)
    assert report.ok, (report.problems, report.model_outputs, report.model_gradients)
    if stages == 3:
        assert_local_trains_like_single(compiled.folder)


def test_auto_traces_a_variadic_forward_with_fx(tmp_path):
    compiled = compile_model(MODELS / "variadic_extra.py", tmp_path / "auto", CompileOptions(stages=2))
    assert json.loads((compiled.folder / "ir.json").read_text())["frontend"] == "fx"
    assert json.loads((compiled.folder / "pipeline.json").read_text())["inputs"] == INPUTS["variadic_extra"]


class Clashing(nn.Module):
    def forward(self, extra_0, *extra, scale=2.0):
        return extra_0


def test_variadic_names_do_not_clash_with_forward_parameters():
    batch = tuple(torch.zeros(2) for _ in range(3))
    fed, defaults, variadic = input_names(Clashing(), batch)
    assert fed == ["extra_0", "extra_0_1", "extra_1"]
    assert variadic == ["extra_0_1", "extra_1"]
    assert defaults == {"scale": 2.0}


class KeywordWithoutDefault(nn.Module):
    def forward(self, x, *extra, scale):
        return x * scale


def test_a_variadic_forward_given_a_dict_or_lacking_a_keyword_is_refused_naming_the_fix():
    with pytest.raises(FtcError) as error:
        input_names(Clashing(), {"extra_0": torch.zeros(2)})
    assert "gives a dict (keyword inputs), but forward takes *extra" in error.value.message
    assert "return a tuple from example_inputs()" in error.value.hint and "extra_0, *extra" in error.value.hint
    with pytest.raises(FtcError) as error:
        input_names(KeywordWithoutDefault(), (torch.zeros(2), torch.zeros(2)))
    assert "forward parameter 'scale' has no default" in error.value.message
    assert "give 'scale' a default in forward" in error.value.hint


MISMATCHED = """
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, *features):
        return sum(self.a(f) for f in features)


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 4), torch.randn(batch_size, 5))
"""


def test_a_variadic_forward_that_fails_on_its_inputs_names_each_of_them(tmp_path):
    path = tmp_path / "mismatched.py"
    path.write_text(MISMATCHED)
    with pytest.raises(FtcError) as error:
        compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend="export", batch_size=4))
    assert "mismatched.py:12" in error.value.message
    assert "example_inputs() gives (features_0 [4, 4], features_1 [4, 5])" in error.value.hint
