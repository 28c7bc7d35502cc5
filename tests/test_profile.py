"""The measured profile (--profile measure): real times for every node, a partition that follows
them where FLOPs mislead, the on-disk cache, and save-memory mode."""

from __future__ import annotations

import math
import textwrap
import time

import pytest
import torch

import ftc.profiling.measure as measure_module
from ftc.cli import main
from ftc.compiler import CompileOptions, compile_model
from ftc.frontends import trace
from ftc.profiling.measure import MeasureSettings, initial_state, measure, wants_save_memory
from ftc.runtime import load_pipeline
from ftc.runtime.model_file import load_model_file

from .conftest import MODELS

SMALL = """
import torch
import torch.nn as nn
import torch.nn.functional as F

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, idx, scale):
        x = self.norm(self.embed(idx)) * scale.unsqueeze(-1)
        x = x + self.fc2(F.gelu(self.fc1(x)))
        x = x.mean(dim=1)
        return self.head(x), x.detach().sum()

def build_model():
    return Net()

def example_inputs(batch_size):
    return (torch.randint(0, 32, (batch_size, 6)), torch.rand(batch_size, 6))
"""

# Many tiny elementwise ops, which the roofline prices at next to nothing while each costs a
# kernel launch and an autograd node, ahead of a few matmuls, which FLOPs price well: the
# analytic profile puts nearly all of the first half in stage 0.
MISLEADING = """
import torch
import torch.nn as nn

TINY_OPS = 160

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.into = nn.Linear(8, 8)
        self.up = nn.Linear(8, 256)
        self.mlp = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])

    def forward(self, x):
        x = self.into(x)
        for _ in range(TINY_OPS):
            x = torch.tanh(x)
        return self.mlp(self.up(x))

def build_model():
    return Net()

def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "profiles"
    monkeypatch.setenv("FTC_CACHE_DIR", str(folder))
    return folder


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


FAST = {"profile": "measure"}


def test_every_compute_node_gets_a_measured_time(tmp_path, cache_dir):
    model = write(tmp_path, "small.py", SMALL)
    threads = torch.get_num_threads()
    compiled = compile_model(model, tmp_path / "out", CompileOptions(stages=2, **FAST))
    assert torch.get_num_threads() == threads  # restored after measuring with one thread
    compute = [node for node in compiled.graph.nodes if node.is_compute]
    for node in compute:
        assert math.isfinite(node.cost.fwd_time) and node.cost.fwd_time > 0, node.name
        assert math.isfinite(node.cost.bwd_time) and node.cost.bwd_time >= 0, node.name
        assert node.cost.peak_memory is not None and node.cost.peak_memory >= 0, node.name
    with_weights = [node for node in compute if node.op == "call_module"]
    assert with_weights and all(node.cost.bwd_time > 0 for node in with_weights)
    # Linear layers save their input for the weight's gradient.
    assert all(node.cost.peak_memory > 0 for node in with_weights if node.target.startswith("fc"))
    # Values made under detach() have no backward.
    assert compiled.graph.node("sum_1").cost.bwd_time == 0.0
    manifest = load_pipeline(compiled.folder).manifest
    assert manifest["settings"]["profile"] == "measure" and manifest["settings"]["threads"] == 1
    assert sum(s["cost"]["fwd_time"] for s in manifest["stages"]) == pytest.approx(
        sum(node.cost.fwd_time for node in compute)
    )


def _stage_times(folders: list, repeats: int = 15) -> list[list[float]]:
    """Forward + backward seconds of every stage of every pipeline, timed side by side on one
    thread (the repeats interleave the pipelines, so a busy moment hits all of them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = []
        for folder in folders:
            pipeline = load_pipeline(folder)
            model_file = load_model_file(pipeline.model_file)
            torch.manual_seed(0)
            model = model_file.build()
            values = dict(zip(pipeline.inputs, model_file.inputs(8)))
            stages = []
            for spec in pipeline.stages:
                stage = pipeline.stage_class(spec)(model)
                inputs = [values[name].detach().requires_grad_(values[name].requires_grad) for name in spec.inputs]
                values.update(zip(spec.outputs, stage(*inputs)))
                stages.append((stage, inputs))
            runs.append(stages)
        samples = [[[] for _ in stages] for stages in runs]
        for _ in range(repeats):
            for stages, times in zip(runs, samples):
                for (stage, inputs), stage_times in zip(stages, times):
                    start = time.perf_counter()
                    outputs = [t for t in stage(*inputs) if t.requires_grad]
                    torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])
                    stage_times.append(time.perf_counter() - start)
        return [[min(t) for t in times] for times in samples]
    finally:
        torch.set_num_threads(threads)


def test_measured_profile_moves_the_partition_where_flops_mislead(tmp_path, cache_dir):
    model = write(tmp_path, "misleading.py", MISLEADING)
    analytic = compile_model(model, tmp_path / "analytic", CompileOptions(stages=2))
    measured = compile_model(model, tmp_path / "measured", CompileOptions(stages=2, **FAST))
    # The analytic profile cuts among the matmuls; the measured one earlier, among the tiny ops.
    first_of_stage_1 = analytic.graph.node(next(n.name for n in analytic.graph.nodes if n.stage == 1))
    assert first_of_stage_1.target.startswith("mlp.")
    assert measured.stages[0]["cost"]["ops"] < analytic.stages[0]["cost"]["ops"] - 2
    (a0, a1), (m0, m1) = _stage_times([analytic.folder, measured.folder])
    # Timed directly, the analytic split is lopsided and the measured one balances better.
    assert a0 > 2 * a1
    assert max(m0, m1) < max(a0, a1)
    # The measured costs, summed over the analytic split's stages, see the lopsidedness too.
    cost = {n.name: n.cost.fwd_time + n.cost.bwd_time for n in measured.graph.nodes if n.is_compute}
    p0, p1 = (sum(cost[n.name] for n in analytic.graph.nodes if n.is_compute and n.stage == k) for k in (0, 1))
    assert p0 > 2 * p1


def test_the_cache_is_read_back_and_missed_when_the_model_changes(tmp_path, cache_dir, capsys):
    model = write(tmp_path, "small.py", SMALL)
    args = ["compile", model, "--stages", 2, "-o", tmp_path / "out", "--profile", "measure", "--force"]
    assert main([str(a) for a in args]) == 0
    first = capsys.readouterr().out
    assert "profile: measured on cpu" in first and "cached in" in first
    cached = list(cache_dir.glob("*.json"))
    assert len(cached) == 1 and not list(cache_dir.glob(".*"))  # no temporary file left behind

    assert main([str(a) for a in args]) == 0
    second = capsys.readouterr().out
    assert f"profile: read from the cache {cached[0]}" in second
    table = lambda out: out.split("\n", 2)[2]  # noqa: E731
    assert table(second) == table(first)  # the same costs, so the same partition and figures

    assert main([str(a) for a in args + ["--batch-size", 4]]) == 0
    assert "profile: measured" in capsys.readouterr().out  # another batch size: a miss
    model.write_text(model.read_text() + "\n# edited\n")
    assert main([str(a) for a in args]) == 0
    assert "profile: measured" in capsys.readouterr().out  # another model file: a miss
    assert len(list(cache_dir.glob("*.json"))) == 3

    assert main([str(a) for a in args + ["--no-cache"]]) == 0
    out = capsys.readouterr().out
    assert "profile: measured" in out and "cached in" not in out
    assert len(list(cache_dir.glob("*.json"))) == 3


def test_an_unreadable_cache_file_is_measured_again(tmp_path, cache_dir, capsys):
    model = write(tmp_path, "small.py", SMALL)
    args = [
        str(a) for a in ["compile", model, "--stages", 2, "-o", tmp_path / "out", "--profile", "measure", "--force"]
    ]
    assert main(args) == 0
    capsys.readouterr()
    (cached,) = cache_dir.glob("*.json")
    cached.write_text('{"format": "ftc-profile/1", "nodes": ')
    assert main(args) == 0
    assert "profile: measured" in capsys.readouterr().out
    assert main(args) == 0
    assert "read from the cache" in capsys.readouterr().out


def _real_model_with_initial_state(model_file, meta_model):
    """The model built for real, its state set to what save-memory mode materializes."""
    model = model_file.build()
    meta_state = dict(meta_model.named_parameters()) | dict(meta_model.named_buffers())
    with torch.no_grad():
        for name, tensor in (*model.named_parameters(), *model.named_buffers()):
            tensor.copy_(initial_state(name, meta_state[name], "cpu"))
    return model


# A head that is the embedding under another name (head.weight is embed.weight).
TIED = """
import torch
import torch.nn as nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.embed(idx)))

def build_model():
    return Net()

def example_inputs(batch_size):
    return (torch.randint(0, 20, (batch_size, 5)),)
"""


# shared: one module called at several places and a weight read by get_attr; inplace: writes
# through views to tensors read later.
@pytest.mark.parametrize("path", [MODELS / "shared.py", MODELS / "inplace.py", "small", "tied"])
def test_save_memory_mode_computes_the_model_and_similar_costs(path, tmp_path):
    if path in ("small", "tied"):
        path = write(tmp_path, f"{path}.py", {"small": SMALL, "tied": TIED}[path])
    model_file = load_model_file(path)
    graph, meta_model, _ = trace(model_file, 8)
    meta_model.eval()  # no dropout draws, so the outputs can be compared
    saving = measure(graph, model_file, meta_model, MeasureSettings(save_memory=True))
    assert saving.save_memory
    assert all(t.device.type == "meta" for t in (*meta_model.parameters(), *meta_model.buffers()))

    model = _real_model_with_initial_state(model_file, meta_model).eval()
    torch.manual_seed(0)  # measure() draws the batch from the same seed
    with torch.no_grad():
        expected = model(*model_file.inputs(8))
    torch.testing.assert_close(saving.outputs, expected, rtol=1e-5, atol=1e-6, check_device=False)

    in_context = measure(graph, model_file, meta_model, MeasureSettings())
    assert not in_context.save_memory
    compute = [node.name for node in graph.nodes if node.is_compute]
    assert set(saving.nodes) == set(in_context.nodes) == set(compute)
    for kind in ("fwd_time", "bwd_time", "peak_memory"):
        total_saving = sum(getattr(saving.nodes[n], kind) for n in compute)
        total_in_context = sum(getattr(in_context.nodes[n], kind) for n in compute)
        assert 0.1 < total_saving / total_in_context < 10, (kind, total_saving, total_in_context)


def test_save_memory_mode_is_chosen_for_a_model_large_for_the_device(tmp_path, monkeypatch):
    model_file = load_model_file(write(tmp_path, "small.py", SMALL))
    graph, _, _ = trace(model_file, 8)
    parameter_bytes = sum(t.meta.nbytes for t in graph.state.values())
    monkeypatch.setattr(measure_module, "device_memory", lambda device: 100 * parameter_bytes)
    assert not wants_save_memory(graph, MeasureSettings())
    monkeypatch.setattr(measure_module, "device_memory", lambda device: 2 * parameter_bytes)
    assert wants_save_memory(graph, MeasureSettings())
    assert not wants_save_memory(graph, MeasureSettings(save_memory=False))


def test_profile_flag_errors(tmp_path, capsys):
    model = write(tmp_path, "small.py", SMALL)
    base = ["compile", str(model), "--stages", "2", "-o", str(tmp_path / "out")]
    assert main(base + ["--save-memory"]) == 2
    assert "add --profile measure" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(base + ["--profile", "measure", "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "no CUDA device" in err and "Traceback" not in err
