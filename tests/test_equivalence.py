"""The compiler's correctness statement, for every example and stage count: running the
generated stages in order, passing values by name, computes exactly what the original model
computes — outputs, updated buffers and parameter gradients (fp32, relative difference at most
1e-5) — also at a batch size other than the one compiled with."""

from __future__ import annotations

import ast
import re
import json

import black
import pytest
import torch

from ftc.check import check_pipeline
from ftc.frontends import trace
from ftc.ir import FtcError
from ftc.runtime import LocalExecutor, load_model_file, load_pipeline
from ftc.runtime.config import load_config
from ftc.runtime.train import train

from .conftest import EXAMPLES, MODELS, assert_local_trains_like_single, stdlib_modules

CASES = [
    (EXAMPLES / "gpt.py", (1, 2, 4, 8)),
    (EXAMPLES / "mlp.py", (1, 2, 4)),
    (EXAMPLES / "resnet.py", (1, 2, 4, 8)),
    (EXAMPLES / "unet.py", (1, 2, 4, 8)),
    (EXAMPLES / "two_tower.py", (1, 2, 4)),
    (MODELS / "inplace.py", (1, 2, 4)),
    (MODELS / "buffers.py", (1, 2, 4)),
    (MODELS / "shared.py", (1, 2, 4)),
    (MODELS / "leaf.py", (1, 2)),
    (MODELS / "shape_dependent.py", (1, 2, 4, 8)),
    (MODELS / "deep_skip.py", (1, 2, 4, 8)),
    (MODELS / "no_grad.py", (1, 2, 3)),
    (MODELS / "odd_structure.py", (1, 2)),
    (MODELS / "param_view.py", (1, 2, 3)),
    (MODELS / "param_containers.py", (1, 2, 4, 8)),
    (MODELS / "odd_ops.py", (1, 2, 3)),
    (MODELS / "eval_mode.py", (1, 2, 3)),
]
PARAMS = [pytest.param(path, stages, id=f"{path.stem}-P{stages}") for path, counts in CASES for stages in counts]


def assert_check_passes(folder, batch_size):
    report = check_pipeline(folder, batch_size=batch_size)
    details = [(s.file, s.outputs, s.input_grads, s.gradients, s.state, s.problems) for s in report.stages]
    assert report.ok, (
        f"{report.problems}; end to end: outputs {report.model_outputs:.2e}, "
        f"gradients {report.model_gradients:.2e}, state {report.model_state:.2e}; per stage {details}"
    )


def assert_stage_files_standalone_and_working(folder):
    """Each stage file is black-formatted, imports only torch and the standard library, and
    holds a real part of the work: some op that computes, not only views and size lookups
    (which the cost model prices at zero)."""
    manifest = json.loads((folder / "pipeline.json").read_text())
    allowed = stdlib_modules() | {"torch"}
    for stage in manifest["stages"]:
        source = (folder / stage["file"]).read_text()
        assert black.format_str(source, mode=black.Mode()) == source, f"{stage['file']} is not black-formatted"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{stage['file']} imports {roots - allowed}"
        assert stage["cost"]["fwd_time"] > 0, f"{stage['file']} holds no op that computes"


@pytest.mark.parametrize("model_path,stages", PARAMS)
def test_stages_compute_what_the_model_computes(model_path, stages, compile_to):
    folder = compile_to(model_path, stages, batch_size=4)
    manifest = json.loads((folder / "pipeline.json").read_text())
    assert len(manifest["stages"]) == stages
    assert_stage_files_standalone_and_working(folder)
    assert_check_passes(folder, batch_size=4)
    assert_check_passes(folder, batch_size=3)  # stage code must not bake in the compile batch size


@pytest.mark.parametrize("model_path", [*sorted(EXAMPLES.glob("*.py")), MODELS / "shared.py"], ids=lambda p: p.stem)
def test_original_state_dict_loads_into_stages(model_path, compile_to):
    """Keys are the original's: a state_dict saved from the model loads into fresh stages, which
    then compute the model's outputs."""
    folder = compile_to(model_path, 4)
    model_file = load_model_file(model_path)
    torch.manual_seed(0)
    original = model_file.build().eval()
    torch.manual_seed(1)
    other = model_file.build().eval()
    pipeline = load_pipeline(folder)
    executor = LocalExecutor(pipeline, other)
    saved = original.state_dict()
    held = set()
    for stage in executor.stages:
        keys = stage.state_dict().keys()
        stage.load_state_dict({key: saved[key] for key in keys}, strict=True)
        held |= set(keys)
    assert held == set(saved)
    batch = model_file.inputs(2)
    expected = original(**batch) if isinstance(batch, dict) else original(*batch)
    with torch.no_grad():
        actual = executor.forward(batch)
    flat = lambda v: list(v.values()) if isinstance(v, dict) else list(v) if isinstance(v, tuple) else [v]  # noqa: E731
    for a, e in zip(flat(actual), flat(expected)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_odd_ops_split_and_read_as_their_public_names(compile_to):
    folder = compile_to(MODELS / "odd_ops.py", 3, batch_size=4)
    code = "\n".join(path.read_text() for path in sorted(folder.glob("stage*.py")))
    assert "torch._C" not in code
    for public in ("torch.linalg.vector_norm(", "torch.special.expit(", "torch.fft.rfft(", "~mask"):
        assert public in code
    # The dict the gate returns stays in the gate's stage: its items are what cross.
    manifest = json.loads((folder / "pipeline.json").read_text())
    crossing = {name for stage in manifest["stages"][1:] for name in stage["inputs"]}
    assert all(manifest["values"][name]["kind"] == "tensor" for name in crossing)


def test_buffer_updated_in_forward_stays_with_its_readers(compile_to):
    """Each device holds its own copy of a buffer, so the op that updates a buffer in place and
    every op that reads it must share a stage."""
    folder = compile_to(MODELS / "buffers.py", 8)
    manifest = json.loads((folder / "pipeline.json").read_text())
    holders = [stage["index"] for stage in manifest["stages"] if "ema" in stage["state"]]
    assert len(holders) == 1, holders


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_value_sized_by_the_batch_out_of_proportion_stays_with_its_reader(compile_to, frontend):
    """`self.queue[:-B]` is [QUEUE - B, D]: no micro-batch size tells its size, so no stage may
    receive it. torch.export bounds the batch by the queue, which ftc takes, and says, rather
    than refuse the model."""
    folder = compile_to(MODELS / "queue_slice.py", 2, batch_size=4, frontend=frontend)
    assert_check_passes(folder, batch_size=3)
    assert_local_trains_like_single(folder)
    if frontend == "export":
        notes = trace(load_model_file(MODELS / "queue_slice.py"), 4, "export").graph.trace_notes
        assert any("batch sizes up to 32" in note for note in notes), notes
        assert json.loads((folder / "pipeline.json").read_text())["batch_range"] == [1, 32]


def test_a_guard_torch_cannot_prove_but_that_holds_at_every_batch_size_is_taken(compile_to):
    """Llama 4's expert views make torch's solver refuse a named batch for `Eq(6*B*Min(8, 48*B),
    48*B)`, true at every batch size; ftc refused the model as one that fixes a size computed
    from the batch. The stages run at any micro-batch size, as the model does."""
    folder = compile_to(MODELS / "expert_views.py", 2, batch_size=4, frontend="export")
    assert "batch_range" not in json.loads((folder / "pipeline.json").read_text())
    assert_check_passes(folder, batch_size=3)
    assert_local_trains_like_single(folder)


def test_training_refuses_micro_batches_above_the_batch_range_export_found(compile_to):
    """Micro-batches of 40 samples would slice `self.queue[:-40]` of a 32-row queue: the stage
    fails with a shape error deep inside, and so does the original model in mode single. The
    config is refused first, naming its keys, the range and micro-batch counts that fit."""
    folder = compile_to(MODELS / "queue_slice.py", 2, batch_size=4, frontend="export")
    for mode in ("single", "local"):
        config = load_config(data={"pipeline": str(folder), "mode": mode, "steps": 1, "batch_size": 80,
                                   "micro_batches": 2, "data": {"name": "synthetic", "size": 160}})  # fmt: skip
        with pytest.raises(FtcError) as refused:
            train(config)
        message = str(refused.value)
        assert "micro-batches of 40 samples (batch_size 80 / micro_batches 2)" in message, message
        assert "batch sizes 1 to 32" in message and "set micro_batches to 4, 5, 8, 10 or more" in message, message


def _edit_stage(folder, old, new):
    """Hand-edit the stage file that holds `old` (its last occurrence); return its stage index."""
    manifest = json.loads((folder / "pipeline.json").read_text())
    for stage in manifest["stages"]:
        path = folder / stage["file"]
        source = path.read_text()
        if old in source:
            head, _, tail = source.rpartition(old)
            path.write_text(head + new + tail)
            return stage["index"]
    raise AssertionError(f"no stage holds {old!r}")


@pytest.mark.parametrize(
    "model,old,new,named",
    [
        # A counter bumped in forward that nothing reads: the outputs cannot show its loss.
        ("buffers.py", "self.steps.add_(1)\n", "\n", "steps (0, the model's 1)"),
        # An EMA teacher's weight updated under no_grad; the update's result is still used, only
        # the parameter is no longer written.
        ("ema_teacher.py", ".mul_(0.9)", " * 0.9", "relative difference"),
    ],
)
def test_check_fails_a_stage_that_drops_a_write_to_model_state(compile_to, model, old, new, named):
    """A hand-edited stage that no longer writes a buffer or parameter forward updates in place
    computes this forward's outputs and gradients exactly; check compares the state itself and
    names the key and the stage."""
    folder = compile_to(MODELS / model, 2)
    assert_check_passes(folder, batch_size=4)
    index = _edit_stage(folder, old, new)
    report = check_pipeline(folder, batch_size=4)
    assert not report.ok
    assert report.model_outputs == 0.0 and report.model_gradients == 0.0
    assert report.model_state > report.tolerance  # end to end sees it too
    stage = report.stages[index]
    assert not report.stage_ok(stage) and stage.state > report.tolerance
    (problem,) = stage.problems
    assert problem.startswith("after the forward, the stage's state differs from the model's at ") and named in problem
    key = problem.removeprefix("after the forward, the stage's state differs from the model's at ").split(" (")[0]
    assert key in json.loads((folder / "pipeline.json").read_text())["stages"][index]["state"]
    assert all(report.stage_ok(other) for other in report.stages if other.index != index)


def test_check_judges_gradients_against_the_models_gradient_scale():
    """A gradient that is zero in exact arithmetic holds only rounding noise, which two correct
    computations produce differently; a wrong gradient must still fail."""
    from ftc.check import gradient_floor, relative_difference

    model = torch.nn.Linear(4, 4)
    model.weight.grad = torch.full((4, 4), 0.5)
    model.bias.grad = torch.full((4,), 1.5e-8)
    floor = gradient_floor(model)
    noise = model.bias.grad + 4e-9
    assert relative_difference(noise, model.bias.grad, floor) < 1e-5
    assert relative_difference(noise, model.bias.grad) > 1e-3  # without the floor: "different"
    small = torch.full((4,), 1e-3)
    assert relative_difference(small * 1.1, small, floor) > 1e-3


def test_self_training_passed_to_a_function_follows_the_stage_mode(compile_to):
    """fx would bake `self.training` in as the traced mode's True; the stages pass their own
    `self.training` instead, so eval() turns their functional dropout off as it does the model's."""
    folder = compile_to(MODELS / "training_flag.py", 2, batch_size=4, frontend="fx")
    text = "".join((folder / f"stage{k}.py").read_text() for k in range(2))
    assert text.count("training=self.training") == 6 and "training=True" not in text
    model_file = load_model_file(MODELS / "training_flag.py")
    torch.manual_seed(0)
    original = model_file.build().eval()
    executor = LocalExecutor(load_pipeline(folder), original)
    batch = model_file.inputs(6)
    with torch.no_grad():
        for stage in executor.stages:
            stage.eval()
        torch.testing.assert_close(executor.forward(batch), original(*batch), rtol=1e-6, atol=1e-7)
        for stage in executor.stages:
            stage.train()
        assert (executor.forward(batch) == 0).any()  # training mode drops units again
    assert_check_passes(folder, batch_size=4)


BRANCHES_ON_TRAINING = """
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        if self.training:
            h = h * 2
        return self.b(h)


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 4),)
"""


def test_a_branch_on_self_training_is_named_when_compiling(tmp_path):
    from ftc.compiler import CompileOptions, compile_model

    path = tmp_path / "branchy.py"
    path.write_text(BRANCHES_ON_TRAINING)
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=2))
    named = [note for note in compiled.notes if "self.training at branchy.py:14" in note]
    assert named and "move a branch of the model's own into a module that holds no other layer" in named[0], named
    assert json.loads((compiled.folder / "ir.json").read_text())["training_branches"] == ["branchy.py:14"]
    assert "h * 2" in "".join(stage.read_text() for stage in compiled.folder.glob("stage*.py"))


ATTENTION_DROPOUT = """
import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, p, monte_carlo=False):
        super().__init__()
        self.qkv, self.p, self.monte_carlo = nn.Linear(8, 24), p, monte_carlo

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], 5, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        if self.monte_carlo:
            return F.scaled_dot_product_attention(q, k, v, None, self.p).flatten(1)
        return F.scaled_dot_product_attention(
            q, k, v,
            dropout_p=self.p if self.training else 0.0,
        ).flatten(1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = Attention(0.25), Attention(0.5, monte_carlo=True)
        self.head = nn.Linear(40, 2)

    def forward(self, x):
        return self.head(self.first(x) + self.second(x))


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 5, 8),)
"""


def test_attention_dropout_chosen_by_self_training_follows_the_stage_mode(tmp_path):
    """`dropout_p=p if self.training else 0.0` (torch.nn, timm, nanoGPT) is a branch fx sees only
    as the traced number: it is written back as that expression, so the stages stop dropping in
    eval mode and the eval figure is judged; a probability chosen without self.training (Monte
    Carlo dropout) stays a number."""
    from ftc.compiler import CompileOptions, compile_model

    path = tmp_path / "attention_dropout.py"
    path.write_text(ATTENTION_DROPOUT)
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend="fx"))
    code = "".join(stage.read_text() for stage in compiled.folder.glob("stage*.py"))
    assert "dropout_p=0.25 if self.training else 0.0" in code and "None, 0.5" in code
    assert compiled.graph.training_branches == [] and not any("self.training at" in n for n in compiled.notes)
    report = check_pipeline(compiled.folder)
    assert report.ok and report.eval_expected  # eval mode judged: the first attention drops nothing there


def test_a_parameter_view_sent_across_stages_is_checked_against_unchanged_gradients(compile_to):
    """`self.proj.t()` made in the middle stage and read by the last, `proj` also used by the
    first: the check must compare against gradients autograd has not since adopted as
    `proj.grad` and added into (it reported FAILED on correct pipelines)."""
    folder = compile_to(MODELS / "param_view.py", 3, batch_size=4)
    manifest = json.loads((folder / "pipeline.json").read_text())
    assert "back" in manifest["stages"][1]["outputs"] and "back" in manifest["stages"][2]["inputs"]
    assert_check_passes(folder, batch_size=4)


def test_self_training_used_as_a_number_traces_and_is_named(tmp_path):
    """`1 - 0.1 * self.training` and `int(self.training)` trace with fx as the traced mode's
    numbers (they did before the stand-in flag), and the compile note names both lines."""
    from ftc.compiler import CompileOptions, compile_model

    path = tmp_path / "numeric.py"
    path.write_text(BRANCHES_ON_TRAINING.replace(
        "        if self.training:\n            h = h * 2\n",
        "        h = h * (1.0 - 0.1 * self.training)\n        h = h * (1 + int(self.training))\n",
    ))  # fmt: skip
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend="fx"))
    assert compiled.graph.training_branches == ["numeric.py:14", "numeric.py:15"]
    assert_check_passes(compiled.folder, batch_size=3)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_checkpointed_blocks_train_every_weight_and_the_compile_says_so(tmp_path, frontend):
    """torch.utils.checkpoint (reentrant and not) is traced as a plain call: no stage runs a
    block under no_grad, every gradient equals the model's, and the compile names the calls."""
    from ftc.compiler import CompileOptions, compile_model

    compiled = compile_model(MODELS / "checkpointed.py", tmp_path, CompileOptions(stages=3, frontend=frontend))
    (note,) = [n for n in compiled.notes if "torch.utils.checkpoint" in n]
    assert "checkpointed.py:30: traced as a plain call" in note
    assert not any("no_grad" in path.read_text() for path in compiled.folder.glob("stage*.py"))
    assert_check_passes(compiled.folder, batch_size=8)


def test_check_blames_only_the_edited_stage_for_a_weight_stages_share(compile_to):
    """The embedding table both ends of the network read sums both stages' gradients; the stage
    that did not change computes its part exactly, so check must pass it and fail the other."""
    folder = compile_to(MODELS / "shared.py", 2)
    index = _edit_stage(folder, "F.linear(", "2 * F.linear(")
    report = check_pipeline(folder, batch_size=4)
    assert not report.ok and report.model_gradients > report.tolerance
    assert report.stages[index].gradients > report.tolerance
    assert all(report.stage_ok(other) for other in report.stages if other.index != index)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_an_operator_of_the_models_own_is_called_and_named_in_the_stage(tmp_path, frontend):
    """The stages call torch.ops.ftc_tests.*, which only the model file registers, so their
    docstrings say so; their outputs and gradients (an operator's own backward) are the model's,
    an operator that returns nothing but writes a buffer is kept (fx left it unread and dropped
    it), the file is imported once however often it is loaded (its Library may define its
    namespace once), and the pipeline trains in local mode as in single."""
    from ftc.compiler import CompileOptions, compile_model

    compiled = compile_model(MODELS / "custom_op.py", tmp_path / "out", CompileOptions(stages=2, frontend=frontend))
    first, second = (path.read_text() for path in sorted(compiled.folder.glob("stage*.py")))
    assert "torch.ops.ftc_tests.count_samples.default(self.seen, x)" in first
    assert "registers:\ntorch.ops.ftc_tests.count_samples, torch.ops.ftc_tests.scaled_tanh. Import it" in first
    assert "registers:\ntorch.ops.ftc_tests.scaled_tanh, torch.ops.ftc_tests_lib.halve. Import it" in second
    assert "torch.ops.ftc_tests_lib.halve" in second
    for text in (first, second):
        assert "torch.ops.ftc_tests.scaled_tanh.default(" in text
    assert_stage_files_standalone_and_working(compiled.folder)
    assert_check_passes(compiled.folder, batch_size=8)
    assert_check_passes(compiled.folder, batch_size=3)
    assert_local_trains_like_single(compiled.folder)


NO_FAKE_KERNEL = """
import torch
import torch.nn as nn

{definition}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return {call}


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""
NEW_STYLE = (
    '@torch.library.custom_op("ftc_tests_unfaked::relu_twice", mutates_args=())\n'
    "def relu_twice(x: torch.Tensor) -> torch.Tensor:\n    return x.relu() * 2",
    "relu_twice(self.fc(x))",
    "ftc_tests_unfaked::relu_twice",
    "`@relu_twice.register_fake`",
)
OLD_STYLE = (
    'library = torch.library.Library("ftc_tests_unfaked_{frontend}", "DEF")\nlibrary.define("twice(Tensor x) -> Tensor")\n'
    'library.impl("twice", lambda x: x * 2, "CPU")',
    "torch.ops.ftc_tests_unfaked_{frontend}.twice(self.fc(x))",
    "ftc_tests_unfaked_{frontend}::twice",
    '`@torch.library.register_fake("ftc_tests_unfaked_{frontend}::twice")`',
)  # a process may define a Library namespace once: one per frontend


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("style", [NEW_STYLE, OLD_STYLE], ids=["custom_op", "library"])
def test_an_operator_without_a_fake_kernel_is_named_with_the_decorator_that_gives_it_one(tmp_path, frontend, style):
    """The model runs in plain PyTorch; only the meta device needs the fake kernel, so the error
    names the operator and how to register one, not "fix the model or example_inputs()"."""
    from ftc.compiler import CompileOptions, compile_model

    definition, call, op, decorator = (text.replace("{frontend}", frontend) for text in style)
    path = tmp_path / f"unfaked_{frontend}.py"
    path.write_text(NO_FAKE_KERNEL.replace("{definition}", definition).replace("{call}", call))
    with pytest.raises(FtcError, match=f"the operator {op} has no fake kernel, which ftc needs") as error:
        compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend=frontend))
    assert decorator in error.value.hint
    assert "example_inputs" not in error.value.hint


DROPPED_NORM = """
import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.norm = nn.BatchNorm1d(16)
        self.b = nn.Linear(16, 3)

    def forward(self, x):
        h = self.a(x)
        self.norm(h)  # only for its running statistics
        return self.b(h) + self.norm.running_mean[:3]


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
"""


def test_a_batch_norm_whose_value_forward_drops_still_updates_its_statistics_through_export(tmp_path):
    """Through export a BatchNorm is an F.batch_norm call that writes its running statistics
    unseen by its schema (Node.updates); with its value unread, dead-code removal dropped it, so
    the stages never updated running_mean (`ftc check`: buffers 1.0 apart) and trained on other
    numbers than the model."""
    from ftc.compiler import CompileOptions, compile_model

    path = tmp_path / "dropped_norm.py"
    path.write_text(DROPPED_NORM)
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend="export"))
    assert "F.batch_norm(" in "".join(stage.read_text() for stage in compiled.folder.glob("stage*.py"))
    assert_check_passes(compiled.folder, batch_size=8)
    assert_local_trains_like_single(compiled.folder)


DEAD_LAYER_CALLS = """
import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.probe = nn.Linear(16, 4)
        self.side = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.hooked = nn.Linear(16, 4)
        self.hooked.register_forward_hook(lambda module, args, out: None)
        self.norm = nn.BatchNorm1d(16)
        self.act = nn.ReLU(inplace=True)
        self.b = nn.Linear(16, 16)
        self.noise = {noise}
        self.c = nn.Linear(16, 3)

    def forward(self, x):
        h = self.a(x)
        self.probe(h)
        self.side(h)
        self.hooked(h)
        self.norm(h)
        h = self.b(h)
        self.act(h)
        self.noise(h)
        return self.c(h)


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)


def loss_fn(output, target):
    return F.cross_entropy(output, target)
"""


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_torch_layer_whose_value_forward_drops_is_left_out_unless_its_call_matters(tmp_path, frontend):
    """A WaveNet's last residual convolution, whose output forward drops, ran in the stage code as
    a bare statement: dead code was removed but for module calls. A torch.nn layer's call (a
    Sequential of them too) now goes, unless it updates state (BatchNorm's statistics), changes
    its input (ReLU(inplace=True)), a hook watches it or it draws random numbers (Dropout,
    RReLU, whose draws later ones follow); the stages still compute and train as the model."""
    from ftc.compiler import CompileOptions, compile_model

    path = tmp_path / "dead.py"
    path.write_text(DEAD_LAYER_CALLS.format(noise="nn.Identity()"))
    compiled = compile_model(path, tmp_path / "out", CompileOptions(stages=2, frontend=frontend))
    code = "".join(stage.read_text() for stage in sorted(compiled.folder.glob("stage*.py")))
    assert "self.probe(" not in code and "self.side[" not in code and "self.side(" not in code and "self.noise(" not in code, code
    lowered = {"norm": r"F\.batch_norm\(\s+h\w*,", "act": r"F\.relu\(h\w*, inplace=True\)"}
    for kept in ("hooked", "norm", "act"):
        written = lowered[kept] if frontend == "export" and kept in lowered else rf"self\.{kept}\(h\w*\)"
        assert re.search(rf"\n\s+(\w+ = )?{written}", code), (kept, code)
    assert_check_passes(compiled.folder, batch_size=8)
    assert_local_trains_like_single(compiled.folder)
    for noise in ("nn.Dropout(0.5)", "nn.RReLU()"):
        path.write_text(DEAD_LAYER_CALLS.format(noise=noise))
        compiled = compile_model(path, tmp_path / noise, CompileOptions(stages=1, frontend=frontend))
        forward = (compiled.folder / "stage0.py").read_text().partition("def forward")[2]
        assert re.search(r"self\.noise\(h\w*\)|F\.dropout\(h\w*|\.rrelu\w*\.default\(h\w*", forward), forward
