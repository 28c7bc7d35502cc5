"""Values that grow with the batch in two dimensions ([B, B]: a relation between the samples of a
batch, CLIP-style in-batch logits) keep both in their metadata (TensorMeta.other_batch_dims), so
a micro-batch's value is [b, b] on the wire and in `ftc check` at another batch size. The truth:
the original model at each batch size, and single-process training on the same micro-batches."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ftc.check import check_pipeline
from ftc.frontends import trace
from ftc.ir import FtcError, dumps, loads
from ftc.runtime import load_model_file, load_pipeline
from ftc.runtime.config import load_config
from ftc.runtime.engine import Engine
from ftc.runtime.train import train
from ftc.runtime.worker import launch

from .conftest import MODELS

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = MODELS / "in_batch.py"


def test_both_batch_dimensions_are_recorded_and_kept_in_ir_json():
    graph = trace(load_model_file(MODEL), 4).graph
    softmax = next(node for node in graph.nodes if node.target == "softmax")
    relation = softmax.meta
    assert (relation.shape, relation.batch_dim, relation.other_batch_dims) == ([4, 4], 0, [1])
    assert graph.nodes[0].meta.other_batch_dims == []  # x: [B, 16]
    again = {node.name: node for node in loads(dumps(graph)).nodes}
    assert again[softmax.name].meta == relation
    # Only values that have them write the key: ir.json of other models reads as before.
    assert dumps(graph).count('"other_batch_dims"') == sum(1 for n in graph.nodes if getattr(n.meta, "other_batch_dims", None))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_cut_that_sends_a_batch_by_batch_value_checks_at_other_batch_sizes(frontend, compile_to):
    folder = compile_to(MODEL, 2, frontend=frontend, batch_size=8)
    manifest = json.loads((folder / "pipeline.json").read_text())
    sent = [name for stage in manifest["stages"][:-1] for name in stage["outputs"]]
    assert "relation" in sent, sent
    assert manifest["values"]["relation"]["other_batch_dims"] == [1]
    assert "relation: float32[B, B]" in (folder / "stage1.py").read_text()
    for batch_size in (8, 4, 2):
        report = check_pipeline(folder, batch_size=batch_size)
        assert report.ok, (batch_size, report)


def test_micro_batches_train_like_single_in_local_and_dist(compile_to, tmp_path):
    """Compiled at batch 8, trained in micro-batches of 4: `relation` goes on the wire as [4, 4]."""
    folder = compile_to(MODEL, 2, batch_size=8)
    assert "relation" in load_pipeline(folder).stages[0].outputs
    losses = {}
    for mode in ("single", "local", "dist"):
        config = load_config(data={
            "pipeline": str(folder), "data": {"name": "synthetic", "size": 64}, "mode": mode, "steps": 3,
            "batch_size": 16, "micro_batches": 4, "optimizer": {"name": "adam", "lr": 0.01}, "log_every": 10,
            "results": str(tmp_path / f"{mode}.json"),
        })  # fmt: skip
        losses[mode] = (launch if mode == "dist" else train)(config).loss
    for mode in ("local", "dist"):
        torch.testing.assert_close(torch.tensor(losses[mode]), torch.tensor(losses["single"]), rtol=1e-5, atol=0)


def test_evaluate_returns_each_micro_batch_of_an_in_batch_output(compile_to):
    """[b, b] logits of two micro-batches are no [B, B] value: evaluate gives them as a list."""
    folder = compile_to(MODEL, 2, batch_size=4)
    pipeline = load_pipeline(folder)
    model_file = load_model_file(MODEL)
    torch.manual_seed(0)
    model = model_file.build_model()
    modules = {spec.index: pipeline.stage_class(spec)(model) for spec in pipeline.stages}
    engine = Engine(pipeline, modules, loss_fn=model_file.loss_fn, schedule="gpipe", micro_batches=2, seed=0,
                    device=torch.device("cpu"))
    x = torch.randn(8, 16)
    model.eval()
    _, (classes, logits) = engine.evaluate(0, (x,))
    with torch.no_grad():
        halves = [model(x[:4]), model(x[4:])]
    torch.testing.assert_close(classes, torch.cat([halves[0][0], halves[1][0]]))
    assert isinstance(logits, list) and len(logits) == 2
    for got, (_, want) in zip(logits, halves):
        torch.testing.assert_close(got, want)


def test_training_refuses_an_input_that_relates_samples(tmp_path, compile_to):
    path = tmp_path / "pairs.py"
    path.write_text(
        "import torch\nimport torch.nn as nn\n\n\n"
        "class Pairs(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.a = nn.Linear(6, 6)\n        self.b = nn.Linear(6, 2)\n\n"
        "    def forward(self, x, mask):\n        return self.b(torch.tanh(mask @ self.a(x)))\n\n\n"
        "def build_model():\n    return Pairs()\n\n\n"
        "def example_inputs(batch_size):\n"
        "    return (torch.randn(batch_size, 6), torch.eye(batch_size))\n\n\n"
        "def loss_fn(output, target):\n    return output.square().mean()\n"
    )
    folder = compile_to(path, 2, batch_size=4)
    assert check_pipeline(folder, batch_size=2).ok
    config = load_config(data={"pipeline": str(folder), "data": {"name": "synthetic", "size": 16}, "mode": "local",
                               "steps": 1, "batch_size": 4})  # fmt: skip
    with pytest.raises(FtcError, match=r"input 'mask' grows with the batch in dimensions \[0, 1\]"):
        train(config)


def test_synthetic_class_targets_of_in_batch_logits_fit_the_micro_batch(tmp_path, compile_to):
    """Logits [B, B] over the batch's own samples, with no example_targets: a synthetic target
    is a class index per row, which must be below the micro-batch's B (4), not the compile
    batch's (8), or cross_entropy fails on an index out of range."""
    path = tmp_path / "pair_logits.py"
    path.write_text(
        "import torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n\n\n"
        "class PairLogits(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.a = nn.Linear(8, 16)\n        self.b = nn.Linear(8, 16)\n\n"
        "    def forward(self, x, y):\n        return self.a(x) @ self.b(y).t()\n\n\n"
        "def build_model():\n    return PairLogits()\n\n\n"
        "def example_inputs(batch_size):\n"
        "    return (torch.randn(batch_size, 8), torch.randn(batch_size, 8))\n\n\n"
        "def loss_fn(logits, target):\n    return F.cross_entropy(logits, target)\n"
    )
    folder = compile_to(path, 2, batch_size=8)
    losses = {}
    for mode in ("single", "local"):
        config = load_config(data={"pipeline": str(folder), "data": {"name": "synthetic", "size": 32}, "mode": mode,
                                   "steps": 3, "batch_size": 8, "micro_batches": 2})  # fmt: skip
        losses[mode] = train(config).loss
    torch.testing.assert_close(torch.tensor(losses["local"]), torch.tensor(losses["single"]), rtol=1e-5, atol=0)
    assert all(math.isfinite(loss) for loss in losses["single"])
