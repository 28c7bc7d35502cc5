"""Builds of the model seeded alike in every mode and on every rank: a model whose initial values
come from Python's `random` and NumPy's global generator, its embedding tied to its LM head
across 2 devices. The truth is a plain build after seeding the three generators by hand: mode
single and every device's stages start from its values, and dist trains as single does, its
tied copies equal on both ranks. A tied weight drawn from a source no seed reaches
(os.urandom) makes dist fail before training, naming the weight and the ranks.
"""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ftc.compiler import CompileOptions, compile_model
from ftc.ir import FtcError
from ftc.runtime import checkpoint, load_model_file, load_pipeline
from ftc.runtime.config import load_config
from ftc.runtime.materialize import build_stages
from ftc.runtime.reference import build_single
from ftc.runtime.train import train
from ftc.runtime.worker import launch

from .conftest import assert_local_trains_like_single
from .test_equivalence import assert_check_passes

SEED = 5
STEPS = 3
TIED_LM = """
import os
import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def drawn(shape):
    return {draw}


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.body = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(3)])
        self.head = nn.Linear(16, 50, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.tensor(drawn((50, 16)), dtype=torch.float32))
            self.body[1][0].bias.fill_(random.uniform(-1, 1))
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)))


def build_model():
    return TiedLM()


def example_inputs(batch_size):
    return (torch.randint(0, 50, (batch_size, 6)),)


def loss_fn(output, target):
    return F.cross_entropy(output.reshape(-1, 50), target.reshape(-1))
"""
GLOBAL_NUMPY = "0.5 * np.random.randn(*shape)"
UNSEEDABLE = 'np.random.default_rng(int.from_bytes(os.urandom(8), "little")).standard_normal(shape)'


def compiled(root, draw):
    model = root / "tied_lm.py"
    model.write_text(TIED_LM.format(draw=draw))
    folder = compile_model(model, root / "generated", CompileOptions(stages=2, method="uniform")).folder
    pipeline = load_pipeline(folder)
    tied = ("embed.weight", "head.weight")
    devices = {spec.device for spec in pipeline.stages for name in spec.state if name in tied}
    assert pipeline.manifest["tied"] == [["embed.weight", "head.weight"]] and devices == {0, 1}
    return model, folder


def config(root, folder, name, **settings):
    data = {
        "pipeline": str(folder), "data": {"name": "synthetic", "size": 64}, "optimizer": {"name": "adamw", "lr": 0.01},
        "batch_size": 8, "micro_batches": 2, "steps": STEPS, "seed": SEED, "log_every": 10, "timeout_s": 30,
        "results": str(root / name / "results.json"), "checkpoint": {"dir": str(root / name / "checkpoints")},
    }  # fmt: skip
    data.update(settings)
    return load_config(data=data)


def seeded_by_hand(model_file):
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    return model_file.build().state_dict()


def scramble_generators():
    """Leave the generators where earlier work (other tests, other models) might have."""
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)


def test_every_mode_and_device_builds_the_values_of_one_seeded_build_and_dist_trains_as_single(tmp_path):
    model_path, folder = compiled(tmp_path, GLOBAL_NUMPY)
    model_file = load_model_file(model_path)
    truth = seeded_by_hand(model_file)

    scramble_generators()
    single_model = build_single(config(tmp_path, folder, "built", mode="single"), model_file, torch.device("cpu"))
    for key, value in single_model.state_dict().items():
        assert torch.equal(value, truth[key]), f"mode single's {key} differs from the seeded build's"
    pipeline = load_pipeline(folder)
    for device in (0, 1):
        scramble_generators()
        indices = [spec.index for spec in pipeline.stages if spec.device == device]
        stages = build_stages(model_file, pipeline, indices, "cpu", SEED)
        for stage in stages.values():
            for key, value in stage.state_dict().items():
                assert torch.equal(value, truth[key]), f"device {device}'s {key} differs from the seeded build's"

    single = train(config(tmp_path, folder, "single", mode="single"))
    dist = launch(config(tmp_path, folder, "dist", mode="dist"))
    torch.testing.assert_close(torch.tensor(dist.loss), torch.tensor(single.loss), rtol=1e-5, atol=0)
    merged = checkpoint.merge(tmp_path / "dist" / "checkpoints")[1]
    expected = checkpoint.merge(tmp_path / "single" / "checkpoints")[1]
    assert set(merged) == set(expected)
    for key, value in expected.items():
        # Per tensor, in norm, as tests/test_train.py compares: Adam magnifies rounding noise elementwise.
        error = (merged[key] - value).norm() / value.norm().clamp(min=1e-12)
        assert error <= 1e-5, f"{key}: relative difference {error:.2e}"
    last = checkpoint.latest(tmp_path / "dist" / "checkpoints")
    shards = [load_file(last / f"rank-{rank}.safetensors") for rank in (0, 1)]
    copies = [shard[key] for shard in shards for key in ("embed.weight", "head.weight") if key in shard]
    assert len(copies) >= 2 and all(torch.equal(copy, copies[0]) for copy in copies)


def test_a_tied_weight_drawn_from_an_unseeded_source_stops_dist_before_training(tmp_path):
    _, folder = compiled(tmp_path, UNSEEDABLE)
    with pytest.raises(FtcError) as error:
        launch(config(tmp_path, folder, "dist", mode="dist"))
    report = error.value.message
    expected = "tied weight embed.weight (held by rank 0 as embed.weight, rank 1 as head.weight)"
    assert re.search(r"rank 0: failed before training: the ranks built different values", report), report
    assert expected in report and "build_model() draws from a random source ftc does not seed" in report, report
    assert checkpoint.latest(tmp_path / "dist" / "checkpoints") is None


TOP_LEVEL_DRAW = """
import torch
import torch.nn as nn

MIX = torch.randn(8, 8)  # unseeded: plain Python draws it anew in every process


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(self.fc1(x) @ MIX)


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)


def loss_fn(output, target):
    return nn.functional.mse_loss(output, target)
"""


def test_a_tensor_drawn_at_the_model_files_top_level_is_the_same_in_every_process(tmp_path):
    """The stage code holds MIX as the compile drew it; another process (a rank, `ftc check` run
    later) imports the file with the generators seeded alike, so it draws the same MIX, and
    importing leaves the caller's generators where they were."""
    import subprocess
    import sys

    path = tmp_path / "top_level_draw.py"
    path.write_text(TOP_LEVEL_DRAW)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    mix = load_model_file(path).module.MIX
    assert torch.equal(torch.rand(3), expected_next)
    other = subprocess.run(
        [sys.executable, "-c", f"from ftc.runtime import load_model_file; print(load_model_file({str(path)!r}).module.MIX.tolist())"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert torch.tensor(eval(other.stdout)).equal(mix)
    folder = compile_model(path, tmp_path / "out", CompileOptions(stages=2)).folder
    assert_check_passes(folder, batch_size=4)
    assert_local_trains_like_single(folder)
