"""Checkpoints across runs, in one process (mode single and local; tests/test_train.py covers
dist):

- a run resumed in another mode continues the uninterrupted run exactly, though mode single
  orders the optimizer's parameters as the model registers them and the pipeline stage by stage;
- a resumed run takes the config's optimizer settings (a changed lr applies), not the checkpoint's;
  an optimizer whose state is of another kind (Adam after SGD with momentum) is refused;
- a new run in a folder holding an earlier run's checkpoints keeps them until its own first
  checkpoint is complete: a run that fails before that loses nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftc.compiler import CompileOptions, compile_model
from ftc.ir import FtcError
from ftc.runtime import checkpoint
from ftc.runtime.config import load_config
from ftc.runtime.results import summary
from ftc.runtime.train import train

from .conftest import MODELS

# Its head is registered before the body it runs after.
MODEL = (MODELS / "classifier.py").read_text()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    (root / "model.py").write_text(MODEL)
    return root, compile_model(root / "model.py", root / "generated", CompileOptions(stages=2)).folder


def config(root, folder, name, **settings):
    data = {
        "pipeline": str(folder), "data": {"name": "synthetic", "size": 64}, "batch_size": 8, "micro_batches": 2,
        "optimizer": {"name": "adam", "lr": 0.01}, "steps": 6, "log_every": 10,
        "checkpoint": {"dir": str(root / name), "every": 3},
    }  # fmt: skip
    data.update(settings)
    return load_config(data=data)


def test_resuming_in_another_mode_continues_the_run_exactly(pipeline):
    root, folder = pipeline
    whole = train(config(root, folder, "whole", mode="single")).loss
    with pytest.raises(FtcError, match="the loss is nan at step 4"):
        train(config(root, folder, "switch", mode="single", inject_fault={"kind": "nan", "step": 4}))
    resumed = train(config(root, folder, "switch", mode="local", checkpoint={"dir": str(root / "switch"), "resume": True}))
    assert len(resumed.loss) == 3
    torch.testing.assert_close(torch.tensor(resumed.loss), torch.tensor(whole[3:]), rtol=1e-5, atol=0)


def test_a_resumed_runs_results_and_curve_cover_the_whole_run(pipeline, tmp_path):
    """Its final figures (the mean of the last 10 steps, the last held-out loss) and its loss
    curve were those of the steps after the checkpoint only; the checkpoint now carries the
    figures of the steps before (loss, lr, grad norm, eval), which the results give apart."""
    root, folder = pipeline
    settings = dict(steps=12, checkpoint={"dir": str(root / "history"), "every": 4}, eval={"every": 5, "batches": 1},
                    optimizer={"name": "sgd", "lr": 0.1, "clip_grad_norm": 0.5}, plot=str(tmp_path / "loss.png"))  # fmt: skip
    whole = train(config(root, folder, "history-whole", mode="single", **{**settings, "checkpoint": {}})).to_json()
    with pytest.raises(FtcError, match="the loss is nan at step 10"):
        train(config(root, folder, "history", mode="single", **settings, inject_fault={"kind": "nan", "step": 10}))
    resumed = train(config(root, folder, "history", mode="local", **{**settings, "checkpoint": {**settings["checkpoint"], "resume": True}}))
    data = resumed.to_json()
    assert data["first_step"] == 8 and len(data["loss"]) == 4 and [e["step"] for e in data["eval"]] == [10, 12]
    earlier = data["before_resume"]
    assert [e["step"] for e in earlier["eval"]] == [5] and earlier["lr"] == whole["lr"][:8]
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor(earlier[key]), torch.tensor(whole[key][:8]), rtol=1e-5, atol=0)
    for key in ("loss", "mean_loss_last_10", "eval_loss"):
        assert data["final"][key] == pytest.approx(whole["final"][key], rel=1e-5), key
    assert summary(resumed).startswith("final loss") and "mean of the last 10 steps" in summary(resumed)


def test_a_resumed_run_takes_the_configs_learning_rate(pipeline):
    root, folder = pipeline
    # One batch's samples, every step: with lr near zero the loss stays where it was.
    settings = dict(mode="local", data={"name": "synthetic", "size": 8}, micro_batches=1)
    first = train(config(root, folder, "lr", **settings, steps=3, optimizer={"name": "sgd", "lr": 1.0}))
    assert first.loss[-1] < first.loss[0] * 0.9
    resumed = train(config(root, folder, "lr", **settings, optimizer={"name": "sgd", "lr": 1e-12},
                           checkpoint={"dir": str(root / "lr"), "resume": True}))  # fmt: skip
    torch.testing.assert_close(torch.tensor(resumed.loss), torch.tensor([resumed.loss[0]] * 3), rtol=1e-5, atol=0)


def test_resuming_with_an_optimizer_of_another_kind_is_refused_by_name(pipeline):
    """Adam's state cannot become SGD's momentum (torch raised KeyError: 'step'), nor the reverse
    (it was dropped without a word); AdamW takes Adam's, and SGD without momentum leaves none."""
    root, folder = pipeline
    train(config(root, folder, "kinds", mode="local", steps=3, optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.9}))
    resume = {"dir": str(root / "kinds"), "resume": True}
    for name in ("adam", "adamw"):
        with pytest.raises(FtcError) as info:
            train(config(root, folder, "kinds", mode="local", optimizer={"name": name}, checkpoint=resume))
        assert "holds SGD optimizer state, but the config's optimizer.name is " + name in info.value.message
        assert "ftc merge-checkpoint" in info.value.hint
    train(config(root, folder, "adam", mode="local", steps=3))
    assert len(train(config(root, folder, "adam", optimizer={"name": "adamw"}, checkpoint={**resume, "dir": str(root / "adam")})).loss) == 3
    train(config(root, folder, "plain", mode="local", steps=3, optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.0}))
    resumed = train(config(root, folder, "plain", mode="local", checkpoint={**resume, "dir": str(root / "plain")}))
    assert len(resumed.loss) == 3


def test_a_new_run_keeps_the_earlier_runs_checkpoints_until_it_has_its_own(pipeline):
    root, folder = pipeline
    train(config(root, folder, "reuse", mode="local"))
    assert [p.name for p in checkpoint.complete_steps(root / "reuse")] == ["step-00000003", "step-00000006"]
    earlier = checkpoint.merge(root / "reuse")[1]

    with pytest.raises(FtcError, match="the loss is nan at step 2"):
        train(config(root, folder, "reuse", mode="local", inject_fault={"kind": "nan", "step": 2}))
    step, kept = checkpoint.merge(root / "reuse")
    assert step == 6 and all(torch.equal(kept[key], earlier[key]) for key in earlier)

    train(config(root, folder, "reuse", mode="local", steps=4))
    assert [p.name for p in checkpoint.complete_steps(root / "reuse")] == ["step-00000003", "step-00000004"]
    assert not [p for p in (root / "reuse").iterdir() if p.name.startswith(".")]
    assert checkpoint.run_of(root / "reuse" / "step-00000003") == checkpoint.run_of(root / "reuse" / "step-00000004")


def test_merge_checkpoint_takes_a_step_folder_and_an_output_folder(pipeline, tmp_path, capsys):
    from ftc.cli import main

    root, folder = pipeline
    train(config(root, folder, "merge", mode="local", steps=4, checkpoint={"dir": str(root / "merge"), "every": 2}))
    assert checkpoint.merge(root / "merge")[0] == 4
    step, earlier = checkpoint.merge(root / "merge" / "step-00000002")
    assert step == 2
    assert main(["merge-checkpoint", str(root / "merge" / "step-00000002"), "-o", str(tmp_path)]) == 0
    merged = load_file(tmp_path / "merged.safetensors")
    assert set(merged) == set(earlier) and all(torch.equal(merged[key], earlier[key]) for key in earlier)
    # By default beside a step folder, not in it (keep, or a new run, removes step folders).
    capsys.readouterr()
    assert main(["merge-checkpoint", str(root / "merge" / "step-00000002")]) == 0
    assert ": step 2, " in capsys.readouterr().out
    assert set(load_file(root / "merge" / "merged-step-00000002.safetensors")) == set(earlier)
    assert not (root / "merge" / "step-00000002" / "merged.safetensors").exists()
    # A folder that does not exist yet is made, not taken for a file's name.
    for new in ("new", "slashed/"):
        assert main(["merge-checkpoint", str(root / "merge"), "-o", str(tmp_path / new) + ("/" if new.endswith("/") else "")]) == 0
        assert set(load_file(tmp_path / new / "merged.safetensors")) == set(earlier)
    (tmp_path / "afile").write_text("")
    assert main(["merge-checkpoint", str(root / "merge"), "-o", str(tmp_path / "afile" / "x.pt")]) == 2


def test_a_damaged_latest_step_is_skipped_with_a_warning(pipeline, capsys):
    """A step folder that lost a file after it was written (only a hand removes one) is not
    complete: resume and merge take the step before, and the run says which folder it skipped."""
    root, folder = pipeline
    whole = train(config(root, folder, "damaged", mode="local")).loss
    (root / "damaged" / "step-00000006" / "rank-0.safetensors").unlink()
    assert checkpoint.merge(root / "damaged")[0] == 3
    capsys.readouterr()
    resumed = train(config(root, folder, "damaged", mode="local", checkpoint={"dir": str(root / "damaged"), "resume": True}))
    assert "skipped" in capsys.readouterr().err
    torch.testing.assert_close(torch.tensor(resumed.loss), torch.tensor(whole[3:]), rtol=1e-5, atol=0)


def test_keep_leaves_the_latest_checkpoints(pipeline):
    root, folder = pipeline
    train(config(root, folder, "keep", mode="local", checkpoint={"dir": str(root / "keep"), "every": 1, "keep": 2}))
    assert [p.name for p in checkpoint.complete_steps(root / "keep")] == ["step-00000005", "step-00000006"]


def test_resuming_a_finished_run_keeps_its_results(pipeline):
    """Run again with resume after the last step, a run trains nothing; its results JSON and loss
    curve stay as the finished run wrote them (they were overwritten with an empty loss list)."""
    root, folder = pipeline
    files = {"results": str(root / "done" / "results.json"), "plot": str(root / "done" / "loss.png")}
    finished = train(config(root, folder, "done", mode="local", **files))
    written = (root / "done" / "results.json").read_text()
    again = train(config(root, folder, "done", mode="local", checkpoint={"dir": str(root / "done"), "resume": True},
                         **files))  # fmt: skip
    assert again.loss == [] and again.first_step == 6
    assert (root / "done" / "results.json").read_text() == written
    assert json.loads(written)["loss"] == finished.loss
    assert summary(again) == "nothing to train: the run is at step 6, and the config asks for 6 steps"


def test_a_run_stopped_while_replacing_a_step_folder_keeps_the_complete_one(pipeline):
    """write_manifest replaces an earlier run's folder of the same step by renaming it to .old
    and the new one into place; a run stopped between the two renames left only those hidden
    folders, and the next start deleted both. The complete new folder is put in place (and
    the replaced one, when the new one is not complete), so resume finds that step."""
    import shutil

    root, folder = pipeline
    train(config(root, folder, "swap-old", mode="local", optimizer={"name": "adam", "lr": 0.05}))
    train(config(root, folder, "swap", mode="local"))
    final = root / "swap" / "step-00000006"
    new = checkpoint.merge(final)[1]
    # Stopped between the renames: the earlier run's step 6 is .old, the new one still staged.
    shutil.copytree(root / "swap-old" / "step-00000006", root / "swap" / ".step-00000006.old")
    final.rename(root / "swap" / ".step-00000006.partial")
    assert checkpoint.prepare(root / "swap", resume=True) == final
    assert all(torch.equal(value, new[key]) for key, value in checkpoint.merge(final)[1].items())
    assert not [p for p in (root / "swap").iterdir() if p.name.startswith(".")]

    # Stopped before the new manifest: the replaced folder comes back.
    old = checkpoint.merge(root / "swap-old" / "step-00000006")[1]
    final.rename(root / "swap" / ".step-00000006.partial")
    (root / "swap" / ".step-00000006.partial" / "manifest.json").unlink()
    shutil.copytree(root / "swap-old" / "step-00000006", root / "swap" / ".step-00000006.old")
    assert checkpoint.prepare(root / "swap", resume=True) == final
    assert all(torch.equal(value, old[key]) for key, value in checkpoint.merge(final)[1].items())


def test_the_loss_curve_of_losses_at_or_below_zero_is_not_log_scaled(tmp_path):
    """On a log scale they vanished from the curve (matplotlib: 'Data has no positive values')."""
    import warnings

    from ftc.runtime.results import Results, plot_loss

    results = Results({"pipeline": "p", "schedule": "1f1b"}, "local", 1, 0, loss=[-1.0, -2.0, -3.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_loss(tmp_path / "loss.png", results)
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_the_loss_curve_is_log_scaled_only_over_a_decade(tmp_path, monkeypatch):
    """Within a decade a log scale showed little but tick labels such as 2.4×10⁰."""
    import matplotlib.axes

    from ftc.runtime.results import Results, plot_loss

    scales, set_yscale = [], matplotlib.axes.Axes.set_yscale
    monkeypatch.setattr(matplotlib.axes.Axes, "set_yscale",
                        lambda axes, value, **kwargs: scales.append(value) or set_yscale(axes, value, **kwargs))  # fmt: skip
    for losses in ([2.6, 2.4, 2.2], [5.5, 1.0, 0.4]):
        plot_loss(tmp_path / "loss.png", Results({"pipeline": "p", "schedule": "1f1b"}, "local", 1, 0, loss=losses))
    assert scales == ["linear", "log"]


def test_the_loss_curve_takes_the_format_its_path_names(tmp_path):
    """A plot path of loss.pdf or loss.svg held PNG bytes under that name."""
    from ftc.runtime.results import Results, plot_loss

    results = Results({"pipeline": "p", "schedule": "1f1b"}, "local", 1, 0, loss=[3.0, 2.0])
    for name, start in [("loss.pdf", b"%PDF"), ("loss.svg", b"<?xml"), ("loss.curve", b"\x89PNG")]:
        plot_loss(tmp_path / name, results)
        assert (tmp_path / name).read_bytes().startswith(start), name


def test_resuming_a_larger_models_checkpoint_is_refused_by_name(pipeline, tmp_path):
    """Each rank loads its own keys by name, so a checkpoint of another model holding this one's
    names and more resumed without a word, its other weights dropped (init, by contrast, is
    strict both ways)."""
    root, folder = pipeline
    larger = MODEL.replace("self.head = nn.Linear(16, 4)", "self.head = nn.Linear(16, 4)\n        self.extra = nn.Linear(16, 16)")
    (tmp_path / "larger.py").write_text(larger.replace("self.head(self.body(x))", "self.head(self.extra(self.body(x)))"))
    larger = compile_model(tmp_path / "larger.py", tmp_path / "generated", CompileOptions(stages=2)).folder
    train(config(root, larger, "larger", mode="local", steps=3))
    for mode in ("local", "single"):
        with pytest.raises(FtcError, match=re.escape("holds 2 weights the model does not have (extra.bias, extra.w")):
            train(config(root, folder, "larger", mode=mode, checkpoint={"dir": str(root / "larger"), "resume": True}))


def test_resuming_the_checkpoint_of_a_wider_model_with_the_same_keys_is_refused_by_key_and_shape(pipeline, tmp_path):
    """A checkpoint of the same layers built wider passed the key checks and failed in torch's
    load_state_dict, reported as an internal error listing every size mismatch."""
    root, folder = pipeline
    (tmp_path / "wider.py").write_text(MODEL.replace("16", "24"))
    wider = compile_model(tmp_path / "wider.py", tmp_path / "generated", CompileOptions(stages=2)).folder
    train(config(root, wider, "wider", mode="local", steps=3))
    for mode in ("local", "single"):
        with pytest.raises(FtcError) as refused:
            train(config(root, folder, "wider", mode=mode, checkpoint={"dir": str(root / "wider"), "resume": True}))
        shapes = r"[\w.]+ has shape \[[\d, ]*24[\d, ]*\] but the model's is \[[\d, ]*16[\d, ]*\]"
        assert re.fullmatch(f"checkpoint {re.escape(str(root / 'wider' / 'step-00000003'))}: {shapes}", refused.value.message)
        assert "resume with the model that wrote it" in refused.value.hint


def test_shards_missing_after_every_rank_wrote_one_point_to_a_folder_not_shared(tmp_path):
    """Two machines with checkpoint.dir on their own disks: rank 0 found rank 1's shard missing
    and said only "wrote no shard"."""
    from ftc.ir import FtcError
    from ftc.runtime import checkpoint

    folder = checkpoint.staging_folder(tmp_path, 5)
    folder.mkdir()
    (folder / "rank-0.pt").write_bytes(b"")
    with pytest.raises(FtcError) as error:
        checkpoint.write_manifest(tmp_path, 5, 2, "run", {})
    assert "ranks [1] wrote no shard into" in error.value.message
    assert f"checkpoint.dir ({tmp_path.resolve()}) must be one folder every machine shares" in error.value.hint


@pytest.mark.parametrize("stopped", ["while rank 1 writes its shard", "before rank 0 seals the step",
                                     "after rank 0 sealed the step"])  # fmt: skip
def test_a_run_stopped_while_writing_a_checkpoint_leaves_one_whole_step_to_merge_and_resume(tmp_path, monkeypatch,
                                                                                             stopped):  # fmt: skip
    """Ctrl-C stops each rank wherever it is (in dist, at once, without cleaning up). The previous
    step stays the latest complete one, merge-checkpoint reads its shards alone, never with the
    new step's, and the step a stopped run names to resume from is whole: the new one only
    where rank 0 had sealed it (its manifest written) before the stop."""
    root = tmp_path / "checkpoints"
    ranks = [torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2)}), torch.nn.ModuleDict({"b": torch.nn.Linear(2, 2)})]

    def weights(step):
        for module in ranks:
            for param in module.parameters():
                param.data.fill_(step)
        return {key: value.clone() for module in ranks for key, value in module.state_dict().items()}

    def shard(step, rank):
        checkpoint.save_shard(root, step, rank, [ranks[rank]], {"step": step})

    old = weights(1)
    shard(1, 0), shard(1, 1)
    checkpoint.write_manifest(root, 1, 2, "run", {})
    new = weights(2)
    shard(2, 0)
    if stopped == "while rank 1 writes its shard":  # its temporary file, which a killed rank leaves
        (checkpoint.staging_folder(root, 2) / ".rank-1.safetensors.x1y2z3").write_bytes(b"half a shard")
    else:
        shard(2, 1)
    if stopped == "after rank 0 sealed the step":
        real_replace = checkpoint.os.replace

        def stopped_before_the_move(source, target):
            if checkpoint.STAGING.fullmatch(Path(source).name):
                raise KeyboardInterrupt
            real_replace(source, target)

        monkeypatch.setattr(checkpoint.os, "replace", stopped_before_the_move)
        with pytest.raises(KeyboardInterrupt):
            checkpoint.write_manifest(root, 2, 2, "run", {})
        monkeypatch.setattr(checkpoint.os, "replace", real_replace)

    step, merged = checkpoint.merge(root)
    assert step == 1 and all(torch.equal(merged[key], value) for key, value in old.items())
    expected = 2 if stopped == "after rank 0 sealed the step" else 1
    named = checkpoint.step_folder(root, expected)
    assert checkpoint.left_to_resume(str(root)) == (f"the latest complete checkpoint is {named}: "
                                                    "resume with --set checkpoint.resume=true")  # fmt: skip
    step, merged = checkpoint.merge(root)
    assert step == expected
    assert all(torch.equal(merged[key], value) for key, value in (new if expected == 2 else old).items())
    # Nothing half-written is left beside the complete steps.
    assert sorted(p.name for p in root.iterdir()) == [f"step-{s:08d}" for s in range(1, expected + 1)]


def test_a_run_stopped_while_removing_an_older_step_leaves_no_step_folder_lacking_files(tmp_path, monkeypatch):
    """`keep` (and a new run's removal of an earlier run's steps) deletes step folders after the
    new step is in place; stopped halfway through a folder's files, it left a step folder that
    lacked some, which resume and merge-checkpoint then warned about as damaged by hand."""
    root = tmp_path / "checkpoints"
    module = torch.nn.Linear(2, 2)
    for step in (1, 2):
        checkpoint.save_shard(root, step, 0, [module], {"step": step})
        if step == 1:
            checkpoint.write_manifest(root, step, 1, "run", {})
    real_rmtree = checkpoint.shutil.rmtree

    def stopped_halfway(folder, *args, **kwargs):
        next(Path(folder).iterdir()).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", stopped_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_manifest(root, 2, 1, "run", {}, keep=1)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    assert checkpoint.damaged_steps(root) == {} and checkpoint.complete_steps(root) == [checkpoint.step_folder(root, 2)]
    named = checkpoint.step_folder(root, 2)
    assert checkpoint.left_to_resume(str(root)).startswith(f"the latest complete checkpoint is {named}:")
    assert [p.name for p in root.iterdir()] == ["step-00000002"]


def test_resuming_with_other_sampling_settings_warns_by_key(pipeline, capsys):
    """The seed, batch size, step_every, data and eval's held-out share decide which samples each
    step draws: a resumed run that changes one still trains, but says so, naming the key."""
    root, folder = pipeline
    with pytest.raises(FtcError, match="the loss is nan at step 4"):
        train(config(root, folder, "sampling", mode="local", inject_fault={"kind": "nan", "step": 4}))
    resume = {"dir": str(root / "sampling"), "resume": True}
    capsys.readouterr()
    train(config(root, folder, "sampling", mode="local", checkpoint=resume, steps=4))
    assert "warning" not in capsys.readouterr().err
    train(config(root, folder, "sampling", mode="local", checkpoint=resume, steps=5, seed=3, batch_size=4))
    err = capsys.readouterr().err
    assert "seed is 3, but the checkpoint's run used 0" in err and "batch_size is 4, but the checkpoint's run used 8" in err
    assert "step_every" not in err and "data is" not in err


def test_nprocs_outside_mode_dist_is_said_to_do_nothing(pipeline, capsys):
    root, folder = pipeline
    train(config(root, folder, "nprocs", mode="local", steps=1, nprocs=2, checkpoint={}))
    assert "nprocs (2) applies to mode dist; mode local runs in this one process" in capsys.readouterr().err
