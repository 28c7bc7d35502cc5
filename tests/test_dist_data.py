"""Mode dist: every rank that reads data builds the data set itself. A data set drawn from
NumPy's global generator (unseeded by the user) must come out alike on every rank and train as
in one process; one that differs between ranks must stop the run with an error naming them.
"""

from __future__ import annotations

import pytest
import torch

from ftc.compiler import CompileOptions, compile_model
from ftc.ir import FtcError
from ftc.runtime.config import load_config
from ftc.runtime.train import train
from ftc.runtime.worker import launch

from .conftest import MODELS

MODEL = (MODELS / "classifier.py").read_text() + """

import os

import numpy as np


def numpy_data(size=64):
    x = torch.from_numpy(np.random.randn(size, 8).astype("float32"))
    y = torch.from_numpy(np.random.randint(0, 4, size))
    return [((x[i],), y[i]) for i in range(size)]


def per_rank_data(size=64):
    shift = float(os.environ.get("RANK", "0"))
    return [((torch.full((8,), shift + i),), torch.tensor(i % 4)) for i in range(size)]
"""


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_data")
    (root / "model.py").write_text(MODEL)
    return root, compile_model(root / "model.py", root / "generated", CompileOptions(stages=2)).folder


def config(root, folder, function, mode):
    return load_config(data={
        "pipeline": str(folder), "mode": mode, "steps": 3, "batch_size": 8, "micro_batches": 2, "log_every": 10,
        "data": {"name": "module", "module": f"{root / 'model.py'}:{function}"}, "timeout_s": 30,
        "results": str(root / function / mode / "results.json"),
    })  # fmt: skip


def test_a_numpy_drawn_data_set_is_alike_on_every_rank(pipeline):
    root, folder = pipeline
    local = train(config(root, folder, "numpy_data", "local")).loss
    dist = launch(config(root, folder, "numpy_data", "dist")).loss
    torch.testing.assert_close(torch.tensor(dist), torch.tensor(local), rtol=1e-5, atol=0)


def test_ranks_with_different_data_stop_naming_them(pipeline):
    root, folder = pipeline
    with pytest.raises(FtcError, match="the ranks built different data sets .*rank 0: .*rank 1: "):
        launch(config(root, folder, "per_rank_data", "dist"))


def test_a_process_count_that_does_not_fit_is_refused_before_launch(pipeline):
    root, folder = pipeline
    cfg = config(root, folder, "numpy_data", "dist")
    cfg.nprocs = 3
    with pytest.raises(FtcError, match="key 'nprocs' is 3, but .* places its stages on 2 devices"):
        launch(cfg)
