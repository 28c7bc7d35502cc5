from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MODELS = ROOT / "tests" / "models"


@pytest.fixture(scope="session", autouse=True)
def temporary_files(tmp_path_factory):
    """Temporary files of the tests and the processes they start (the run folders `ftc train`
    keeps when a run fails, which tests of faults make on purpose) go under pytest's own
    temporary folder, which pytest prunes, not into /tmp."""
    import os
    import tempfile

    folder = tmp_path_factory.mktemp("tmp")
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    yield
    if before is None:
        del os.environ["TMPDIR"]
    else:
        os.environ["TMPDIR"] = before
    tempfile.tempdir = None


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    micro-batches are small and each dist rank gets one core of a 2-core machine, so more
    intra-op threads only contend; and bf16 results depend on the thread count, which the
    single-process reference must share with the ranks."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def analyzed():
    """analyzed(path) -> (graph, model file): traced with --frontend auto at batch 4, named and
    analytically profiled, once per module."""
    from ftc.frontends import trace
    from ftc.ir import validate
    from ftc.passes.cleanup import eliminate_dead_code
    from ftc.passes.naming import name_values
    from ftc.profiling import DeviceModel, profile_analytic
    from ftc.runtime.model_file import load_model_file

    cache = {}

    def get(path):
        if path not in cache:
            model_file = load_model_file(path)
            graph, model, batch = trace(model_file, 4, "auto", path.stem)
            graph = name_values(eliminate_dead_code(graph), model_file.path.parent)
            validate(graph)
            cache[path] = (profile_analytic(graph, model, batch, DeviceModel()), model_file)
        return cache[path]

    return get


@pytest.fixture
def compile_to(tmp_path):
    """compile_to(model_path, stages, **options) -> the generated folder, in a fresh tmp dir."""
    from ftc.compiler import CompileOptions, compile_model

    def run(model_path, stages, **options):
        return compile_model(model_path, tmp_path / "out", CompileOptions(stages=stages, **options)).folder

    return run


def assert_local_trains_like_single(folder: Path) -> None:
    """Three Adam steps of `folder`'s pipeline on synthetic data, 2 micro-batches: mode local's
    losses equal plain single-process training's (relative 1e-5)."""
    import torch

    from ftc.runtime.config import load_config
    from ftc.runtime.train import train

    losses = {}
    for mode in ("single", "local"):
        config = load_config(data={
            "pipeline": str(folder), "data": {"name": "synthetic", "size": 32}, "mode": mode, "steps": 3,
            "batch_size": 8, "micro_batches": 2, "optimizer": {"name": "adam", "lr": 0.01}, "log_every": 10,
        })  # fmt: skip
        losses[mode] = train(config).loss
    torch.testing.assert_close(torch.tensor(losses["local"]), torch.tensor(losses["single"]), rtol=1e-5, atol=0)


def stdlib_modules() -> set[str]:
    return set(sys.stdlib_module_names)
