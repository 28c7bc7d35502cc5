"""State that an op writes inside itself (Node.updates: a leaf BatchNorm's running statistics,
F.batch_norm's in training mode, an Embedding's max_norm rows) is found on the meta device, and
the partitioner keeps every reader of it with the writes, so that no device trains a copy that
misses an update: the truth is single-process training's losses and final state, buffers too."""

from __future__ import annotations

import json

import pytest
import torch

from ftc.frontends import trace
from ftc.ir import FtcError
from ftc.runtime import checkpoint, load_model_file
from ftc.runtime.config import load_config
from ftc.runtime.train import train

from .conftest import EXAMPLES, MODELS

pytestmark = pytest.mark.usefixtures("one_thread")

TIED_MAX_NORM = '''
import torch
import torch.nn as nn
import torch.nn.functional as F


class TiedMaxNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 16, max_norm=1.0)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(5))

    def forward(self, idx):
        h = self.emb(idx)
        for layer in self.layers:
            h = torch.tanh(layer(h)) + h
        return F.linear(h, self.emb.weight)


def build_model():
    return TiedMaxNorm()


def example_inputs(batch_size):
    return (torch.randint(0, 64, (batch_size, 5)),)


def loss_fn(output, target):
    return F.cross_entropy(output.flatten(0, 1), target.flatten())
'''


def test_every_batch_norm_call_records_the_statistics_it_updates():
    """ResNet's BatchNorms share shapes and settings, so most calls are repeats that the meta run
    replays (ftc/repeats.py): each still names its own buffers."""
    graph = trace(load_model_file(EXAMPLES / "resnet.py"), 4).graph
    norms = [node for node in graph.nodes if node.op == "call_module" and graph.modules[node.target].endswith("BatchNorm2d")]
    assert len(norms) > 4
    for node in norms:
        assert node.updates == sorted(f"{node.target}.{b}" for b in ("running_mean", "running_var", "num_batches_tracked"))
    assert all(not node.updates for node in graph.nodes if node not in norms)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_shared_batch_norm_trains_like_the_model(frontend, compile_to, tmp_path):
    folder = compile_to(MODELS / "shared_norm.py", 2, frontend=frontend)
    manifest = json.loads((folder / "pipeline.json").read_text())
    holders = [stage["index"] for stage in manifest["stages"] if "norm.running_mean" in stage["state"]]
    assert len(holders) == 1, holders
    runs = {}
    for mode in ("single", "local"):
        config = load_config(data={
            "pipeline": str(folder), "data": {"name": "synthetic", "size": 32}, "mode": mode, "steps": 3,
            "batch_size": 8, "micro_batches": 2, "optimizer": {"name": "adam", "lr": 0.01}, "log_every": 10,
            "checkpoint": {"dir": str(tmp_path / mode)},
        })  # fmt: skip
        runs[mode] = (train(config).loss, checkpoint.merge(tmp_path / mode)[1])
    torch.testing.assert_close(torch.tensor(runs["local"][0]), torch.tensor(runs["single"][0]), rtol=1e-5, atol=0)
    truth = runs["single"][1]
    for key in ("norm.running_mean", "norm.running_var", "norm.num_batches_tracked"):
        torch.testing.assert_close(runs["local"][1][key], truth[key], rtol=1e-5, atol=1e-7)
    assert truth["norm.num_batches_tracked"].item() == 3 * 2 * 2  # steps x micro-batches x calls


def test_a_tied_weight_that_max_norm_renormalizes_is_refused_naming_it(compile_to, tmp_path):
    """The head's copy of the embedding would miss the renormalization (training drifted 1e-2
    from the model's before), and the weight is read at both ends: no cut is possible."""
    model = tmp_path / "tied_max_norm.py"
    model.write_text(TIED_MAX_NORM)
    with pytest.raises(FtcError) as info:
        compile_to(model, 2, frontend="fx")
    assert "at most 1 stages are possible" in info.value.message
    assert "emb.weight is changed in place by forward (self.emb(...) at tied_max_norm.py:14)" in info.value.message
    assert "untie" in info.value.hint


SHARED_VALUE_READING_LEAF = '''
import torch
import torch.nn as nn
import torch.nn.functional as F


class Gate(nn.Module):
    """Reads values (its branch), so the meta device cannot run it: ftc runs a CPU copy."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(32)

    def forward(self, x):
        return self.norm(x) if bool(x.abs().sum() > 0) else x


LEAF_MODULES = (Gate,)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.gate = Gate()
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(6))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        h = self.gate(self.inp(x))
        for layer in self.layers:
            h = torch.relu(layer(h))
        return self.head(self.gate(h))


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 16),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
'''


def test_a_value_reading_leaf_run_on_the_cpu_records_its_writes(compile_to, tmp_path):
    """The meta device cannot run Gate, so ftc runs a CPU copy of it (interpreter.run_on_cpu):
    its BatchNorm's writes land in the copy's buffers, which still name the model's."""
    model = tmp_path / "gate.py"
    model.write_text(SHARED_VALUE_READING_LEAF)
    graph = trace(load_model_file(model), 4, frontend="fx").graph
    gates = [node for node in graph.nodes if node.op == "call_module" and node.target == "gate"]
    assert len(gates) == 2
    for node in gates:
        assert node.updates == ["gate.norm.num_batches_tracked", "gate.norm.running_mean", "gate.norm.running_var"]
    folder = compile_to(model, 2, frontend="fx")
    manifest = json.loads((folder / "pipeline.json").read_text())
    assert len([stage for stage in manifest["stages"] if "gate.norm.running_mean" in stage["state"]]) == 1
