"""Mistakes in the user's code, data and files while training: a clear error (or warning) that
names the file, function or line, never an "internal error" from deep inside.
"""

from __future__ import annotations

import contextlib
import json
import re

import pytest
import torch

from ftc.compiler import CompileOptions, compile_model
from ftc.ir import FtcError
from ftc.runtime.config import load_config
from ftc.runtime.train import train

from .conftest import EXAMPLES, MODELS

MODEL = (MODELS / "classifier.py").read_text() + """

def wrong_loss(output, target):
    return F.cross_entropy(output, target.float().unsqueeze(1))


def accuracy(output, target):
    return (output.argmax(1) == target).float().mean()


def per_sample(output, target):
    return F.cross_entropy(output, target, reduction="none")


class Broken:
    def __len__(self):
        return 16

    def __getitem__(self, i):
        if i % 2:
            raise IndexError(f"sample {i} is missing")
        return (torch.randn(8),), torch.tensor(0)


def broken(**options):
    return Broken()


class Labelled:
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"x": torch.randn(8), "labels": torch.tensor(0)}


def labelled(**options):
    return Labelled()


def extra_input(**options):
    # forward(x) takes no mask: a forward(x, mask=None) would use it in mode single only.
    return [({"x": torch.randn(8), "mask": torch.ones(8)}, torch.tensor(0))] * 16


def two_inputs(**options):
    return [((torch.randn(8), torch.ones(8)), torch.tensor(0))] * 16


def nested_input(**options):
    return [(((torch.randn(8),),), torch.tensor(0))] * 16
"""


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    (root / "model.py").write_text(MODEL)
    return root, compile_model(root / "model.py", root / "generated", CompileOptions(stages=2)).folder


def run(folder, **settings):
    data = {"pipeline": str(folder), "mode": "local", "steps": 2, "log_every": 10}
    data.update(settings)
    return train(load_config(data=data))


@pytest.mark.parametrize("mode", ["single", "local"])
def test_a_failing_loss_is_named_with_its_line(pipeline, mode):
    root, folder = pipeline
    with pytest.raises(FtcError) as error:
        run(folder, mode=mode, loss="wrong_loss")
    assert "the loss wrong_loss(output, target) raised" in error.value.message
    assert f"{root / 'model.py'}:" in error.value.message and "target.float()" in error.value.message


@pytest.mark.parametrize("mode", ["single", "local"])
def test_a_loss_without_a_gradient_is_named(pipeline, mode):
    """An accuracy given as the loss: backward failed inside autograd with a raw RuntimeError."""
    _, folder = pipeline
    with pytest.raises(FtcError, match=r"loss_fn returned a tensor \(float32\) that has no gradient") as error:
        run(folder, mode=mode, loss="accuracy")
    assert ".detach()" in error.value.hint


@pytest.mark.parametrize("mode", ["single", "local"])
def test_a_loss_that_is_not_one_number_is_named(pipeline, mode):
    _, folder = pipeline
    with pytest.raises(FtcError, match=r"loss_fn per_sample returned Tensor\[4\], not a one-element tensor"):
        run(folder, mode=mode, loss="per_sample", batch_size=8, micro_batches=2)


SMALL_VOCABULARY = """
import torch
import torch.nn as nn
import torch.nn.functional as F


def build_model():
    return nn.Sequential(nn.Embedding(40, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 40))


def example_inputs(batch_size):
    return (torch.randint(0, 40, (batch_size, 16)),)


def loss_fn(output, target):
    return F.cross_entropy(output.reshape(-1, 40), target.reshape(-1))
"""


@pytest.mark.parametrize("mode", ["single", "local"])
def test_token_ids_past_the_vocabulary_are_named_as_the_datas(tmp_path, mode):
    """The bytes data set gives ids 0-255; a model with 40 rows got an IndexError whose hint said
    to check shapes and dtypes."""
    (tmp_path / "small.py").write_text(SMALL_VOCABULARY)
    folder = compile_model(tmp_path / "small.py", tmp_path / "generated", CompileOptions(stages=2)).folder
    with pytest.raises(FtcError, match=r"raised IndexError: index out of range in self") as error:
        run(folder, mode=mode, data={"name": "bytes", "max_bytes": 2000})
    assert "the bytes data set gives ids 0-255, so a model trained on it needs an embedding of 256 rows" in error.value.hint


def test_a_failing_data_set_is_named(pipeline):
    root, folder = pipeline
    with pytest.raises(FtcError, match=r"the data set \(Broken\)\[\d+\] raised IndexError: sample \d+ is missing"):
        run(folder, data={"name": "module", "module": f"{root / 'model.py'}:broken"})


def test_a_sample_that_is_not_a_pair_is_named(pipeline):
    root, folder = pipeline
    with pytest.raises(FtcError, match=r"\(Labelled\)\[\d+\] is a dict, not a pair \(inputs, target\)"):
        run(folder, data={"name": "module", "module": f"{root / 'model.py'}:labelled"})


@pytest.mark.parametrize("mode", ["single", "local"])
def test_inputs_unlike_the_compiled_ones_are_named_before_any_stage_runs(pipeline, mode):
    _, folder = pipeline
    expected = r"input 'x' from data set 'module' is float32\[8, 9\], but .* was compiled for float32\[B, 8\]"
    with pytest.raises(FtcError, match=expected):
        run(folder, mode=mode, data={"name": "module", "module": f"{_wide_model(folder)}:wide"}, model=str(_wide_model(folder)))


def test_a_stage_that_raises_is_named_by_its_file(pipeline, tmp_path):
    import shutil

    _, folder = pipeline
    edited = tmp_path / folder.name
    shutil.copytree(folder, edited)
    stage = edited / "stage0.py"
    stage.write_text(stage.read_text().replace("    def forward(self, x):\n", "    def forward(self, x):\n        raise ValueError('edited')\n"))
    with pytest.raises(FtcError, match=r"stage 0 \(stage0.py\), micro-batch 0, raised ValueError: edited"):
        run(edited, model=str(folder.parent.parent / "model.py"))


def test_a_stage_forward_that_takes_other_inputs_than_pipeline_json_is_named_as_it_loads(pipeline, tmp_path):
    """A forward given a parameter by hand failed at the first micro-batch with torch's TypeError
    and a hint to check the data."""
    import shutil

    _, folder = pipeline
    edited = tmp_path / folder.name
    shutil.copytree(folder, edited)
    stage = edited / "stage0.py"
    stage.write_text(stage.read_text().replace("    def forward(self, x):\n", "    def forward(self, x, scale):\n"))
    with pytest.raises(FtcError) as error:
        run(edited, model=str(folder.parent.parent / "model.py"))
    assert error.value.message == (f"{stage}: Stage0.forward takes (x, scale), but pipeline.json gives stage 0 the "
                                   "inputs ['x'], in that order")  # fmt: skip
    assert "give forward one parameter per input" in error.value.hint


def test_every_line_of_a_multi_line_error_from_user_code_is_kept(pipeline, tmp_path):
    import shutil

    _, folder = pipeline
    edited = tmp_path / folder.name
    shutil.copytree(folder, edited)
    stage = edited / "stage1.py"
    raising = "        raise ValueError('bad value\\n' + '\\n'.join(f'detail {k}' for k in range(12)))\n"
    text = stage.read_text()
    head = text.index("\n", text.index("    def forward(self")) + 1
    stage.write_text(text[:head] + raising + text[head:])
    with pytest.raises(FtcError) as error:
        run(edited, model=str(folder.parent.parent / "model.py"))
    lines = error.value.message.splitlines()
    assert lines[0].startswith("stage 1 (stage1.py), micro-batch 0, raised ValueError: bad value (at ")
    assert lines[1:] == [f"    detail {k}" for k in range(7)] + ["    ... (5 more lines)"]


def _wide_model(folder):
    """The model file with a data set whose inputs have 9 features, not 8."""
    path = folder.parent.parent / "wide.py"
    text = (folder.parent.parent / "model.py").read_text()
    path.write_text(text + "\n\ndef wide(**options):\n    return [((torch.randn(9),), torch.tensor(0))] * 16\n")
    return path


def test_a_changed_model_file_is_warned_about(pipeline, capsys):
    _, folder = pipeline
    run(folder, model=str(_wide_model(folder)), steps=1)
    assert "is not the model file" in capsys.readouterr().err


@pytest.mark.parametrize("edit", [("self.body", "self.trunk"), ("nn.Linear(16, 16)", "nn.Linear(16, 16), nn.Linear(16, 16)")])
def test_a_model_file_changed_so_that_the_stages_no_longer_fit_asks_for_a_recompile(pipeline, edit):
    """A renamed submodule, or a layer added: the stages' adoption fails as if they or
    pipeline.json's "state" were edited by hand, which their fix lines said to undo; the edit
    was the model file's."""
    root, folder = pipeline
    path = root / f"changed_{len(edit[1])}.py"
    path.write_text((root / "model.py").read_text().replace(*edit))
    with pytest.raises(FtcError) as error:
        run(folder, model=str(path), steps=1)
    assert error.value.message.startswith(f"{path} is not the model file {folder} was compiled from (it changed since"), error.value.message
    assert f"`ftc compile {path} --stages 2 -o {folder.parent} --name model`" in error.value.hint
    if "nn.Linear(16, 16), " in edit[1]:  # a renamed module is caught before: "it is another model"
        from ftc.check import check_pipeline

        with pytest.raises(FtcError, match=re.escape(f"{path} is not the model file {folder} was compiled from")):
            check_pipeline(folder, model_path=path)


def test_check_names_a_model_file_whose_forward_changed_since_compiling(pipeline):
    """A forward edited since compiling (same layers, another computation) failed check with
    "ir.json itself does not compute the model's outputs", as if ir.json were broken; pipeline.json
    holds the model file's sha256, so check says that the model file changed and how to recompile."""
    from ftc.check import check_pipeline

    root, folder = pipeline
    path = root / "changed_forward.py"
    path.write_text((root / "model.py").read_text().replace("return self.head(self.body(x))", "return self.head(self.body(2 * x))"))
    report = check_pipeline(folder, model_path=path, batch_size=4)
    assert not report.ok
    (problem,) = report.problems
    assert problem.startswith(f"{path} is not the model file {folder} was compiled from (it changed since"), problem
    assert f"`ftc compile {path} --stages 2 -o {folder.parent} --name model`" in problem


def test_a_model_that_fails_in_eval_mode_is_named_when_mode_single_evaluates(pipeline):
    """Mode single ran the model's forward bare while evaluating: its error came out as an
    internal error, not named."""
    root, folder = pipeline
    path = root / "eval_fails.py"
    path.write_text((root / "model.py").read_text() + """

class EvalFails(Classifier):
    def forward(self, x):
        if not self.training:
            raise ValueError("no eval mode here")
        return super().forward(x)


def build_model():
    return EvalFails()
""")
    with pytest.raises(FtcError, match=re.escape("the model (EvalFails), micro-batch 0 of a held-out batch, in eval "
                                                 "mode, raised ValueError: no eval mode here (at ")):  # fmt: skip
        run(folder, mode="single", model=str(path), eval={"every": 1})


def test_the_summary_of_a_one_step_run_says_step():
    from ftc.runtime.results import Results, summary

    line = summary(Results({}, "local", 1, 0, loss=[1.5])).splitlines()[0]
    assert line == "final loss 1.5000 (mean of the last 1 step 1.5000) after 1 step"


def test_a_warmup_longer_than_the_run_is_warned_about(pipeline, capsys):
    _, folder = pipeline
    run(folder, steps=2, lr_schedule={"warmup_steps": 5})
    assert "lr_schedule.warmup_steps (5) is not below steps (2)" in capsys.readouterr().err
    run(folder, steps=2, lr_schedule={"warmup_steps": 1})
    assert "warmup_steps" not in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_says_so(pipeline):
    _, folder = pipeline
    with pytest.raises(FtcError, match="key 'device' is \"cuda\", but torch here sees no CUDA device"):
        run(folder, device="cuda")


def test_ranks_that_share_a_gpu_get_gloo_and_nccl_asked_for_is_refused(pipeline, monkeypatch):
    """README: ranks beyond the GPU count share GPUs round-robin, which only gloo allows; with
    backend auto, 4 ranks on 1 GPU asked NCCL for a group that it refuses (a duplicate GPU)."""
    from ftc.runtime.worker import backend

    _, folder = pipeline
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    config = load_config(data={"pipeline": str(folder), "mode": "dist", "device": "cuda"})
    assert backend(config, 2) == "nccl" and backend(config, 4) == "gloo"
    assert backend(load_config(data={"pipeline": str(folder), "mode": "dist"}), 4) == "gloo"
    nccl = load_config(data={"pipeline": str(folder), "mode": "dist", "device": "cuda", "backend": "nccl"})
    assert backend(nccl, 2) == "nccl"
    with pytest.raises(FtcError, match="key 'backend' is \"nccl\", but 4 ranks share this machine's 2 GPU"):
        backend(nccl, 4)


@pytest.mark.parametrize("mode", ["single", "local"])
def test_an_init_checkpoint_with_keys_the_model_lacks_is_refused(pipeline, tmp_path, mode):
    """As load_state_dict(strict=True): a checkpoint of a larger model would load in part."""
    root, folder = pipeline
    from ftc.runtime import load_model_file

    state = load_model_file(root / "model.py").build().state_dict()
    state["bogus.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "init.pt")
    with pytest.raises(FtcError, match=r"holds 1 key\(s\) the model does not have: bogus.weight"):
        run(folder, mode=mode, init=str(tmp_path / "init.pt"))
    del state["bogus.weight"]
    torch.save(state, tmp_path / "init.pt")
    assert len(run(folder, mode=mode, init=str(tmp_path / "init.pt")).loss) == 2


def test_torchrun_flags_that_start_another_number_of_processes_are_refused_before_launch(pipeline):
    from ftc.runtime.worker import launch

    _, folder = pipeline
    flags = ["--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:29577", "--nproc-per-node", "3"]
    config = load_config(data={"pipeline": str(folder), "mode": "dist", "steps": 1, "torchrun": flags})
    with pytest.raises(FtcError, match=r"config key 'torchrun' starts 1 x 3 processes, but .* on 2 devices"):
        launch(config)


@pytest.mark.parametrize("mode", ["single", "local"])
def test_an_init_checkpoint_with_a_non_persistent_buffer_is_refused_in_every_mode(mode, tmp_path):
    """The GPT example's causal mask is a non-persistent buffer: the model's own
    load_state_dict(strict=True) refuses it, and so does every mode (local did not)."""
    from .conftest import EXAMPLES, ROOT
    from ftc.runtime import load_model_file

    model = load_model_file(EXAMPLES / "gpt.py").build()
    state = {**model.state_dict(), "blocks.0.attn.mask": model.blocks[0].attn.mask}
    torch.save(state, tmp_path / "init.pt")
    data = {"pipeline": str(ROOT / "generated" / "gpt"), "mode": mode, "steps": 1, "init": str(tmp_path / "init.pt"),
            "data": {"name": "bytes", "max_bytes": 5000}}  # fmt: skip
    with pytest.raises(FtcError, match="holds 1 key\\(s\\) the model does not have: blocks.0.attn.mask"):
        train(load_config(data=data))


def test_sparse_gradients_are_checked_and_an_optimizer_that_refuses_them_is_named(tmp_path):
    """nn.Embedding(sparse=True): `ftc check` compares its sparse gradient, SGD trains it, and
    AdamW or weight decay, which torch refuses for sparse gradients, are refused up front."""
    from ftc.check import check_pipeline

    folder = compile_model(MODELS / "sparse_embedding.py", tmp_path, CompileOptions(stages=2)).folder
    assert check_pipeline(folder).ok
    sgd = {"name": "sgd", "lr": 0.1, "weight_decay": 0.0}
    results = run(folder, optimizer=sgd, batch_size=8, micro_batches=2, data={"name": "synthetic", "size": 16})
    assert len(results.loss) == 2
    with pytest.raises(FtcError) as info:
        run(folder, optimizer={"name": "adamw", "lr": 0.1}, batch_size=8, data={"name": "synthetic", "size": 16})
    assert "optimizer.name adamw cannot update the sparse gradients of embedding.weight" in info.value.message
    with pytest.raises(FtcError) as info:
        run(folder, optimizer={**sgd, "weight_decay": 0.01}, batch_size=8, data={"name": "synthetic", "size": 16})
    assert "optimizer.weight_decay 0.01 cannot apply to the sparse gradients" in info.value.message


@pytest.mark.parametrize("mode", ["single", "local"])
def test_a_packed_input_is_named_at_compile_and_refused_by_train(tmp_path, mode):
    """EmbeddingBag's flat indices have 3 rows per sample: the stages run (ftc check), but no data
    set can stack them nor the engine slice them into micro-batches, so training refuses them
    by name before any data is drawn, instead of a batch-size error deep in the data set."""
    from ftc.check import check_pipeline

    compiled = compile_model(MODELS / "packed_bag.py", tmp_path, CompileOptions(stages=2))
    assert any("input 'ids' has several rows per sample" in note for note in compiled.notes)
    assert check_pipeline(compiled.folder).ok
    with pytest.raises(FtcError) as info:
        run(compiled.folder, mode=mode, batch_size=8, data={"name": "synthetic", "size": 16})
    assert "input 'ids' has 3 rows per sample along its batch dimension" in info.value.message
    assert "EmbeddingBag takes 2-D input" in info.value.hint


def test_folders_the_run_cannot_write_are_named_before_training(pipeline, tmp_path):
    """A results, plot or checkpoint path under a file: refused up front, naming the key, not
    after the steps have trained (the results were lost) or at the first checkpoint."""
    _, folder = pipeline
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for key, value in (("results", blocker / "results.json"), ("plot", blocker / "loss.png"),
                       ("checkpoint", {"dir": str(blocker / "checkpoints")})):  # fmt: skip
        with pytest.raises(FtcError) as info:
            run(folder, **{key: value if isinstance(value, dict) else str(value)})
        name = "checkpoint.dir" if key == "checkpoint" else key
        assert f"key {name!r}: cannot write into {blocker}" in info.value.message
    with pytest.raises(FtcError, match="key 'seed' is -1; torch takes seeds from 0 to 2\\*\\*32 - 1"):
        run(folder, seed=-1)


def test_a_damaged_training_state_is_named(pipeline, tmp_path):
    from ftc.runtime import checkpoint

    _, folder = pipeline
    run(folder, checkpoint={"dir": str(tmp_path / "ck")})
    (step,) = checkpoint.complete_steps(tmp_path / "ck")
    state = step / "rank-0.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(FtcError) as info:
        run(folder, checkpoint={"dir": str(tmp_path / "ck"), "resume": True})
    assert f"checkpoint {step}: cannot read rank-0.pt, rank 0's training state" in info.value.message


def test_a_truncated_weight_shard_is_named_with_the_folder_to_delete(pipeline, tmp_path):
    """A resume takes the latest complete step, so the advice to "use an earlier step folder"
    named nothing a resume could do: deleting the damaged one is what makes it take the one
    before."""
    from ftc.runtime import checkpoint

    _, folder = pipeline
    run(folder, checkpoint={"dir": str(tmp_path / "ck")})
    (step,) = checkpoint.complete_steps(tmp_path / "ck")
    shard = step / "rank-0.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(FtcError) as info:
        run(folder, checkpoint={"dir": str(tmp_path / "ck"), "resume": True})
    assert f"checkpoint {step}: cannot read rank-0.safetensors" in info.value.message
    assert f"delete {step} to resume from the step before" in info.value.hint


def test_a_hand_tied_pair_of_tensors_the_model_keeps_apart_is_refused(tmp_path):
    """"tied" says two names are one tensor, whose gradients the engine sums across devices: two
    biases of the same shape on different stages trained apart from single mode in dist. Both
    `ftc check` and `ftc train` now refuse the edit, naming the pair."""
    import json
    import shutil

    from ftc.check import check_pipeline

    original = compile_model(EXAMPLES / "mlp.py", tmp_path / "gen", CompileOptions(stages=2)).folder
    folder = tmp_path / "edited" / "mlp"
    shutil.copytree(original, folder)
    manifest = json.loads((folder / "pipeline.json").read_text())
    manifest["tied"] = [["hidden.2.bias", "hidden.3.bias"]]
    (folder / "pipeline.json").write_text(json.dumps(manifest))
    message = "\"tied\" lists 'hidden.3.bias' with 'hidden.2.bias', but the model holds them as two tensors ([128] and [128])"
    with pytest.raises(FtcError, match=re.escape(message)):
        check_pipeline(folder, model_path=EXAMPLES / "mlp.py")
    for mode in ("local", "single"):
        with pytest.raises(FtcError, match=re.escape(message)) if mode == "local" else contextlib.nullcontext():
            run(folder, mode=mode, model=str(EXAMPLES / "mlp.py"), batch_size=8, data={"name": "digits"})


def test_a_moved_pipeline_folder_asks_for_its_model_file(pipeline, tmp_path):
    """pipeline.json names the model file relative to the folder: a copy elsewhere loses it, and
    the error says how to give it; given, the copy checks and trains."""
    import shutil

    from ftc.check import check_pipeline

    root, folder = pipeline
    moved = tmp_path / "deeper" / "still" / folder.name
    shutil.copytree(folder, moved)
    with pytest.raises(FtcError) as info:
        check_pipeline(moved)
    assert "which does not exist (pipeline.json names it relative to the folder" in info.value.message
    assert "`ftc check --model FILE`" in info.value.hint and "--set model=FILE" in info.value.hint
    assert check_pipeline(moved, model_path=root / "model.py").ok
    assert len(run(moved, model=str(root / "model.py")).loss) == 2


def test_resuming_from_nothing_and_a_data_set_smaller_than_a_batch_are_warned_about(pipeline, tmp_path, capsys):
    _, folder = pipeline
    run(folder, checkpoint={"dir": str(tmp_path / "empty"), "resume": True}, batch_size=8,
        data={"name": "synthetic", "size": 5})  # fmt: skip
    err = capsys.readouterr().err
    assert f"checkpoint.resume is true, but {tmp_path / 'empty'} holds no complete checkpoint" in err
    assert "data set 'synthetic' has 5 samples to train on, fewer than batch_size (8): every batch repeats samples" in err
    # eval holds out the last tenth: 9 samples leave 8 to train on, a batch's worth; 8 leave 7
    run(folder, batch_size=8, data={"name": "synthetic", "size": 9}, eval={"every": 1})
    assert "to train on" not in capsys.readouterr().err
    run(folder, batch_size=8, data={"name": "synthetic", "size": 8}, eval={"every": 1})
    err = capsys.readouterr().err
    assert "has 7 samples (1 more held out for eval) to train on, fewer than batch_size (8)" in err
    assert "fix: a larger data set (data.size), a lower eval.fraction or a smaller batch_size" in err


@pytest.mark.parametrize("mode", ["single", "local"])
def test_extreme_eval_fractions_warn_with_the_key_and_the_sizes(pipeline, capsys, mode):
    """eval.fraction 0.001 holds out one sample, which every held-out batch of 8 then repeats;
    0.999 leaves one to train on, which every batch repeats: both train, as a handful of samples
    may be meant, but say so with the key, the sizes and the fix (they were silent)."""
    _, folder = pipeline
    data = {"name": "synthetic", "size": 1000}
    results = run(folder, mode=mode, batch_size=8, data=data, eval={"every": 1, "fraction": 0.001})
    err = capsys.readouterr().err
    assert ("config <dict>: eval.fraction (0.001) holds out 1 of the 1000 samples of data set 'synthetic', fewer than "
            "batch_size (8): every held-out batch repeats samples") in err
    assert "fix: an eval.fraction of at least 0.008, a larger data set (data.size) or a smaller batch_size" in err
    assert "to train on" not in err and len(results.eval_loss) == 2
    run(folder, mode=mode, batch_size=8, data=data, eval={"every": 1, "fraction": 0.999})
    err = capsys.readouterr().err
    assert "data set 'synthetic' has 1 samples (999 more held out for eval) to train on, fewer than batch_size (8)" in err
    assert "holds out" not in err
    # exactly a batch of each: nothing to say
    run(folder, mode=mode, batch_size=8, data={"name": "synthetic", "size": 16}, eval={"every": 1, "fraction": 0.5})
    assert "warning" not in capsys.readouterr().err


def test_a_one_step_run_says_its_throughput_is_not_measured(pipeline, capsys):
    """Throughput counts from the end of the first step (which pays for warm-up): a run of one
    step printed "0.0 samples/s", as if it had trained nothing."""
    from ftc.runtime.results import summary

    _, folder = pipeline
    one = run(folder, steps=1)
    assert one.samples_per_s == 0.0
    assert "samples/s not measured (it counts from the end of the first step" in summary(one)
    two = run(folder, steps=2)
    assert two.samples_per_s > 0 and f"{two.samples_per_s:.1f} samples/s, wall time" in summary(two)


def test_a_hand_edited_stage_output_of_another_shape_fails_the_check_by_name(tmp_path):
    """`return (hidden_2[:, :64],)` in stage 0: ftc check names the value and both shapes (its
    backward raised torch's shape mismatch as an internal error)."""
    import shutil

    from ftc.check import check_pipeline

    original = compile_model(EXAMPLES / "mlp.py", tmp_path / "gen", CompileOptions(stages=2)).folder
    folder = tmp_path / "edited" / "mlp"
    shutil.copytree(original, folder)
    stage = folder / "stage0.py"
    text = stage.read_text()
    assert "return (hidden_2,)" in text
    stage.write_text(text.replace("return (hidden_2,)", "return (hidden_2[:, :64],)"))
    report = check_pipeline(folder, model_path=EXAMPLES / "mlp.py")
    assert not report.ok
    problems = report.stages[0].problems + report.problems
    assert any("value hidden_2 is float32[8, 64], but pipeline.json says float32[8, 128]" in p for p in problems), problems


def edited_copy(tmp_path, model_path, stages, edit, **options):
    """A fresh compile of `model_path` into a copy whose pipeline.json `edit` changes."""
    import json
    import shutil

    original = compile_model(model_path, tmp_path / "gen", CompileOptions(stages=stages, **options)).folder
    folder = tmp_path / "edited" / original.name
    shutil.copytree(original, folder)
    manifest = json.loads((folder / "pipeline.json").read_text())
    edit(manifest)
    (folder / "pipeline.json").write_text(json.dumps(manifest))
    return folder


def test_a_hand_edited_requires_grad_is_refused_not_trained_frozen(tmp_path):
    """requires_grad false on a value stage 0 sends: the runtime sends no gradient back, so
    stage 0 trained frozen, in local and dist alike, and `ftc check` passed."""
    from ftc.check import check_pipeline

    folder = edited_copy(tmp_path, EXAMPLES / "mlp.py", 2, lambda m: m["values"]["hidden_2"].update(requires_grad=False))
    message = "value hidden_2 needs gradient, but pipeline.json says requires_grad false"
    report = check_pipeline(folder, model_path=EXAMPLES / "mlp.py")
    assert not report.ok and report.stages[0].problems == [message]  # and no list of missing gradients after it
    with pytest.raises(FtcError, match=f"stage0.py: {message}"):
        run(folder, model=str(EXAMPLES / "mlp.py"), batch_size=8, data={"name": "digits"})


def test_a_hand_edited_state_list_is_refused(tmp_path):
    """A stage's "state" says what the runtime initializes, loads, saves and sums across
    devices: dropping the tied wte.weight from GPT's last stage made dist train apart from local,
    and a key a stage does not hold made dist hang in an all-reduce only one rank joined."""
    from ftc.check import check_pipeline

    def drop(manifest):
        manifest["stages"][1]["state"].remove("hidden.3.weight")

    folder = edited_copy(tmp_path, EXAMPLES / "mlp.py", 2, drop)
    message = "stage 1's \"state\" is not what the stage holds (stage1.py holds hidden.3.weight, which it does not list)"
    with pytest.raises(FtcError, match=re.escape(message)):
        check_pipeline(folder, model_path=EXAMPLES / "mlp.py")
    with pytest.raises(FtcError, match=re.escape(message)):
        run(folder, model=str(EXAMPLES / "mlp.py"), batch_size=8, data={"name": "digits"})


def test_a_layer_added_to_a_stage_by_hand_must_be_listed_then_trains_saves_and_resumes(tmp_path):
    """A Linear added in a stage's __init__ trained and was saved, but pipeline.json did not
    list it: resuming then failed with "it is another model's checkpoint", and dist ranks
    initialized it apart from the seeded build."""
    from safetensors import safe_open

    folder = edited_copy(tmp_path, EXAMPLES / "mlp.py", 2, lambda manifest: None)
    stage = folder / "stage1.py"
    source = stage.read_text()
    assert source.count("        return (classifier,)") == 1
    source = source.replace("    def forward(", "        self.extra = torch.nn.Linear(10, 10)\n\n    def forward(", 1)
    stage.write_text(source.replace("        return (classifier,)", "        return (classifier + self.extra(classifier),)"))
    settings = dict(model=str(EXAMPLES / "mlp.py"), batch_size=8, data={"name": "digits"},
                    checkpoint={"dir": str(tmp_path / "checkpoints")})  # fmt: skip
    with pytest.raises(FtcError) as error:
        run(folder, **settings)
    assert f"{stage} holds extra.bias, extra.weight, which the model does not have" in error.value.message
    assert "add 'extra.bias', 'extra.weight' to stage 1's \"state\" in pipeline.json" in error.value.hint
    # In dist the rank's report carries the fix too: it is all the launcher's terminal shows.
    from ftc.runtime.worker import launch

    with pytest.raises(FtcError) as error:
        launch(load_config(data={"pipeline": str(folder), "mode": "dist", "steps": 2, "batch_size": 8,
                                 "model": str(EXAMPLES / "mlp.py"), "data": {"name": "digits"}}))  # fmt: skip
    assert "rank 1: failed before training: " in error.value.message
    assert "\n    fix: add 'extra.bias', 'extra.weight' to stage 1's \"state\"" in error.value.message

    manifest = json.loads((folder / "pipeline.json").read_text())
    manifest["stages"][1]["state"] += ["extra.bias", "extra.weight"]
    (folder / "pipeline.json").write_text(json.dumps(manifest))
    run(folder, **settings)
    with safe_open(str(tmp_path / "checkpoints" / "step-00000002" / "rank-0.safetensors"), "pt") as saved:
        assert {"extra.weight", "extra.bias"} <= set(saved.keys())
    resumed = run(folder, **{**settings, "steps": 3, "checkpoint": {**settings["checkpoint"], "resume": True}})
    assert resumed.first_step == 2 and len(resumed.loss) == 1  # step 3 (first_step counts from 0)


TIED_BY_ASSIGNMENT = """
import torch
import torch.nn as nn
import torch.nn.functional as F


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.body = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(3)])
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)))


def build_model():
    return TiedLM()


def example_inputs(batch_size):
    return (torch.randint(0, 50, (batch_size, 6)),)


def loss_fn(output, target):
    return F.cross_entropy(output.reshape(-1, 50), target.reshape(-1))
"""


def test_a_weight_tied_under_two_names_on_two_devices_must_stay_tied(tmp_path):
    """Deleting pipeline.json's "tied" left embed.weight and head.weight, one tensor of the
    model, untied on two devices: dist trained them apart while check and local passed."""
    from ftc.check import check_pipeline

    model = tmp_path / "tied_lm.py"
    model.write_text(TIED_BY_ASSIGNMENT)
    kept = edited_copy(tmp_path / "kept", model, 2, lambda m: None, method="uniform")
    assert json.loads((kept / "pipeline.json").read_text())["tied"] == [["embed.weight", "head.weight"]]
    assert check_pipeline(kept).ok
    folder = edited_copy(tmp_path / "untied", model, 2, lambda m: m.update(tied=[]), method="uniform")
    message = ("the model holds 'embed.weight' and 'head.weight' as one tensor, on devices [0, 1], but \"tied\" does "
               "not list them together")  # fmt: skip
    with pytest.raises(FtcError, match=re.escape(message)):
        check_pipeline(folder)
    with pytest.raises(FtcError, match=re.escape(message)):
        run(folder, batch_size=8)


def test_a_value_reshaped_at_a_stage_boundary_and_back_passes_the_check(tmp_path):
    """Stage 0 sends GPT's hidden state flattened to [B*T, C], stage 1 views it back: the
    pipeline computes what the model does (and trains so), but check raised an internal error
    backpropagating the model-shaped gradient into the flattened value."""
    from ftc.check import check_pipeline

    def flatten_boundary(manifest):
        (name,) = manifest["stages"][0]["outputs"]
        manifest["values"][name]["shape"] = [8 * 64, 128]

    folder = edited_copy(tmp_path, EXAMPLES / "gpt.py", 2, flatten_boundary)
    (name,) = json.loads((folder / "pipeline.json").read_text())["stages"][0]["outputs"]
    sender, receiver = folder / "stage0.py", folder / "stage1.py"
    assert f"return ({name},)" in sender.read_text()
    sender.write_text(sender.read_text().replace(f"return ({name},)", f"return ({name}.reshape(-1, 128),)"))
    head = f"    def forward(self, {name}):\n"
    assert head in receiver.read_text()
    receiver.write_text(receiver.read_text().replace(head, f"{head}        {name} = {name}.view(-1, 64, 128)\n"))
    for batch_size in (8, 4):
        report = check_pipeline(folder, batch_size=batch_size)
        assert report.ok and report.stages[0].outputs == 0.0 and report.stages[1].input_grads == 0.0


def test_a_hand_edited_kind_of_a_number_sent_between_stages_is_named(tmp_path):
    """metis sends GPT's sequence length (an int) across stages; made a bool by hand it passed
    the check and was sent as 1 in dist."""
    from ftc.check import check_pipeline

    edited = []

    def as_bool(manifest):
        name = next(name for name, spec in manifest["values"].items() if spec["kind"] == "int"
                    and not spec["batch_dependent"])  # fmt: skip
        manifest["values"][name]["kind"] = "bool"
        edited.append(name)

    folder = edited_copy(tmp_path, EXAMPLES / "gpt.py", 3, as_bool, method="metis")
    report = check_pipeline(folder, batch_size=4)
    problems = [p for s in report.stages for p in s.problems]
    assert not report.ok and f"value {edited[0]} is int 64, but pipeline.json says bool" in problems


def test_a_layer_moved_between_stages_by_hand_is_checked_end_to_end(tmp_path):
    """hidden.3 moved from stage 1 into stage 0: the pipeline computes what the model does, but
    check compared each stage alone at ir.json's boundaries and failed it. It now compares the
    pipeline end to end only, and says so; a wrong move still fails."""
    from ftc.check import check_pipeline

    def move(manifest):
        first, second = manifest["stages"]
        first["outputs"], second["inputs"] = ["hidden_3"], ["hidden_3"]
        for key in ("hidden.3.bias", "hidden.3.weight"):
            second["state"].remove(key)
            first["state"].append(key)
        manifest["values"]["hidden_3"] = dict(manifest["values"]["hidden_2"])

    folder = edited_copy(tmp_path, EXAMPLES / "mlp.py", 2, move)
    stage0, stage1 = folder / "stage0.py", folder / "stage1.py"
    stage0.write_text(stage0.read_text()
                      .replace('model.get_submodule("hidden.2")\n', 'model.get_submodule("hidden.2")\n'
                               '        self.hidden["3"] = model.get_submodule("hidden.3")\n')
                      .replace("return (hidden_2,)", 'hidden_3 = self.hidden["3"](F.relu(hidden_2))\n'
                               "        return (hidden_3,)"))  # fmt: skip
    text = stage1.read_text()
    stage1.write_text(text.replace('        self.hidden["3"] = model.get_submodule("hidden.3")\n', "")
                      .replace("def forward(self, hidden_2):", "def forward(self, hidden_3):")
                      .replace('        x_1 = F.relu(hidden_2)\n        hidden_3 = self.hidden["3"](x_1)\n', ""))  # fmt: skip
    report = check_pipeline(folder, model_path=EXAMPLES / "mlp.py")
    assert report.ok and not any(s.compared for s in report.stages)
    assert report.notes and "stages [1] read other values than ir.json's split gives them" in report.notes[0]
    stage1.write_text(stage1.read_text().replace("x_2 = F.relu(hidden_3)", "x_2 = F.gelu(hidden_3)"))
    assert not check_pipeline(folder, model_path=EXAMPLES / "mlp.py").ok


EVAL_FAILS = """
import torch
import torch.nn as nn


class TrainOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        if not self.training:
            raise RuntimeError("inference is not supported")
        return self.b(torch.relu(self.a(x)))


def build_model():
    return TrainOnly()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""


def test_a_model_that_fails_in_eval_mode_is_not_compared_there_and_says_so(tmp_path):
    from ftc.check import check_pipeline

    (tmp_path / "train_only.py").write_text(EVAL_FAILS)
    folder = compile_model(tmp_path / "train_only.py", tmp_path / "gen", CompileOptions(stages=2)).folder
    report = check_pipeline(folder)
    assert report.ok and report.notes == [
        "eval mode not compared: the model itself fails in eval mode (RuntimeError: inference is not supported)"
    ]


@pytest.mark.parametrize("mode", ["single", "local"])
def test_inputs_the_pipeline_does_not_take_are_refused_in_every_mode(pipeline, mode):
    """The pipeline modes passed the compiled inputs on and dropped the rest, while mode single
    gave forward all of them: an optional mask the data set adds would train single and the
    pipeline apart (here forward takes none, so single failed in forward and local trained)."""
    _, folder = pipeline
    for function, shown in [("extra_input", "{'x', 'mask'}"), ("two_inputs", "a tuple of 2")]:
        with pytest.raises(FtcError) as info:
            run(folder, mode=mode, data={"name": "module", "module": f"{folder.parent.parent / 'model.py'}:{function}"})
        assert f"data set 'module' gives inputs {shown}, but" in info.value.message
        assert "was compiled for the inputs ['x']" in info.value.message


@pytest.mark.parametrize("mode", ["single", "local"])
def test_an_input_nested_in_a_container_is_named(pipeline, mode):
    """A sample's ((x,),): mode single raised a raw AttributeError ('tuple' object has no
    attribute 'chunk'), the stages a TypeError inside their first op."""
    root, folder = pipeline
    with pytest.raises(FtcError, match=r"input 'x' from data set 'module' is a tuple, but .* was compiled for a "
                                       r"tensor, float32\[B, 8\]"):  # fmt: skip
        run(folder, mode=mode, data={"name": "module", "module": f"{root / 'model.py'}:nested_input"})


def test_an_injected_fault_that_could_never_strike_is_refused(pipeline):
    """inject_fault without a step (0), or on a rank the run does not have (any but 0 in mode
    local), never struck: a test of the fault passed without one."""
    _, folder = pipeline
    with pytest.raises(FtcError, match="key 'inject_fault.step' is 0; steps count from 1"):
        run(folder, inject_fault={"kind": "nan"})
    with pytest.raises(FtcError, match=re.escape("key 'inject_fault.rank' is 1, but the run has 1 process(es)")):
        run(folder, inject_fault={"kind": "nan", "rank": 1, "step": 1})
    from ftc.runtime.worker import launch

    with pytest.raises(FtcError, match=re.escape("key 'inject_fault.rank' is 2, but the run has 2 process(es)")):
        launch(load_config(data={"pipeline": str(folder), "mode": "dist", "inject_fault": {"rank": 2, "step": 1}}))


def test_a_weight_clamped_in_forward_and_saved_for_the_backward_is_named_with_the_fix(tmp_path):
    """A weight clamp_ in forward: with 2 micro-batches the second forward changes the weight
    the first backward saved (an internal error from autograd before); with 1 it trains as
    mode single does."""
    folder = compile_model(MODELS / "weight_clip.py", tmp_path, CompileOptions(stages=2)).folder
    data = {"name": "synthetic", "size": 16}
    with pytest.raises(FtcError) as info:
        run(folder, batch_size=8, micro_batches=2, data=data)
    assert "stage 0 (stage0.py), micro-batch 0: the backward needs a tensor that a later forward" in info.value.message
    assert "set micro_batches to 1" in info.value.hint
    single = run(folder, mode="single", batch_size=8, micro_batches=1, data=data)
    assert run(folder, batch_size=8, micro_batches=1, data=data).loss == single.loss
