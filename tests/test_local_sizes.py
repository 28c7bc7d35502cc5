"""A size a stage can take off its own tensors is taken there, not received (passes/local_sizes.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .conftest import assert_local_trains_like_single
from .test_equivalence import assert_check_passes

MODELS = Path(__file__).parent / "models"

CONVS_THEN_VIEW = """
import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(6))
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, image):
        batch = image.size(0)
        h = image
        for conv in self.convs:
            h = torch.relu(conv(h))
        rows = h.flatten(0, 1)  # [4 * batch, 8, 8]: a batch dimension of another length
        h = h + rows.view(batch, 4, 8, 8)
        return self.head(h.reshape(batch, -1))


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 4, 8, 8),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
"""


def test_a_later_stage_takes_the_batch_size_off_a_tensor_it_has(tmp_path, compile_to):
    """`batch = image.size(0)` at the top of forward, read by `.view(batch, ...)` after the last
    convolution: stage 0 sent the Python int to the last stage (a super-resolution model's
    `def forward(self, batch, out)`). The last stage now takes it off a tensor it receives,
    whose batch dimension has its length, not off `rows`, whose batch dimension is 4 times longer;
    the batch size stays symbolic (checked at two) and the pipeline trains as the model does."""
    path = tmp_path / "convs_then_view.py"
    path.write_text(CONVS_THEN_VIEW)
    folder = compile_to(path, 3, batch_size=4, frontend="export")
    manifest = json.loads((folder / "pipeline.json").read_text())
    crossing = [name for stage in manifest["stages"] for name in stage["inputs"]]
    assert all(manifest["values"][name]["kind"] == "tensor" for name in crossing), manifest["values"]
    readers = [stage for stage in manifest["stages"] if "(batch," in (folder / stage["file"]).read_text()]
    assert readers and all(stage["index"] > 0 for stage in readers), manifest["stages"]
    for stage in readers:
        body = (folder / stage["file"]).read_text().split("def forward")[1]
        taken = re.findall(r"\n\s+batch\w* = (\w+)\.size\(0\)\n", body)
        assert len(taken) == 1 and taken[0] != "rows", body
    assert "batch" not in (folder / "stage0.py").read_text().split("def forward")[1], "stage 0 still takes the size"
    assert_check_passes(folder, batch_size=4)
    assert_check_passes(folder, batch_size=3)
    assert_local_trains_like_single(folder)


def test_a_size_stays_where_it_is_made_while_a_stage_without_a_tensor_to_take_it_off_reads_it():
    """Stage 1 reads `batch` only (`torch.zeros(batch)`), stage 2 with a batched tensor: stage 2
    takes its own, and `batch` stays in stage 0 for stage 1, not moved to stage 2, where stage 1
    would read it from a later stage; the graph computes what it computed."""
    import torch

    from ftc.interpreter import Interpreter
    from ftc.ir import Graph, Node, Outputs, Ref, ScalarMeta, TensorMeta, validate
    from ftc.passes.local_sizes import take_sizes_locally

    def batched(*shape):
        return TensorMeta(list(shape), "float32", batch_dim=0)

    nodes = [
        Node("image", "input", "image", meta=batched(4, 3), stage=0),
        Node("batch", "call_method", "size", (Ref("image"), 0), label="batch",
             meta=ScalarMeta("int", 4, batch_dependent=True), stage=0),
        Node("a", "call_function", "torch.relu", (Ref("image"),), meta=batched(4, 3), stage=0),
        Node("zeros", "call_function", "torch.zeros", (Ref("batch"),), meta=batched(4), stage=1),
        Node("b", "call_method", "view", (Ref("a"), Ref("batch"), -1), meta=batched(4, 3), stage=2),
    ]  # fmt: skip
    graph = Graph("sizes", nodes, Outputs("tuple", [Ref("b"), Ref("zeros")]), batch_size=4, num_stages=3,
                  stage_devices=[0, 1, 2])  # fmt: skip
    local = take_sizes_locally(graph)
    validate(local)
    by_name = local.by_name()
    assert by_name["batch"].stage == 0 and by_name["zeros"].args == (Ref("batch"),)
    taken = by_name[by_name["b"].args[1].name]
    assert (taken.stage, taken.target, taken.args) == (2, "size", (Ref("a"), 0))
    image = torch.randn(5, 3)
    for got, expected in zip(Interpreter(local, torch.nn.Module()).run((image,)), (image.relu(), torch.zeros(5))):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_sizes_fx_records_as_items_of_a_shape_are_taken_off_a_later_stages_own_tensor(compile_to):
    """fx records `x.shape[0]` and `x.size()[0]` as an item of the tensor's shape (a getattr of
    `shape` or a call of `size` without a dimension, then getitem), and `unpacked, width =
    x.shape` as two items of one: the last stage received each batch size as a Python int from
    stage 0. It now takes them off a tensor it has (`x.size(-2)` too); a shape only the moved
    items read moves with them, leaving no bare `x.shape` in stage 0; `width`, no batch
    dimension, is still sent (only a batch dimension is equal on another tensor); and the stages
    compute what the model computes at another batch size than the compile's."""
    folder = compile_to(MODELS / "shape_items.py", 3, batch_size=4, frontend="fx", method="uniform")
    manifest = json.loads((folder / "pipeline.json").read_text())
    crossing = {name for stage in manifest["stages"] for name in stage["inputs"]}
    assert {name for name in crossing if manifest["values"][name]["kind"] != "tensor"} == {"width"}, manifest["values"]
    first = (folder / "stage0.py").read_text().split("def forward")[1]
    assert not re.search(r"\n\s+x\.(shape|size\(\))\n", first), first
    last = (folder / manifest["stages"][-1]["file"]).read_text().split("def forward")[1]
    for size in ("batch", "rows", "counted_back", "unpacked"):
        assert re.search(rf"\n\s+{size} = ", last), last
    assert_check_passes(folder, batch_size=4)
    assert_check_passes(folder, batch_size=3)
