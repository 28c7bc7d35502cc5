"""Several machines, as README's "Several machines" tells users to launch them: the same `ftc
train` on each, with torchrun's rendezvous flags and its own --node-rank. Two launchers on this
host stand in for two machines (one process each). The truth: single-process training's losses,
and the final weights, merged from the shards both machines wrote into one checkpoint folder."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch

from ftc.runtime import checkpoint
from ftc.runtime.config import load_config
from ftc.runtime.train import train

from .conftest import EXAMPLES

pytestmark = pytest.mark.usefixtures("one_thread")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_machines_train_like_one_process(compile_to, tmp_path):
    folder = compile_to(EXAMPLES / "mlp.py", 2)
    settings = {
        "pipeline": str(folder), "data": {"name": "synthetic", "size": 64}, "steps": 4, "batch_size": 16,
        "micro_batches": 4, "log_every": 10, "seed": 0, "timeout_s": 120,
    }  # fmt: skip
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**settings, "mode": "dist", "results": str(tmp_path / "results.json"),
                                  "checkpoint": {"dir": str(tmp_path / "shared")}}))  # fmt: skip
    port = free_port()

    def machine(rank: int) -> subprocess.Popen:
        flags = ["--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                 "--master-addr", "127.0.0.1", "--master-port", str(port)]  # fmt: skip
        return subprocess.Popen([sys.executable, "-m", "ftc.cli", "train", str(config), "--set", f"torchrun={json.dumps(flags)}"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip

    machines = [machine(1), machine(0)]
    outputs = [process.communicate(timeout=300)[0] for process in machines]
    assert [process.returncode for process in machines] == [0, 0], outputs
    assert "this machine's ranks finished; rank 0's machine writes the results" in outputs[0]
    losses = json.loads((tmp_path / "results.json").read_text())["loss"]
    single = train(load_config(data={**settings, "mode": "single", "checkpoint": {"dir": str(tmp_path / "single")}}))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single.loss), rtol=1e-5, atol=0)
    merged, truth = checkpoint.merge(tmp_path / "shared")[1], checkpoint.merge(tmp_path / "single")[1]
    assert merged.keys() == truth.keys()
    for key, value in truth.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-7)
