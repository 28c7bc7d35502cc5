"""Local and dist mode train bit for bit alike when a value crossing stages is a strided view.

A value sent between devices arrives contiguous in dist (the wire carries dense buffers), so in
local mode it must arrive contiguous too: a reduction over a transposed tensor sums in another
order than over its contiguous copy, and losses would differ in their last bits (a Swin
window-attention model, whose stages pass permuted windows, did). Here stage 0 sends a transposed
tensor, and stage 1 sums over its last dimension."""

from __future__ import annotations

import torch

from ftc.runtime import load_pipeline
from ftc.runtime.comm import LocalTransport, Message
from ftc.runtime.config import load_config
from ftc.runtime.train import train
from ftc.runtime.worker import launch

STRIDED = """
import torch
import torch.nn as nn
import torch.nn.functional as F


class Spread(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 256)

    def forward(self, x):
        return torch.tanh(self.fc(x)).transpose(1, 2)  # [B, 256, 64], strided


class Reduce(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(256, 4)

    def forward(self, h):
        return self.fc(h.sum(-1))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Spread(), Reduce())

    def forward(self, x):
        return self.blocks(x)


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 64, 64),)


def example_targets(batch_size):
    return torch.randn(batch_size, 4)


def loss_fn(output, target):
    return F.mse_loss(output, target)
"""


def test_local_transport_delivers_contiguous_tensors_as_the_wire_does():
    transport = LocalTransport()
    message = Message("activation", "h", 0, 0, 1)
    sent = torch.randn(3, 5, 7).transpose(1, 2)
    transport.send(message, [sent])
    (received,) = transport.receive(message, 1)
    assert received.is_contiguous() and torch.equal(received, sent)


def test_local_equals_dist_exactly_with_a_strided_value_between_stages(tmp_path):
    from ftc.compiler import CompileOptions, compile_model

    model = tmp_path / "strided.py"
    model.write_text(STRIDED)
    folder = compile_model(model, tmp_path / "out", CompileOptions(stages=2, method="uniform")).folder
    first = load_pipeline(folder).stages[0]
    assert "transpose" in (folder / first.file).read_text()  # the strided view is what stage 0 sends

    def run(mode):
        return load_config(data={
            "pipeline": str(folder), "data": {"name": "synthetic", "size": 16}, "batch_size": 8,
            "micro_batches": 2, "steps": 2, "seed": 3, "mode": mode, "timeout_s": 30,
            "optimizer": {"name": "sgd", "lr": 0.01},
        })  # fmt: skip

    local = train(run("local")).loss
    dist = launch(run("dist")).loss
    assert local == dist
