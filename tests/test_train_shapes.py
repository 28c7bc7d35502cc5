"""Training models whose values are shaped unlike [batch, ...]: a local-mode pipeline must give
plain single-process training's losses (mode single, the truth) on each.

- `folded`: the batch folded into another dimension ([B*T, D]) crosses the stage boundary;
- `shared_inputs`: keyword inputs without a batch dimension (position ids [1, T], a 0-dim
  temperature) that every micro-batch takes whole, and the same tensor returned twice;
- `sequence_first`: the input is [T, B, D], batch in dimension 1 (nn.MultiheadAttention's
  default layout), at a batch size equal to T (8), where stacking on the wrong dimension would
  still run;
- `mutated_input`: forward changes its input in place (`x.mul_`) and reads it again later, so
  every reader of the input must share the mutating op's stage and every micro-batch must be its
  own tensor;
- `sequence_first_output`: the output and its targets are [T, B, D] (T = 5), so targets must be
  stacked and split along dimension 1 as example_targets lays them out;
- `batchless_output`: one fixed graph of N nodes ([N, F] in, [N, C] out, no batch dimension
  anywhere; GNN-style), whose synthetic targets, shaped like the output, go whole to every
  micro-batch;
- `value_reading_leaf`: a LEAF_MODULES block that branches on a tensor's value and no
  example_targets, so synthetic targets must come from pipeline.json's output shapes, not from
  running the model on the meta device;
- `language_model`: logits [B, T, V] and a cross-entropy over flattened tokens, without
  example_targets: synthetic targets must be token ids [B, T], as the loss takes them, not
  numbers shaped like the logits;
- `returned_state`: forward returns a parameter, a buffer and a tensor made in forward as they
  are (`return h, self.temperature, ...`), an input no layer reads is given, and an input is
  returned as an output.
- `list_output`: forward returns a list (deep supervision: every block's prediction), and
  loss_fn uses it as one (`heads.pop()`), so the stages must hand loss_fn a list, not a tuple.

`ftc check` must pass on each, too.
"""

from __future__ import annotations

import pytest
import torch

from ftc.check import check_pipeline
from ftc.compiler import CompileOptions, compile_model
from ftc.runtime.config import load_config
from ftc.runtime.pipeline import load_pipeline
from ftc.runtime.train import train

HEADER = """
import torch
import torch.nn as nn
import torch.nn.functional as F

T, D = 8, 16
"""

MODELS = {
    "folded": """
class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(*[nn.Linear(D, D) for _ in range(3)])
        self.b = nn.Sequential(*[nn.Linear(D, D) for _ in range(3)])

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.reshape(-1, D)))).view(-1, T, D)


def example_inputs(batch_size):
    return (torch.randn(batch_size, T, D),)


def example_targets(batch_size):
    return torch.randn(batch_size, T, D)


def loss_fn(output, target):
    return F.mse_loss(output, target)
""",
    "shared_inputs": """
class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, D)
        self.position = nn.Embedding(T, D)
        self.layers = nn.ModuleList([nn.Linear(D, D) for _ in range(4)])
        self.head = nn.Linear(D, 32)

    def forward(self, ids, position_ids, temperature):
        x = self.embed(ids) + self.position(position_ids)
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        logits = self.head(x) / temperature
        return logits, logits


def example_inputs(batch_size):
    return {"ids": torch.randint(0, 32, (batch_size, T)), "position_ids": torch.arange(T).unsqueeze(0),
            "temperature": torch.tensor(2.0)}


def example_targets(batch_size):
    return torch.randint(0, 32, (batch_size, T))


def loss_fn(output, target):
    first, second = output
    return F.cross_entropy(first.reshape(-1, 32), target.reshape(-1)) + second.square().mean()
""",
    "sequence_first": """
class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(D, 2)
        self.layers = nn.ModuleList([nn.Linear(D, D) for _ in range(3)])

    def forward(self, x):
        x = x + self.attention(x, x, x, need_weights=False)[0]
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return x.mean(0)


def example_inputs(batch_size):
    return (torch.randn(T, batch_size, D),)


def example_targets(batch_size):
    return torch.randn(batch_size, D)


def loss_fn(output, target):
    return F.mse_loss(output, target)
""",
    "mutated_input": """
class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        x.mul_(0.5)
        h = self.b(F.relu(self.a(x)))
        return self.d(F.relu(self.c(h + x)))


def example_inputs(batch_size):
    return (torch.randn(batch_size, D),)


def example_targets(batch_size):
    return torch.randn(batch_size, D)


def loss_fn(output, target):
    return F.mse_loss(output, target)
""",
    "sequence_first_output": """
class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(D, D) for _ in range(4)])

    def forward(self, x):
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return x


def example_inputs(batch_size):
    return (torch.randn(5, batch_size, D),)


def example_targets(batch_size):
    return torch.randn(5, batch_size, D)


def loss_fn(output, target):
    return F.mse_loss(output, target)
""",
    "batchless_output": """
N = 12


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("edges", torch.arange(N).roll(1))
        self.layers = nn.ModuleList([nn.Linear(D, D) for _ in range(4)])
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        for layer in self.layers:
            x = x + torch.tanh(layer(x + x[self.edges]))
        return self.head(x)


def example_inputs(batch_size):
    return (torch.randn(N, D),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
""",
    "value_reading_leaf": """
class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.small, self.large = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        if x.abs().mean() > 10:
            return self.large(x)
        return torch.tanh(self.small(x))


LEAF_MODULES = (Gate,)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)
        self.gate = Gate()

    def forward(self, x):
        return self.b(self.gate(torch.tanh(self.a(x))))


def example_inputs(batch_size):
    return (torch.randn(batch_size, D),)


def loss_fn(output, target):
    return F.mse_loss(output, target)
""",
    "language_model": """
V = 11


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.layers = nn.ModuleList([nn.Linear(D, D) for _ in range(3)])
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        x = self.embed(idx)
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return self.head(x)


def example_inputs(batch_size):
    return (torch.randint(0, V, (batch_size, T)),)


def loss_fn(output, target):
    return F.cross_entropy(output.reshape(-1, V), target.reshape(-1))
""",
    "returned_state": """
class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(D, D) for _ in range(4)])
        self.temperature = nn.Parameter(torch.tensor(1.5))
        self.register_buffer("center", torch.full((D,), 0.25))

    def forward(self, x, unused, passed):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x, self.temperature, self.center, torch.ones(3), passed


def example_inputs(batch_size):
    return (torch.randn(batch_size, D), torch.randn(batch_size, 2), torch.randn(batch_size, 3))


def example_targets(batch_size):
    return torch.randn(batch_size, D)


def loss_fn(output, target):
    h, temperature, center, ones, passed = output
    return F.mse_loss(h * temperature - center, target) + passed.mean() * ones.sum()
""",
    "list_output": """
class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(D, D) for _ in range(4)])

    def forward(self, x):
        predictions = []
        for layer in self.layers:
            x = torch.tanh(layer(x))
            predictions.append(x)
        return predictions


def example_inputs(batch_size):
    return (torch.randn(batch_size, D),)


def example_targets(batch_size):
    return torch.randn(batch_size, D)


def loss_fn(output, target):
    heads = output.copy()
    final = heads.pop()
    return F.mse_loss(final, target) + 0.1 * sum(F.mse_loss(head, target) for head in heads)
""",
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_local_pipeline_matches_single_process(tmp_path, name):
    path = tmp_path / f"{name}.py"
    path.write_text(HEADER + MODELS[name] + "\n\ndef build_model():\n    return Model()\n")
    folder = compile_model(path, tmp_path / "generated", CompileOptions(stages=2)).folder
    assert check_pipeline(folder).ok
    losses = {}
    for mode in ("single", "local"):
        config = load_config(data={
            "pipeline": str(folder), "data": {"name": "synthetic", "size": 64}, "mode": mode, "steps": 3,
            "batch_size": 8, "micro_batches": 2, "optimizer": {"name": "sgd", "lr": 0.1}, "log_every": 10,
        })  # fmt: skip
        losses[mode] = train(config).loss
    assert len(losses["local"]) == 3
    torch.testing.assert_close(torch.tensor(losses["local"]), torch.tensor(losses["single"]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_list_output_reaches_loss_fn_as_a_list(tmp_path, frontend):
    path = tmp_path / "list_output.py"
    path.write_text(HEADER + MODELS["list_output"] + "\n\ndef build_model():\n    return Model()\n")
    folder = compile_model(path, tmp_path / "generated", CompileOptions(stages=2, frontend=frontend)).folder
    assert load_pipeline(folder).manifest["output_structure"]["kind"] == "list"
    assert check_pipeline(folder).ok
