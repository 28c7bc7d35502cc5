"""The pipeline engine against independent truths: the original model trained with gradient
accumulation over the same micro-batches (local mode), and local mode against one process per
device under torchrun (dropout active, so the RNG streams must match too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftc.ir import FtcError
from ftc.runtime import load_model_file, load_pipeline
from ftc.runtime.engine import Engine
from tests.conftest import MODELS, ROOT, assert_local_trains_like_single
from tests.dist.engine_worker import build_model, case_batches, run_case

GENERATED = ROOT / "generated"
WORKER = ROOT / "tests" / "dist" / "engine_worker.py"
RELATIVE = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def reference(model_file, model, inputs, targets, micro_batches: int) -> float:
    """Plain PyTorch: the model on each micro-batch, loss / M backpropagated and accumulated."""
    batch = targets.shape[0]
    size = batch // micro_batches
    total = 0.0
    for m in range(micro_batches):
        part = slice(m * size, (m + 1) * size)
        if isinstance(inputs, dict):
            output = model(**{k: v[part] for k, v in inputs.items()})
        else:
            output = model(*(x[part] for x in inputs))
        loss = model_file.loss_fn(output, targets[part])
        (loss / micro_batches).backward()
        total += loss.item()
    return total / micro_batches


def local_engine(folder, *, dropout: bool, **options):
    pipeline = load_pipeline(folder)
    model_file = load_model_file(pipeline.model_file)
    model = build_model(model_file, dropout)
    modules = {spec.index: pipeline.stage_class(spec)(model) for spec in pipeline.stages}
    engine = Engine(pipeline, modules, loss_fn=model_file.loss_fn, seed=3, device=torch.device("cpu"), **options)
    return engine, model, model_file


@pytest.mark.parametrize(
    "name, schedule, micro_batches, recompute, target",
    [
        ("gpt", "gpipe", 4, [], ["randint", 256, [64]]),
        ("gpt", "1f1b", 2, [0, 3], ["randint", 256, [64]]),
        ("two_tower", "1f1b", 4, [2, 3], ["binary", []]),
    ],
)
def test_local_matches_gradient_accumulation(name, schedule, micro_batches, recompute, target):
    case = {"batch": 4, "steps": 1, "target": target}
    engine, model, model_file = local_engine(
        GENERATED / name, dropout=False, schedule=schedule, micro_batches=micro_batches, recompute=set(recompute)
    )
    inputs, targets = case_batches(case, model_file)[0]
    loss = engine.train_step(0, inputs, targets)

    original = build_model(model_file, dropout=False)
    want = reference(model_file, original, inputs, targets, micro_batches)
    assert loss == pytest.approx(want, rel=RELATIVE)
    wanted = dict(original.named_parameters())
    for key, param in model.named_parameters():
        assert relative_error(param.grad, wanted[key].grad) < RELATIVE, key


@pytest.mark.parametrize("schedule, recompute", [("gpipe", set()), ("1f1b", set()), ("1f1b", {0, 2})])
def test_a_buffer_read_later_on_the_same_device_is_read_as_its_forward_left_it(tmp_path, schedule, recompute):
    """sent_buffer's call counter, bumped by stage 0 and read by stage 2 on the same device (stages
    on devices [0, 1, 0]): stage 0 runs the next micro-batches' forwards before stage 2 reads the
    counter, which must still hold the count of its own micro-batch, as in the original model."""
    from ftc.compiler import CompileOptions, compile_model

    compiled = compile_model(MODELS / "sent_buffer.py", tmp_path / "compiled", CompileOptions(stages=3)).folder
    folder = copy_pipeline(compiled, tmp_path / "on_0_1_0", [0, 1, 0])
    assert "calls_1" in load_pipeline(folder).stages[2].inputs
    engine, model, model_file = local_engine(folder, dropout=False, schedule=schedule, micro_batches=4, recompute=recompute)
    inputs, targets = case_batches({"batch": 8, "steps": 1, "target": ["randint", 3, []]}, model_file)[0]
    loss = engine.train_step(0, inputs, targets)

    original = build_model(model_file, dropout=False)
    assert loss == pytest.approx(reference(model_file, original, inputs, targets, 4), rel=RELATIVE)
    wanted = dict(original.named_parameters())
    for key, param in model.named_parameters():
        assert relative_error(param.grad, wanted[key].grad) < RELATIVE, key


def test_recompute_gives_identical_losses_and_gradients_with_dropout():
    results = []
    for recompute in (set(), {0, 1, 2, 3}):
        engine, model, model_file = local_engine(
            GENERATED / "gpt", dropout=True, schedule="1f1b", micro_batches=2, recompute=recompute
        )
        inputs, targets = case_batches({"batch": 2, "steps": 1, "target": ["randint", 256, [64]]}, model_file)[0]
        loss = engine.train_step(5, inputs, targets)
        results.append((loss, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (loss_plain, grads_plain), (loss_recomputed, grads_recomputed) = results
    assert loss_recomputed == loss_plain
    for key, grad in grads_plain.items():
        assert torch.equal(grads_recomputed[key], grad), key


def test_dropout_streams_depend_on_step_not_on_call_order():
    engine, _, model_file = local_engine(GENERATED / "gpt", dropout=True, schedule="gpipe", micro_batches=2)
    inputs, targets = case_batches({"batch": 2, "steps": 1, "target": ["randint", 256, [64]]}, model_file)[0]
    first = engine.train_step(0, inputs, targets)
    torch.rand(100)  # the caller's own use of the global RNG must not change the masks
    again = engine.train_step(0, inputs, targets)
    other_step = engine.train_step(1, inputs, targets)
    assert again == first
    assert other_step != first


@pytest.mark.parametrize("name", ["gpt", "two_tower"])
def test_evaluate_matches_the_model_in_eval_mode(name):
    engine, model, model_file = local_engine(GENERATED / name, dropout=True, schedule="1f1b", micro_batches=2)
    target = ["randint", 256, [64]] if name == "gpt" else ["binary", []]
    inputs, targets = case_batches({"batch": 4, "steps": 1, "target": target}, model_file)[0]
    model.eval()
    loss, output = engine.evaluate(0, inputs, targets)
    with torch.no_grad():
        want = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    assert all(p.grad is None for p in model.parameters())
    wanted = want if isinstance(want, dict) else {"output": want}
    got = output if isinstance(output, dict) else {"output": output}
    assert set(got) == set(wanted)
    for key, value in wanted.items():
        assert relative_error(got[key], value) < RELATIVE, key
    assert loss == pytest.approx(reference(model_file, model, inputs, targets, 2), rel=RELATIVE)
    _, no_loss_output = engine.evaluate(0, inputs)
    assert no_loss_output is not None


def test_bad_batches_and_modules_are_clear_errors():
    engine, _, model_file = local_engine(GENERATED / "mlp", dropout=False, schedule="gpipe", micro_batches=3)
    inputs = model_file.inputs(4)
    with pytest.raises(FtcError, match="does not split into 3 equal micro-batches"):
        engine.train_step(0, inputs, torch.zeros(4, dtype=torch.long))
    with pytest.raises(FtcError, match="takes 1 inputs"):
        engine.train_step(0, (inputs[0], inputs[0]), torch.zeros(3, dtype=torch.long))
    pipeline = load_pipeline(GENERATED / "mlp")
    with pytest.raises(FtcError, match=r"runs stages \[0, 1, 2, 3\], but modules were given for \[0\]"):
        Engine(pipeline, {0: engine.modules[0]}, schedule="gpipe", micro_batches=1, loss_fn=None, seed=0, device="cpu")
    with pytest.raises(FtcError, match="unknown schedule"):
        Engine(pipeline, engine.modules, schedule="zigzag", micro_batches=1, loss_fn=None, seed=0, device="cpu")


def test_values_that_cannot_be_sent_are_refused(tmp_path):
    folder = copy_pipeline(GENERATED / "mlp", tmp_path / "mlp", devices=None)
    manifest = json.loads((folder / "pipeline.json").read_text())
    manifest["values"]["hidden_1"] = {"kind": "object"}
    (folder / "pipeline.json").write_text(json.dumps(manifest))
    with pytest.raises(FtcError, match="value hidden_1 .object. crosses devices"):
        local_engine(folder, dropout=False, schedule="gpipe", micro_batches=1)


def copy_pipeline(source: Path, target: Path, devices: list[int] | None) -> Path:
    """A copy of a generated pipeline, its stages placed on `devices` (the stage files unchanged)."""
    target.mkdir(parents=True)
    manifest = json.loads((source / "pipeline.json").read_text())
    for file in source.glob("stage*.py"):
        (target / file.name).write_text(file.read_text())
    manifest["model_file"] = str((source / manifest["model_file"]).resolve())
    if devices is not None:
        for stage, device in zip(manifest["stages"], devices):
            stage["device"] = device
    (target / "pipeline.json").write_text(json.dumps(manifest, indent=1))
    return target


def torchrun(processes: int, cases: list[dict], out_dir: Path) -> None:
    cases_path = out_dir / f"cases{processes}.json"
    cases_path.write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    result = subprocess.run(
        [*command, str(WORKER), str(cases_path), str(out_dir)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def dist_runs(tmp_path_factory):
    """One torchrun launch with 4 processes and one with 2, several cases each."""
    from ftc.compiler import CompileOptions, compile_model

    root = tmp_path_factory.mktemp("engine")
    shape_dependent = compile_model(MODELS / "shape_dependent.py", root / "compiled", CompileOptions(stages=4)).folder
    sent_buffer = compile_model(MODELS / "sent_buffer.py", root / "compiled", CompileOptions(stages=2)).folder
    gpt = GENERATED / "gpt"
    lm = ["randint", 256, [64]]
    four = [
        dict(
            name="gpt_gpipe_recompute", folder=str(gpt), schedule="gpipe", micro_batches=4, recompute=[1, 2], target=lm
        ),
        dict(name="gpt_1f1b", folder=str(gpt), schedule="1f1b", micro_batches=4, target=lm),
        dict(name="gpt_1f1b_m8", folder=str(gpt), schedule="1f1b", micro_batches=8, batch=8, target=lm),
        dict(
            name="two_tower_1f1b",
            folder=str(GENERATED / "two_tower"),
            schedule="1f1b",
            micro_batches=2,
            recompute=[3],
            target=["binary", []],
        ),
        dict(
            name="shape_dependent_gpipe",
            folder=str(shape_dependent),
            schedule="gpipe",
            micro_batches=2,
            target=["randn", [8, 16]],
        ),
    ]
    two = [
        dict(
            name="gpt_0110_1f1b",
            folder=str(copy_pipeline(gpt, root / "gpt_0110", [0, 1, 1, 0])),
            schedule="1f1b",
            micro_batches=4,
            recompute=[1, 3],
            target=lm,
        ),
        dict(
            name="gpt_0101_gpipe",
            folder=str(copy_pipeline(gpt, root / "gpt_0101", [0, 1, 0, 1])),
            schedule="gpipe",
            micro_batches=2,
            recompute=[0],
            target=lm,
        ),
        dict(
            name="sent_buffer_gpipe",
            folder=str(sent_buffer),
            schedule="gpipe",
            micro_batches=4,
            batch=8,
            target=["randint", 3, []],
        ),
        dict(name="wrong_world", folder=str(gpt), schedule="gpipe", micro_batches=2, target=lm),
        dict(
            name="timeout",
            folder=str(copy_pipeline(gpt, root / "gpt_0011", [0, 0, 1, 1])),
            timeout=2.0,
            batch=4,
            steps=1,
            target=lm,
        ),
    ]
    for case in four + two:
        case.setdefault("batch", 4)
        case.setdefault("steps", 2)
    torchrun(4, four, root)
    torchrun(2, two, root)
    return root, {case["name"]: case for case in four + two}


DIST_CASES = [
    "gpt_gpipe_recompute",
    "gpt_1f1b",
    "gpt_1f1b_m8",
    "two_tower_1f1b",
    "shape_dependent_gpipe",
    "gpt_0110_1f1b",
    "gpt_0101_gpipe",
    "sent_buffer_gpipe",
]


@pytest.mark.parametrize("name", DIST_CASES)
def test_distributed_matches_local(dist_runs, name):
    root, cases = dist_runs
    case = cases[name]
    local = run_case(case, distributed=False)
    ranks = sorted(root.glob(f"{name}.*.pt"))
    assert len(ranks) == len({s.device for s in load_pipeline(case["folder"]).stages})
    results = [torch.load(path) for path in ranks]
    for result in results:
        # The first step's loss only depends on the forward pass: bitwise equal. Later steps
        # follow updates whose tied-weight gradients were summed in another order.
        assert result["losses"][0] == local["losses"][0]
        assert result["losses"] == pytest.approx(local["losses"], rel=RELATIVE)
    for rank, result in enumerate(results):
        evaluation_loss, output = result["evaluation"]
        assert evaluation_loss == pytest.approx(local["evaluation"][0], rel=RELATIVE)
        if rank == load_pipeline(case["folder"]).stages[-1].device:
            assert_same_structure(output, local["evaluation"][1])
        else:
            assert output is None
    seen = set()
    for result in results:
        for key, grad in result["grads"].items():
            assert relative_error(grad, local["grads"][key]) < RELATIVE, (name, key)
            seen.add(key)
    assert seen == set(local["grads"])


def test_sent_values_are_let_go_once_delivered(dist_runs):
    """Under 1F1B with 8 micro-batches a middle stage sends 16 values a training step (8
    activations, 8 gradients). Its transport holds one only until a later message from the
    receiver proves it delivered, so at most what the schedule keeps in flight, not all 16 until
    the step ends."""
    root, _ = dist_runs
    held = [torch.load(root / f"gpt_1f1b_m8.{rank}.pt")["most_pending_sends"] for rank in range(4)]
    sends_per_step = [8, 16, 16, 8]
    assert all(0 < count < sends for count, sends in zip(held, sends_per_step)), held
    assert max(held) <= 5, held


def test_distributed_needs_one_process_per_device(dist_runs):
    root, _ = dist_runs
    for rank in range(2):
        error = torch.load(root / f"wrong_world.{rank}.pt")["error"]
        assert "the pipeline runs on 4 devices but torchrun started 2 processes" in error
        assert "--nproc-per-node 4" in error


def assert_same_structure(got, want) -> None:
    """Equal up to float summation order (parameters after a step with tied-weight gradients)."""
    if isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            assert_same_structure(got[key], want[key])
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert_same_structure(a, b)
    else:
        assert relative_error(got, want) < RELATIVE


def test_timeout_names_ranks_value_and_step(dist_runs):
    root, cases = dist_runs
    outcome = json.loads((root / "timeout.json").read_text())
    assert outcome["error"] is not None
    assert "rank 1 got nothing from rank 0 (value x_8, micro-batch 0 of batch 18) within 2 s" in outcome["error"]
    assert outcome["seconds"] < 2 * cases["timeout"]["timeout"] + 5


def _three_steps(folder, mode, **settings):
    from ftc.runtime.config import load_config
    from ftc.runtime.train import train

    config = load_config(data={
        "pipeline": str(folder), "data": {"name": "synthetic", "size": 32}, "mode": mode, "steps": 3,
        "batch_size": 8, "micro_batches": 2, "optimizer": {"name": "adam", "lr": 0.01}, "log_every": 10, **settings,
    })  # fmt: skip
    return train(config).loss


def test_a_recomputed_forward_that_changes_a_weight_again_is_refused(compile_to):
    """An EMA teacher updated in forward was updated again by the recomputed forward, which then
    computed the teacher's output from twice-updated weights: the losses parted from mode
    single's at the first step."""
    folder = compile_to(MODELS / "ema_teacher.py", 2)
    with pytest.raises(FtcError, match="changes parameter teacher.2.weight in place in its forward") as error:
        _three_steps(folder, "local", recompute="always")
    assert "take stage 1 out of recompute" in error.value.hint


def test_compiling_with_recompute_leaves_a_stage_that_changes_a_weight_in_place_out(tmp_path):
    """--recompute always recomputes every stage but those holding the EMA update, and says
    why; training then follows pipeline.json and equals plain single-process training."""
    from ftc.compiler import CompileOptions, compile_model

    compiled = compile_model(MODELS / "ema_teacher.py", tmp_path / "out", CompileOptions(stages=3, recompute="always"))
    stages = compiled.manifest["stages"]
    kept = [s for s, stage in enumerate(stages) if not stage["recompute"]]
    assert kept and len(kept) < len(stages), [stage["recompute"] for stage in stages]
    for s in kept:
        assert any(name.startswith("teacher.") for name in stages[s]["state"]), stages[s]["state"]
        assert any(f"stage {s} does not recompute: its forward changes parameter teacher." in note
                   for note in compiled.notes), compiled.notes  # fmt: skip
    assert_local_trains_like_single(compiled.folder)
