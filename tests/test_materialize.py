"""build_stages builds only a rank's stages. The truth is the whole model built on the CPU after
seeding Python's `random`, NumPy's and torch's generators with seed: for every example and every
device's stage set, the stages' parameters and buffers are bitwise its values; tied and shared
tensors stay one object; the tensors of other stages are never allocated; checkpoints load
(safetensors and torch), bad ones are named; models that defeat the per-op replay fall back to a
whole build with a warning that says why."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys

import numpy
import pytest
import torch
from safetensors.torch import save_file

from ftc.ir import FtcError
from ftc.runtime import load_model_file, load_pipeline
from ftc.runtime.materialize import build_stages

from .conftest import ROOT
from .test_equivalence import assert_check_passes

SEED = 1234
LOGGER = "ftc.runtime.materialize"
EXAMPLES = ("gpt", "mlp", "resnet", "unet", "two_tower")

# Initializations that make exact seeded values hard: rejection sampling that reads values
# (trunc_normal_), orthogonal_ and sparse_ (which torch skips for meta tensors), a non-contiguous
# parameter, a seeded factory, Python's `random`, a causal mask from torch.tril, a BatchNorm and
# deep copies of it, a buffer held by two modules, one layer's init reading another's values, and
# draws that land in no tensor. {extra} is a statement run at the start of build_model().
EDGE_MODEL = """
import copy
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

W = {width}
LAYERS = {layers}


class Edge(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(W, W)
        self.layers = nn.ModuleList(nn.Linear(W, W) for _ in range(LAYERS))
        self.norm = nn.BatchNorm1d(W)
        self.copies = nn.ModuleList(copy.deepcopy(self.norm) for _ in range(2))
        self.strided = nn.Parameter(torch.empty(W, W).t())
        self.noise = nn.Parameter(torch.randn(W) * 0.1)
        self.narrow = nn.Parameter(torch.empty(W, 4))
        self.register_buffer("mask", torch.tril(torch.ones(W, W, dtype=torch.bool)), persistent=False)
        self.register_buffer("table", torch.arange(W).float() * random.random())
        scale = torch.rand(W)
        self.layers[0].register_buffer("scale", scale)
        self.layers[-1].register_buffer("scale", scale)
        for layer in self.layers[::2]:
            nn.init.trunc_normal_(layer.weight, std=0.02)
        nn.init.orthogonal_(self.layers[1].weight)
        nn.init.sparse_(self.narrow, sparsity=0.25)
        nn.init.uniform_(self.strided)
        with torch.no_grad():
            self.layers[-1].bias.copy_(self.layers[0].bias * 2)
        F.dropout(torch.ones(W), 0.5)

    def forward(self, x):
        x = self.copies[1](self.copies[0](self.norm(self.shared(x))))
        x = self.layers[0](x) * self.layers[0].scale + self.table
        for layer in self.layers[1:-1]:
            x = torch.tanh(layer(x))
        x = (x @ self.strided) * self.mask[-1]
        x = self.layers[-1](x) * self.layers[-1].scale + self.noise
        return self.shared(x + (x @ self.narrow).sum(-1, keepdim=True))


_builds = []


def build_model():
    _builds.append(None)
    {extra}
    return Edge()


def example_inputs(batch_size):
    return (torch.randn(batch_size, W),)
"""

# A hand-written pipeline for EDGE_MODEL: stage classes adopt as generated ones do; stages 0 and 2
# share device 0 and stages 1 and 3 device 1 (mixed-pipe); stages 0 and 3 both hold `shared` and
# the buffer layers.0.scale.
EDGE_STAGES = [
    (
        0,
        [
            'self.register_buffer("table", model.get_buffer("table"))',
            'self.shared = model.get_submodule("shared")',
            "self.layers = torch.nn.ModuleDict()",
            'self.layers["0"] = model.get_submodule("layers.0")',
            'self.layers["1"] = model.get_submodule("layers.1")',
            'self.layers["2"] = model.get_submodule("layers.2")',
            'self.norm = model.get_submodule("norm")',
        ],
    ),
    (
        1,
        [
            "self.layers = torch.nn.ModuleDict()",
            'self.layers["3"] = model.get_submodule("layers.3")',
            'self.layers["4"] = model.get_submodule("layers.4")',
            'self.layers["5"] = model.get_submodule("layers.5")',
            'self.copies = model.get_submodule("copies")',
        ],
    ),
    (
        0,
        [
            'self.strided = model.get_parameter("strided")',
            "self.layers = torch.nn.ModuleDict()",
            'self.layers["6"] = model.get_submodule("layers.6")',
        ],
    ),
    (
        1,
        [
            'self.noise = model.get_parameter("noise")',
            'self.narrow = model.get_parameter("narrow")',
            'self.register_buffer("mask", model.get_buffer("mask"), persistent=False)',
            'self.shared = model.get_submodule("shared")',
            "self.layers = torch.nn.ModuleDict()",
            'self.layers["0"] = torch.nn.ModuleDict()',
            'self.layers["0"].register_buffer("scale", model.get_buffer("layers.0.scale"))',
            'self.layers["7"] = model.get_submodule("layers.7")',
        ],
    ),
]


def write_edge_model(folder, width=16, layers=8, extra="pass"):
    path = folder / "edge.py"
    path.write_text(EDGE_MODEL.format(width=width, layers=layers, extra=extra))
    return path


def write_edge_pipeline(folder, model_path):
    """generated/edge for EDGE_MODEL, written by hand (the manifest's "state" from the stages)."""
    folder.mkdir(parents=True)
    stages = []
    for index, (device, lines) in enumerate(EDGE_STAGES):
        body = "\n".join(" " * 8 + line for line in lines)
        (folder / f"stage{index}.py").write_text(
            f"import torch\n\n\nclass Stage{index}(torch.nn.Module):\n"
            f"    def __init__(self, model):\n        super().__init__()\n{body}\n"
        )
        stages.append(
            {
                "index": index,
                "file": f"stage{index}.py",
                "class": f"Stage{index}",
                "device": device,
                "inputs": [],
                "outputs": [],
                "state": [],
                "recompute": False,
            }
        )
    manifest = {
        "format": "ftc-pipeline/1", "name": "edge", "model_file": str(model_path), "batch_size": 1, "inputs": [],
        "outputs": [], "output_structure": {"kind": "tuple"}, "stages": stages, "values": {},
    }  # fmt: skip
    (folder / "pipeline.json").write_text(json.dumps(manifest))
    pipeline = load_pipeline(folder)
    meta_model = load_model_file(model_path).build("meta")
    for spec, entry in zip(pipeline.stages, stages):
        entry["state"] = sorted(named_state(pipeline.stage_class(spec)(meta_model)))
    (folder / "pipeline.json").write_text(json.dumps(manifest))
    return load_pipeline(folder)


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edge")
    model_path = write_edge_model(folder)
    return load_model_file(model_path), write_edge_pipeline(folder / "generated" / "edge", model_path)


def named_state(module):
    """Every parameter and buffer under each of its names."""
    return dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))


def seeded_model(model_file, seed=SEED):
    """The truth: the whole model built on the CPU after seeding Python's, NumPy's and torch's
    generators with `seed`, and torch's generator state after that build. (EDGE_MODEL also draws
    from Python's `random`.)"""
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)
    model = model_file.build()
    return model, torch.get_rng_state()


def build(model_file, pipeline, indices, device="cpu", checkpoint=None):
    """build_stages, after Python's `random` was left elsewhere: build_stages seeds it itself."""
    random.seed(SEED + 1)
    return build_stages(model_file, pipeline, indices, device, SEED, checkpoint)


def device_groups(pipeline):
    groups = {}
    for spec in pipeline.stages:
        groups.setdefault(spec.device, []).append(spec.index)
    return list(groups.values())


def assert_exact(stages, pipeline, expected):
    """The stages hold exactly the tensors pipeline.json lists for them, bitwise the truth."""
    specs = {spec.index: spec for spec in pipeline.stages}
    for index, stage in stages.items():
        held = {name: t for name, t in named_state(stage).items() if name in expected or name in specs[index].state}
        assert sorted(held) == specs[index].state, f"stage {index} holds other tensors than its manifest lists"
        for name, tensor in held.items():
            truth = expected[name]
            assert tensor.dtype == truth.dtype and tensor.shape == truth.shape, name
            assert tensor.stride() == truth.stride(), f"{name}: strides {tensor.stride()} != {truth.stride()}"
            assert torch.equal(tensor.cpu(), truth), f"stage {index}: {name} differs from the seeded model's"


def warnings_of(caplog):
    return [
        record.getMessage() for record in caplog.records if record.name == LOGGER and record.levelno >= logging.WARNING
    ]


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_device_gets_the_seeded_values_of_its_stages(name, caplog):
    pipeline = load_pipeline(ROOT / "generated" / name)
    model_file = load_model_file(pipeline.model_file)
    model, generator_after = seeded_model(model_file)
    expected = named_state(model)
    for indices in device_groups(pipeline):
        stages = build(model_file, pipeline, indices)
        assert_exact(stages, pipeline, expected)
        # The generator ends where the whole build leaves it, so training draws the same dropout.
        assert torch.equal(torch.get_rng_state(), generator_after)
    assert warnings_of(caplog) == [], "the examples must not need the whole-model fallback"


def test_edge_initializations_are_exact_on_every_device(edge, caplog):
    model_file, pipeline = edge
    model, generator_after = seeded_model(model_file)
    expected = named_state(model)
    for indices in device_groups(pipeline) + [[0, 1, 2, 3], [3]]:
        stages = build(model_file, pipeline, indices)
        assert_exact(stages, pipeline, expected)
        assert torch.equal(torch.get_rng_state(), generator_after)
    assert warnings_of(caplog) == []


def test_tied_and_shared_tensors_are_one_object_within_a_rank(edge):
    pipeline = load_pipeline(ROOT / "generated" / "gpt")
    gpt = build_stages(load_model_file(pipeline.model_file), pipeline, [0, 3], "cpu", SEED)
    # The LM head is tied to the token embedding: one Parameter, read by stages 0 and 3.
    assert gpt[0].wte.weight is gpt[3].wte.weight

    model_file, pipeline = edge
    stages = build(model_file, pipeline, [0, 3])
    assert stages[0].shared is stages[3].shared
    assert stages[0].layers["0"].scale is stages[3].layers["0"].scale is stages[3].layers["7"].scale
    unique = {id(t) for stage in stages.values() for t in named_state(stage).values()}
    model, _ = seeded_model(model_file)
    held = {name for stage in stages.values() for name in named_state(stage)}
    assert len(unique) == len({id(t) for name, t in named_state(model).items() if name in held})


MEASURE_PEAK = """
import json, sys
import torch
from ftc.runtime import load_model_file, load_pipeline
from ftc.runtime.materialize import build_stages

def megabytes(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

def peak_growth(build):
    start = megabytes("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current size
    kept = build()
    return megabytes("VmHWM") - start, kept

big, small, pipeline = load_model_file(sys.argv[1]), load_model_file(sys.argv[2]), load_pipeline(sys.argv[3])
build_stages(small, pipeline, [2], "cpu", 0)  # torch's first dispatches import its meta kernels
stage_growth, stages = peak_growth(lambda: build_stages(big, pipeline, [2], "cpu", 0))
owned = sum(t.nbytes for t in stages[2].state_dict().values()) / 2**20
del stages
meta = big.build("meta")
sizes = [t.nbytes / 2**20 for t in list(meta.parameters()) + list(meta.buffers())]
whole_growth, _ = peak_growth(big.build)
print(json.dumps({"stage": stage_growth, "owned": owned, "largest": max(sizes), "whole": whole_growth}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc")
def test_other_stages_tensors_are_never_allocated(tmp_path, edge):
    """A 1024-wide model of 60 MB: building stage 2 (two 4 MB matrices) peaks at about its own
    tensors plus one other tensor (a CPU scratch tensor for a draw, or a trunc_normal_ weight
    computed and freed), never at the model's size."""
    small, pipeline = edge
    big = write_edge_model(tmp_path, width=1024, layers=12)
    # A fixed mmap threshold makes glibc return freed large blocks to the system at once, so
    # that the peak RSS follows the tensors alive rather than the allocator's free lists.
    result = subprocess.run(
        [sys.executable, "-c", MEASURE_PEAK, str(big), str(small.path), str(pipeline.folder)],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072"},
    )
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    bound = peaks["owned"] + 2 * peaks["largest"] + 8
    assert peaks["whole"] > 2 * bound, f"the whole build should need far more: {peaks}"
    assert peaks["stage"] < bound, f"building stage 2 allocated other stages' tensors: {peaks}"


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_checkpoint_values_replace_the_seeded_ones(tmp_path, edge, fmt):
    model_file, pipeline = edge
    trained, _ = seeded_model(model_file, seed=99)
    state = {key: value.clone(memory_format=torch.contiguous_format) for key, value in trained.state_dict().items()}
    path = tmp_path / f"model.{fmt}"
    # Tied aliases need only one of their keys: drop layers.7.scale (the same tensor as layers.0.scale).
    del state["layers.7.scale"]
    if fmt == "safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    seeded, _ = seeded_model(model_file)
    for indices in device_groups(pipeline):
        stages = build(model_file, pipeline, indices, checkpoint=path)
        for stage in stages.values():
            persistent = stage.state_dict()
            for name, tensor in named_state(stage).items():
                # Non-persistent buffers (the causal mask) are not in checkpoints: seeded values.
                truth = trained.state_dict()[name] if name in persistent else named_state(seeded)[name]
                assert torch.equal(tensor, truth), name


class PickledWeight:
    """What torch.save pickles as an object (a whole model's class): not a tensor."""


def test_bad_checkpoints_are_named(tmp_path, edge):
    model_file, pipeline = edge
    model, _ = seeded_model(model_file)
    state = {key: value.clone(memory_format=torch.contiguous_format) for key, value in model.state_dict().items()}

    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("layers.3.")}, missing)
    with pytest.raises(FtcError, match=r"missing\.safetensors lacks 2 key\(s\).*layers\.3\.") as error:
        build(model_file, pipeline, [1], checkpoint=missing)
    assert "state_dict" in error.value.hint
    # A checkpoint of other stages' keys only is fine for a rank that does not need them.
    build(model_file, pipeline, [2], checkpoint=missing)

    misshaped = tmp_path / "misshaped.pt"
    torch.save(state | {"layers.6.weight": torch.zeros(3, 3)}, misshaped)
    with pytest.raises(
        FtcError, match=r"misshaped\.pt: layers\.6\.weight has shape \[3, 3\] but the model's is \[16, 16\]"
    ):
        build(model_file, pipeline, [2], checkpoint=misshaped)

    not_a_state_dict = tmp_path / "optimizer.pt"
    torch.save({"step": 3}, not_a_state_dict)
    with pytest.raises(FtcError, match="optimizer.pt is not a state_dict"):
        build(model_file, pipeline, [2], checkpoint=not_a_state_dict)

    # A pickled object: torch's refusal ran over a dozen lines, with terminal escapes.
    pickled = tmp_path / "pickled.pt"
    torch.save(state | {"layers.6.weight": PickledWeight()}, pickled)
    with pytest.raises(FtcError, match=r"pickled\.pt holds objects other than tensors") as error:
        build(model_file, pipeline, [2], checkpoint=pickled)
    assert "model.state_dict()" in error.value.hint

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(FtcError, match="cannot read checkpoint .*garbage.safetensors"):
        build(model_file, pipeline, [2], checkpoint=garbage)

    with pytest.raises(FtcError, match="does not exist"):
        build(model_file, pipeline, [2], checkpoint=tmp_path / "nowhere.pt")

    # A training run's checkpoint folder, which said "does not exist" though it does.
    with pytest.raises(FtcError, match="is a folder, not a state_dict file") as info:
        build(model_file, pipeline, [2], checkpoint=tmp_path)
    assert "ftc merge-checkpoint" in info.value.hint


@pytest.mark.parametrize(
    "extra, reason",
    [
        # Every other build runs one more op: the record and the replay differ.
        ("torch.zeros(3) if len(_builds) % 2 else None", "not deterministic"),
        # Python branches on a value the meta build can only guess.
        ("assert torch.ones(2).abs().sum() > 0", "building it on the meta device failed"),
    ],
)
def test_models_that_defeat_the_replay_fall_back_to_a_whole_build(tmp_path, edge, caplog, extra, reason):
    model_file = load_model_file(write_edge_model(tmp_path, extra=extra))
    _, pipeline = edge
    model, generator_after = seeded_model(model_file)
    stages = build(model_file, pipeline, [1, 3])
    assert_exact(stages, pipeline, named_state(model))
    assert torch.equal(torch.get_rng_state(), generator_after)
    assert stages[3].shared.weight is not None
    [warning] = warnings_of(caplog)
    assert "building the whole model on the CPU to keep stages 1, 3" in warning and reason in warning


def test_a_branch_the_meta_build_guessed_wrong_falls_back(tmp_path, edge, caplog):
    """The record build guesses zero for a value it cannot know; the replay finds it is not."""
    extra = "torch.manual_seed(int(torch.rand(()).mul(1e6).item()) + 1)"
    model_file = load_model_file(write_edge_model(tmp_path, extra=extra))
    _, pipeline = edge
    model, _ = seeded_model(model_file)
    stages = build(model_file, pipeline, [2])
    assert_exact(stages, pipeline, named_state(model))
    [warning] = warnings_of(caplog)
    assert "branches on a tensor value" in warning


def test_unknown_stage_is_an_error(edge):
    model_file, pipeline = edge
    with pytest.raises(FtcError, match="has no stage 7"):
        build(model_file, pipeline, [7])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stages_land_on_the_device_with_the_cpu_values(tmp_path, edge):
    model_file, pipeline = edge
    model, _ = seeded_model(model_file)
    stages = build(model_file, pipeline, [0, 3], "cuda")
    assert all(t.is_cuda for stage in stages.values() for t in named_state(stage).values())
    assert stages[0].shared.weight is stages[3].shared.weight
    assert stages[0].layers["0"].scale is stages[3].layers["7"].scale
    assert_exact(stages, pipeline, named_state(model))

    trained, _ = seeded_model(model_file, seed=99)
    path = tmp_path / "model.safetensors"
    save_file({k: v.clone(memory_format=torch.contiguous_format) for k, v in trained.state_dict().items()}, path)
    stages = build(model_file, pipeline, [0, 3], "cuda", checkpoint=path)
    for stage in stages.values():
        for name, tensor in stage.state_dict().items():
            assert tensor.is_cuda and torch.equal(tensor.cpu(), trained.state_dict()[name]), name


OFF_META_STATE = """
import numpy
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.FloatTensor(8, 8))
        nn.init.normal_(self.w)
        self.bias = nn.Parameter(torch.from_numpy(numpy.linspace(-1, 1, 8).astype("float32")))
        self.register_buffer("pe", torch.from_numpy(numpy.arange(8, dtype="float32")))

    def forward(self, x):
        return torch.tanh(self.a(x)) @ self.w + self.bias + self.pe


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""


def test_state_made_off_the_meta_device_compiles_and_builds_the_seeded_values(tmp_path, compile_to):
    """A legacy constructor (torch.FloatTensor(8, 8), as transformers' XLNet makes its attention
    weights) and torch.from_numpy ignore the meta device ftc builds under; compile refused them,
    and the model could not be compiled at all without editing the library."""
    path = tmp_path / "off_meta.py"
    path.write_text(OFF_META_STATE)
    folder = compile_to(path, 2, batch_size=4)
    assert_check_passes(folder, batch_size=4)
    pipeline = load_pipeline(folder)
    model_file = load_model_file(pipeline.model_file)
    model, _ = seeded_model(model_file)
    for indices in device_groups(pipeline):
        assert_exact(build(model_file, pipeline, indices), pipeline, named_state(model))


ORTHOGONAL = """
import torch
import torch.nn as nn
from torch.nn.utils import parametrizations


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        with torch.device("cpu"):  # orthogonal checks the weight's values
            self.rotation = parametrizations.orthogonal(nn.Linear(8, 8))

    def forward(self, x):
        return self.rotation(torch.tanh(self.a(x)))


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""


def test_a_build_that_catches_a_meta_failure_falls_back_to_a_whole_build(tmp_path, compile_to, caplog):
    """orthogonal's right inverse runs geqrf, which the meta device cannot; torch's parametrize
    takes that NotImplementedError for "no right inverse" and leaves the `base` buffer None, so the
    record build made another model than the CPU and training refused pipeline.json's state."""
    path = tmp_path / "orthogonal.py"
    path.write_text(ORTHOGONAL)
    folder = compile_to(path, 2, batch_size=4)
    pipeline = load_pipeline(folder)
    model_file = load_model_file(pipeline.model_file)
    model, _ = seeded_model(model_file)
    for indices in device_groups(pipeline):
        assert_exact(build(model_file, pipeline, indices), pipeline, named_state(model))
    warnings = warnings_of(caplog)
    assert warnings and all("geqrf" in warning for warning in warnings), warnings
