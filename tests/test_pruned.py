"""A model pruned with torch.nn.utils.prune holds `weight` as a plain attribute computed from
`weight_orig` and the mask (a non-leaf tensor), which copy.deepcopy refuses: `ftc check`, which
compares the stages with copies of the model, and measuring in save-memory mode, which copies
the meta model's layers, stopped with an internal error."""

from __future__ import annotations

from ftc.check import check_pipeline
from ftc.compiler import CompileOptions, compile_model

MODEL = """
import torch
import torch.nn as nn
from torch.nn.utils import prune


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(4)])
        prune.random_unstructured(self.layers[1], "weight", amount=0.5)
        prune.l1_unstructured(self.layers[2], "bias", amount=0.25)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""


def test_a_pruned_model_checks_against_itself(tmp_path):
    path = tmp_path / "pruned.py"
    path.write_text(MODEL)
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=2))
    report = check_pipeline(compiled.folder, batch_size=4)  # outputs and gradients against the model's
    assert report.ok, report


def test_a_pruned_model_is_measured_one_layer_at_a_time(tmp_path):
    """Save-memory mode copies each layer off the meta model to time it: the same refusal."""
    path = tmp_path / "pruned.py"
    path.write_text(MODEL)
    options = CompileOptions(stages=2, profile="measure", save_memory=True, cache=False)
    compiled = compile_model(path, tmp_path / "out", options)
    assert check_pipeline(compiled.folder, batch_size=4).ok
