"""Every way a user can get `ftc compile` / `ftc check` wrong ends in a short error that names the
problem and the fix, exit code 2, and no traceback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from ftc.check import check_pipeline
from ftc.cli import main

from .conftest import EXAMPLES, MODELS, ROOT

GOOD = """
import torch
import torch.nn as nn

def build_model():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def run_cli(args, capsys):
    """(exit code, stdout, stderr) of `ftc ARGS` run in this process."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse rejects bad flags itself
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(result, *fragments):
    code, out, err = result
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def test_compile_prints_the_stage_table(tmp_path, capsys):
    model = write(tmp_path, "good.py", GOOD)
    code, out, err = run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "gen"], capsys)
    assert code == 0, err
    assert "predicted balance (max/mean stage time)" in out
    assert "fwd FLOPs" in out and "sends" in out
    assert (tmp_path / "gen" / "good" / "stage1.py").is_file()


FAILING = """
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        return BODY


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""
FORWARD_FAILS = {
    "shape_mismatch": (
        "self.b(self.a(x)[:, :3])",
        "node 'b' (failing.py:13) failed on the meta device: RuntimeError: mat1 and mat2 shapes cannot be multiplied",
        "fix: forward fails with the input shapes example_inputs() gives (x [8, 8]) on any device, not only on the "
        "meta device: run the model on example_inputs() in plain PyTorch",
    ),
    "broadcast": (
        "self.b(self.a(x)) + x",
        "failed on the meta device: RuntimeError:",
        "fix: forward fails with the input shapes example_inputs() gives (x [8, 8]) on any device",
    ),
    "torch_op_reading_values": (
        "self.b(torch.istft(torch.stft(self.a(x), 4, 2, window=torch.ones(4), return_complex=True), 4, 2, "
        "window=torch.ones(4), length=8))",
        "node 'istft' (failing.py:13) runs torch's aten::equal, which has no meta kernel",
        "fix: put that call in a LEAF_MODULES class, which ftc then runs as written: a module of its own",
    ),
    "torch_op_without_meta_kernel": (
        "torch.nn.functional.ctc_loss(self.b(self.a(x)).log_softmax(-1)[None], (x[:, :2] * 0 + 1).long(), "
        "(x[:, 0] * 0 + 1).long(), (x[:, 0] * 0 + 1).long(), reduction='none')",
        "node 'ctc_loss' (failing.py:13) runs torch's aten::_ctc_loss.Tensor, which has no meta kernel",
        "fix: put that call in a LEAF_MODULES class, which ftc then runs as written: a module of its own",
    ),
    "item": (
        "self.b(self.a(x)) * x.sum().item()",
        "failed on the meta device: RuntimeError: Tensor.item() cannot be called on meta tensors",
        "fix: ftc runs the model on the meta device (shapes only): avoid data-dependent Python",
    ),
}


@pytest.mark.parametrize("case", sorted(FORWARD_FAILS))
def test_forward_failing_on_the_meta_device_gets_the_fix_for_its_cause(case, tmp_path, capsys):
    """The hint about data-dependent Python is for what only the meta device cannot run; a plain
    shape error fails on any device, and the hint says so, with the shapes it ran with."""
    body, *fragments = FORWARD_FAILS[case]
    model = write(tmp_path, "failing.py", FAILING.replace("BODY", body))
    result = run_cli(["compile", model, "--stages", 2, "--frontend", "fx", "-o", tmp_path / "gen"], capsys)
    assert_user_error(result, *fragments)
    assert ("data-dependent" in result[2]) == (case == "item")


@pytest.mark.parametrize("frontend", ["auto", "fx", "export"])
def test_forward_that_no_tracer_follows_for_a_shape_error_is_named_as_such(frontend, tmp_path, capsys):
    """A shape mismatch behind shape-dependent Python (fx fails on the branch, export on the
    mismatch) was reported as untraceable Python, with the fix to remove branching on shapes."""
    body = "self.b(self.a(x)[:, :3] if x.shape[0] > 1 else self.a(x))"
    model = write(tmp_path, "failing.py", FAILING.replace("BODY", body))
    result = run_cli(["compile", model, "--stages", 2, "--frontend", frontend, "-o", tmp_path / "gen"], capsys)
    fix = "fix: forward fails with the input shapes example_inputs() gives (x [8, 8]) on any device"
    assert_user_error(result, "failing.py: forward raised RuntimeError:", f"(at {model}:13: return {body})", fix)
    assert "could not trace" not in result[2]


def test_overhead_flags_reach_the_predicted_times(tmp_path, capsys):
    """The per-op and per-stage overheads are the analytic device model's: setting them to 0
    leaves the roofline, and the manifest records them."""
    model = write(tmp_path, "good.py", GOOD)
    totals = {}
    for op, stage in (("0", "0"), ("8", "30")):
        folder = tmp_path / f"gen{op}"
        args = ["compile", model, "--stages", 2, "-o", folder, "--op-overhead-us", op, "--stage-overhead-us", stage]
        code, _, err = run_cli(args, capsys)
        assert code == 0, err
        manifest = json.loads((folder / "good" / "pipeline.json").read_text())
        assert manifest["settings"]["op_overhead_us"] == float(op)
        assert manifest["settings"]["stage_overhead_us"] == float(stage)
        totals[op] = sum(s["cost"]["bwd_time"] for s in manifest["stages"])
    assert totals["8"] > totals["0"] + 2 * 30e-6  # every stage's call, and every op's overhead


MODEL_FILE_ERRORS = {
    "missing_functions": ("import torch\n", "defines no function build_model()"),
    "no_inputs": ("import torch\ndef build_model():\n    return torch.nn.Linear(2, 2)\n", "defines no function example_inputs()"),
    "syntax": ("def build_model(:\n", "importing the model file raised SyntaxError"),
    "import_fails": ("import not_a_module_anywhere\n", "No module named 'not_a_module_anywhere'"),
    "build_raises": (
        GOOD.replace("return nn.Sequential", "raise ValueError('bad width')\n    return nn.Sequential"),
        # not about meta tensors: the fix is to make it build at all, not the meta advice
        "raise ValueError('bad width')) while building on the meta device\n  fix: make build_model() run on its own "
        "(python -c 'import build_raises; build_raises.build_model()'); if it builds there,",
    ),
    "build_reads_meta_values": (  # a meta tensor's value read while building: the meta advice
        GOOD.replace("return nn.Sequential", "torch.zeros(3).sum().item()\n    return nn.Sequential"),
        "while building on the meta device\n  fix: ftc builds the model under torch.device(\"meta\")",
    ),
    "build_needs_arguments": (  # said as the call, not as a failure on the meta device
        GOOD.replace("def build_model():", "def build_model(width, *, depth=2):"),
        "build_model() requires width, but ftc calls it with no arguments\n  fix: give it a default: def build_model(width=...)",
    ),
    "lazy_layers": (  # traced, they stopped as "could not trace the model", advising against value-dependent Python
        GOOD.replace("nn.Linear(8, 16)", "nn.LazyLinear(16)"),
        "lazy modules whose parameters are not made yet: 0 (LazyLinear)",
    ),
    "sparse_buffer": (  # made on the CPU (the meta device has no sparse coalesce): an internal error while tracing
        GOOD.replace(
            "    return nn.Sequential(",
            "    model = nn.Linear(2, 2)\n    with torch.device('cpu'):\n"
            "        model.register_buffer('adj', torch.eye(3).to_sparse())\n    return model\n    return nn.Sequential(",
        ),
        "build_model() returned sparse tensors: adj",
    ),
    "not_a_module": (GOOD.replace("return nn.Sequential(", "return [").replace("nn.Linear(16, 4))", "nn.Linear(16, 4)]"), "not a torch.nn.Module"),
    "inputs_not_tensors": (GOOD.replace("(torch.randn(batch_size, 8),)", "([1, 2, 3],)"), "input 0 is a list, not a tensor"),
    "inputs_batch_dict": (  # one Lightning-style batch dict given positionally: "pass only tensors" misled
        GOOD.replace("(torch.randn(batch_size, 8),)", "({'image': torch.randn(batch_size, 8), 'scale': torch.rand(batch_size)},)"),
        "input 0 is a dict, not a tensor\n  fix: return the dict itself from example_inputs() (keyword inputs, not a "
        "tuple holding it) and give forward one parameter per key (def forward(self, image, scale))",
    ),
    "inputs_none": (  # an optional input given as None: leaving it out is the fix
        GOOD.replace("(torch.randn(batch_size, 8),)", "{'input': torch.randn(batch_size, 8), 'mask': None}"),
        "fix: leave 'mask' out of example_inputs()",
    ),
    "inputs_wrong_type": (GOOD.replace("(torch.randn(batch_size, 8),)", "'text'"), "example_inputs() returned str"),
    "unknown_keyword": (GOOD.replace("(torch.randn(batch_size, 8),)", "{'x': torch.randn(batch_size, 8)}"), "keyword inputs ['x']"),
    "reads_values_on_meta": (
        GOOD.replace("    return nn.Sequential(", "    print(torch.ones(2).sum().item())\n    return nn.Sequential("),
        "while building on the meta device",
    ),
    "inputs_through_kwargs": (
        "import torch\nclass M(torch.nn.Module):\n    def forward(self, **extra):\n        return extra['2nd'] * 2\n"
        "def build_model():\n    return M()\ndef example_inputs(batch_size):\n    return {'2nd': torch.randn(batch_size, 2)}\n",
        "which forward takes only through **extra",
    ),
}


@pytest.mark.parametrize("case", sorted(MODEL_FILE_ERRORS))
def test_bad_model_files(case, tmp_path, capsys):
    text, fragment = MODEL_FILE_ERRORS[case]
    model = write(tmp_path, f"{case}.py", text)
    result = run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "gen"], capsys)
    assert_user_error(result, fragment, f"{case}.py", "fix:")


def test_a_torch_compiled_model_is_named_as_such(tmp_path, capsys, monkeypatch):
    """An OptimizedModule's forward takes *args: "give forward explicit parameters" misled."""
    # torch.compile's first call turns off torch.distributions' argument checks process-wide
    monkeypatch.setattr(torch.distributions.Distribution, "_validate_args", torch.distributions.Distribution._validate_args)
    text = GOOD.replace("    return nn.Sequential(", "    return torch.compile(nn.Sequential(")
    model = write(tmp_path, "compiled.py", text.replace("nn.Linear(16, 4))", "nn.Linear(16, 4)))"))
    result = run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "out"], capsys)
    assert_user_error(result, "build_model() returned a torch.compile'd model (Sequential wrapped in an OptimizedModule)")


def test_merge_checkpoint_of_a_missing_folder_says_it_does_not_exist(tmp_path, capsys):
    """A mistyped checkpoint folder was said to hold "no complete checkpoint", as if a run had failed."""
    result = run_cli(["merge-checkpoint", tmp_path / "chekpoints"], capsys)
    assert_user_error(result, f"{tmp_path / 'chekpoints'} does not exist", "fix: pass the checkpoint.dir of a training run")


def test_missing_model_file(tmp_path, capsys):
    result = run_cli(["compile", tmp_path / "nowhere.py", "--stages", 2, "-o", tmp_path], capsys)
    assert_user_error(result, "nowhere.py does not exist")


@pytest.mark.parametrize("named", ["model", "sibling"])
def test_a_file_named_as_a_module_a_library_imports_is_told_to_rename(named, tmp_path, capsys, monkeypatch):
    """transformers imports the package `xlstm` where it finds one; a model file called xlstm.py
    (or one beside a copy of it) that builds transformers' xLSTM was that package, ran again
    inside its own import and stopped as "Could not import module 'xLSTMConfig'", which said
    nothing of the name."""
    library = tmp_path / "site" / "fancylib"
    library.mkdir(parents=True)
    write(library, "__init__.py", """
        import importlib.util

        if importlib.util.find_spec("fancy_backend") is not None:  # an optional backend, as transformers looks for one
            import fancy_backend
        from fancylib.layers import Block
    """)
    write(library, "layers.py", "import torch.nn as nn\nBlock = nn.Linear\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    text = GOOD.replace("import torch.nn as nn", "import torch.nn as nn\nfrom fancylib import Block")
    write(tmp_path, "fancy_backend.py", text)
    model = write(tmp_path, "net.py", text) if named == "sibling" else tmp_path / "fancy_backend.py"
    which = "fancy_backend.py beside the model file" if named == "sibling" else "the model file"
    result = run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "gen"], capsys)
    assert_user_error(result, "cannot import name 'Block' from partially initialized module 'fancylib'",
                      f"a library imported {which} as module 'fancy_backend'", "fix: rename fancy_backend.py")  # fmt: skip


def test_model_file_must_be_python(tmp_path, capsys):
    path = write(tmp_path, "model.txt", GOOD)
    assert_user_error(run_cli(["compile", path, "--stages", 2, "-o", tmp_path], capsys), "is not a .py file")


def test_untraceable_model_names_the_source_line(tmp_path, capsys):
    model = write(
        tmp_path,
        "branchy.py",
        """
        import torch
        import torch.nn as nn

        class Branchy(nn.Module):
            def __init__(self):
                super().__init__()
                self.a = nn.Linear(8, 8)

            def forward(self, x):
                h = self.a(x)
                if h.sum() > 0:
                    return h * 2
                return h

        def build_model():
            return Branchy()

        def example_inputs(batch_size):
            return (torch.randn(batch_size, 8),)
        """,
    )
    result = run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "gen"], capsys)
    assert_user_error(result, "branchy.py:12", "if h.sum() > 0:", "LEAF_MODULES")


def test_an_export_failure_names_leaf_modules_with_the_frontend_that_keeps_them_whole(tmp_path, capsys):
    """Under --frontend export, the hint said to list the class in LEAF_MODULES "so it is kept
    whole", which export does not do (it traces into them): the hint names fx or auto with it, and
    that cure compiles a pipeline that passes the check."""
    source = """
        import torch
        import torch.nn as nn

        class Clip(nn.Module):
            def forward(self, h):
                if h.abs().max() > 1:
                    return h.clamp(-1, 1)
                return h

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.clip, self.b = nn.Linear(8, 8), Clip(), nn.Linear(8, 2)

            def forward(self, x):
                return self.b(self.clip(self.a(x)))

        def build_model():
            return Net()

        def example_inputs(batch_size):
            return (torch.randn(batch_size, 8),)
        """
    model = write(tmp_path, "clipped.py", source)
    result = run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "gen", "--frontend", "export"], capsys)
    assert_user_error(result, "clipped.py:7", "if h.abs().max() > 1:",
                      "LEAF_MODULES and compile with --frontend fx or auto, which keep it whole")  # fmt: skip
    cured = write(tmp_path, "cured.py", source + "\n        LEAF_MODULES = (Clip,)\n")
    assert run_cli(["compile", cured, "--stages", 2, "-o", tmp_path / "gen", "--frontend", "auto"], capsys)[0] == 0
    assert run_cli(["check", tmp_path / "gen" / "cured"], capsys)[0] == 0


def test_distribution_argument_checks_suggest_validate_args(tmp_path, capsys, monkeypatch):
    """torch.distributions validates argument values by default, which fails both tracers deep
    inside torch; the fix names the switch that turns the check off."""
    # on, as in a fresh process: torch.compile's first call (a test of compiled submodules in
    # this pytest worker) turns the checks off for the whole process
    monkeypatch.setattr(torch.distributions.Distribution, "_validate_args", True)
    model = write(
        tmp_path,
        "policy.py",
        """
        import torch
        import torch.nn as nn
        from torch.distributions import Normal

        class Policy(nn.Module):
            def __init__(self):
                super().__init__()
                self.mu = nn.Linear(6, 2)

            def forward(self, x):
                return Normal(self.mu(x), 1.0).log_prob(x[:, :2]).sum(-1)

        def build_model():
            return Policy()

        def example_inputs(batch_size):
            return (torch.randn(batch_size, 6),)
        """,
    )
    result = run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "gen"], capsys)
    assert_user_error(result, "policy.py:12", "validate_args=False")
    fixed = write(tmp_path, "policy_fixed.py", model.read_text().replace("1.0)", "1.0, validate_args=False)"))
    code, _, err = run_cli(["compile", fixed, "--stages", 2, "-o", tmp_path / "gen"], capsys)
    assert code == 0, err


def test_distribution_made_only_in_training_suggests_validate_args(tmp_path, capsys, monkeypatch):
    """GroupViT makes a Gumbel only while training: export then traces in eval mode only, and the
    error said to turn off a layer skip; the argument check is what fails, and a library's own
    distribution has no validate_args to pass, so the fix names the global default."""
    monkeypatch.setattr(torch.distributions.Distribution, "_validate_args", True)
    model = write(
        tmp_path,
        "grouping.py",
        """
        import torch
        import torch.nn as nn
        from torch.distributions import Gumbel

        class Grouping(nn.Module):
            def __init__(self):
                super().__init__()
                self.assign = nn.Linear(6, 4)

            def forward(self, x):
                logits = self.assign(x)
                if self.training:
                    noise = Gumbel(torch.zeros((), device=x.device), torch.ones((), device=x.device))
                    logits = logits + noise.sample(logits.shape)
                return logits.softmax(-1)

        def build_model():
            return Grouping()

        def example_inputs(batch_size):
            return (torch.randn(batch_size, 6),)
        """,
    )
    result = run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "gen"], capsys)
    assert_user_error(result, "grouping.py", "set_default_validate_args(False)")
    assert "layerdrop" not in result[2]
    fixed = write(
        tmp_path,
        "grouping_fixed.py",
        model.read_text().replace(
            "    return Grouping()", "    torch.distributions.Distribution.set_default_validate_args(False)\n    return Grouping()"
        ),
    )
    code, _, err = run_cli(["compile", fixed, "--stages", 2, "-o", tmp_path / "gen"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_autocast_inside_forward_is_refused(frontend, tmp_path, capsys):
    """fx drops context managers and export wraps the block in a higher-order op that ftc does not
    lower; silently dropping autocast would change the numerics. Both name the line and the
    config's precision setting that does it for the whole model."""
    text = GOOD.replace(
        "def build_model():",
        "class Casting(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(8, 4)\n\n"
        "    def forward(self, x):\n"
        "        with torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "            return self.fc(x)\n\n\n"
        "def build_model():\n    return Casting()\n\n\ndef unused():",
    )
    model = write(tmp_path, "casting.py", text)
    result = run_cli(["compile", model, "--stages", 1, "-o", tmp_path / "gen", "--frontend", frontend], capsys)
    assert_user_error(result, "casting.py:", "torch.autocast", '"precision": "bf16"')


def test_a_draw_from_a_generator_of_the_models_own_is_refused_by_name(tmp_path, capsys):
    """fx keeps the generator as an attribute, which ftc reported as "reads attribute
    '_opaque_obj0', which is not a tensor"."""
    text = GOOD.replace(
        "def build_model():",
        "class Noisy(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.generator = torch.Generator().manual_seed(7)\n"
        "        self.fc = nn.Linear(8, 4)\n\n"
        "    def forward(self, x):\n"
        "        return self.fc(x + torch.randn(x.shape, generator=self.generator))\n\n\n"
        "def build_model():\n    return Noisy()\n\n\ndef unused():",
    )
    model = write(tmp_path, "noisy.py", text)
    result = run_cli(["compile", model, "--stages", 1, "-o", tmp_path / "gen"], capsys)
    assert_user_error(result, "noisy.py:", "torch.Generator", "default generator", "LEAF_MODULES")


def test_more_stages_than_ops(tmp_path, capsys):
    model = write(tmp_path, "good.py", GOOD)
    result = run_cli(["compile", model, "--stages", 6, "-o", tmp_path / "gen"], capsys)
    assert_user_error(result, "cannot split the 5 ops", "--stages 5 or fewer")


@pytest.mark.parametrize(
    "flags,fragment",
    [
        (["--stages", "0"], "must be at least 1"),
        (["--stages", "two"], "'two' is not an integer"),
        (["--stages", "2", "--batch-size", "0"], "must be at least 1"),
        (["--stages", "2", "--bandwidth", "0"], "must be a positive number"),
        (["--stages", "2", "--bandwidth", "-3"], "must be a positive number"),
        (["--stages", "2", "--tflops", "nan"], "must be a positive number"),
        (["--stages", "2", "--op-overhead-us", "-1"], "must be 0 or a positive number"),
        (["--stages", "2", "--stage-overhead-us", "inf"], "must be 0 or a positive number"),
        (["--stages", "2", "--tflops", "1e-320"], "--tflops must be between 1e-9 and 1e9 TFLOP/s"),
        (["--stages", "2", "--bandwidth", "1e12"], "fix: give the rate in GB/s (for 16 GB/s, pass --bandwidth 16)"),
        (["--stages", "2", "--op-overhead-us", "1e308"], "--op-overhead-us must be between 0 and 1e9 microseconds"),
        (["--stages", "2", "--memory-limit", "1e400"], "is too large"),
        (["--stages", "2", "--memory-limit", "-5MB"], "'-5MB' is not a memory size"),
        (["--stages", "2", "--tflops", "-1e-3"], "must be a positive number"),
        (["--stages", "2", "--method", "magic"], "invalid choice: 'magic'"),
        (["--stages", "2", "--frontend", "jit"], "invalid choice: 'jit'"),
        (["--stages", "2", "--name", "not a name"], "is not a Python identifier"),
        ([], "--stages"),
    ],
)
def test_bad_flags(flags, fragment, tmp_path, capsys):
    model = write(tmp_path, "good.py", GOOD)
    result = run_cli(["compile", model, "-o", tmp_path / "gen", *flags], capsys)
    assert_user_error(result, fragment)


def test_check_needs_a_pipeline_folder(tmp_path, capsys):
    assert_user_error(run_cli(["check", tmp_path], capsys), "holds no pipeline.json")
    # `ftc compile -o DIR` writes DIR/<name>/: DIR itself names the pipelines inside it
    (tmp_path / "mlp").mkdir()
    (tmp_path / "mlp" / "pipeline.json").write_text("{}")
    assert_user_error(run_cli(["check", tmp_path], capsys), f"pass the pipeline folder inside it: {tmp_path / 'mlp'}")


def test_hand_edits_are_protected_and_checked(tmp_path, capsys):
    model = write(tmp_path, "good.py", GOOD)
    out_dir = tmp_path / "gen"
    assert run_cli(["compile", model, "--stages", 2, "-o", out_dir], capsys)[0] == 0
    stage = out_dir / "good" / "stage1.py"
    original = stage.read_text()

    # A harmless edit: the check still passes, but a recompile refuses to overwrite it.
    stage.write_text(original.replace("    def forward(", "    # tuned by hand\n    def forward("))
    assert run_cli(["check", out_dir / "good"], capsys)[0] == 0
    result = run_cli(["compile", model, "--stages", 2, "-o", out_dir], capsys)
    assert_user_error(result, "edited by hand", "stage1.py", "--force")

    # A broken edit: the check fails and points at the edited stage only.
    assert original.count("return (") == 1
    broken = original.replace("return (", "return (2 * ")
    stage.write_text(broken)
    code, out, _ = run_cli(["check", out_dir / "good"], capsys)
    assert code == 1
    assert "check FAILED" in out
    stage_row = next(line for line in out.splitlines() if "stage1.py" in line)
    assert "FAIL" in stage_row
    stage0_row = next(line for line in out.splitlines() if "stage0.py" in line)
    assert stage0_row.rstrip().endswith("ok")

    assert run_cli(["compile", model, "--stages", 2, "-o", out_dir, "--force"], capsys)[0] == 0
    assert stage.read_text() == original


def test_a_changed_stage_is_not_blamed_on_the_training_mode(tmp_path, capsys):
    """A stage edited to compute something else (its output doubled) failed in eval mode with
    "(a stage keeps the training mode it was traced in)", a cause that was not the one."""
    model = write(tmp_path, "good.py", GOOD)
    assert run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "gen"], capsys)[0] == 0
    stage = tmp_path / "gen" / "good" / "stage1.py"
    assert stage.read_text().count("return (") == 1
    stage.write_text(stage.read_text().replace("return (", "return (2 * "))
    code, out, _ = run_cli(["check", tmp_path / "gen" / "good", "--batch-size", 4], capsys)
    assert code == 1
    eval_line = next(line for line in out.splitlines() if line.startswith("eval mode:"))
    assert eval_line.endswith(" FAIL") and "training mode" not in eval_line


def test_a_hand_edited_stage_imports_a_module_of_the_users_from_the_folder(tmp_path, capsys):
    """A stage edited to use a helper module put in the generated folder could import it neither
    way: "No module named 'mine'", "No module named 'ftc_stage'"."""
    model = write(tmp_path, "good.py", GOOD)
    assert run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "gen"], capsys)[0] == 0
    folder = tmp_path / "gen" / "good"
    (folder / "mine.py").write_text("def same(x):\n    return x\n")
    stage = folder / "stage1.py"
    original = stage.read_text()
    assert original.count("return (") == 1
    for spelling in ("from .mine import same", "from mine import same"):
        stage.write_text(original.replace("import torch\n", f"import torch\n{spelling}\n", 1).replace("return (", "return (same("
                         ).replace(",)\n", "),)\n"))  # fmt: skip
        assert "return (same(" in stage.read_text()
        code, out, err = run_cli(["check", folder], capsys)
        assert code == 0 and "check passed" in out, (spelling, out, err)

    stage.write_text(original.replace("return (", "return ((", 1))  # a typo: no fix line was given
    assert_user_error(run_cli(["check", folder], capsys), "stage1.py: importing the stage raised SyntaxError",
                      "fix: fix the hand edit of stage1.py and run `ftc check`, or recompile")  # fmt: skip


def edit_manifest(folder, edit, indent=1):
    manifest = json.loads((folder / "pipeline.json").read_text())
    edit(manifest)
    (folder / "pipeline.json").write_text(json.dumps(manifest, indent=indent) + "\n")


def test_a_hand_edited_manifest_is_not_overwritten_without_force(tmp_path, capsys):
    """Recompiling replaced a hand-edited pipeline.json (its device map, say) without a word."""
    model = write(tmp_path, "good.py", GOOD)
    out_dir = tmp_path / "gen"
    compile_args = ["compile", model, "--stages", 2, "-o", out_dir]
    assert run_cli(compile_args, capsys)[0] == 0
    folder = out_dir / "good"
    edit_manifest(folder, lambda m: m["stages"][1].update(device=0))  # both stages on one device
    edited = (folder / "pipeline.json").read_text()

    # The runtime accepts this edit: the manifest's own digest is for the compiler only.
    assert run_cli(["check", folder], capsys)[0] == 0
    result = run_cli(compile_args, capsys)
    assert_user_error(result, "edited by hand", "pipeline.json", "copy these files elsewhere", "--force")
    assert "ftc wrote them: pipeline.json\n" in result[2]  # the stage files are untouched
    assert (folder / "pipeline.json").read_text() == edited

    stage = folder / "stage1.py"
    stage.write_text(stage.read_text() + "# tuned by hand\n")
    assert_user_error(run_cli(compile_args, capsys), "ftc wrote them: pipeline.json, stage1.py")

    assert run_cli([*compile_args, "--force"], capsys)[0] == 0
    assert json.loads((folder / "pipeline.json").read_text())["stages"][1]["device"] == 1
    assert run_cli(compile_args, capsys)[0] == 0  # what --force wrote is ftc's own again


def test_an_untouched_or_only_reformatted_folder_recompiles_to_the_same_bytes(tmp_path, capsys):
    model = write(tmp_path, "good.py", GOOD)
    compile_args = ["compile", model, "--stages", 2, "-o", tmp_path / "gen"]
    folder = tmp_path / "gen" / "good"
    assert run_cli(compile_args, capsys)[0] == 0
    written = {path.name: path.read_bytes() for path in folder.iterdir()}
    code, _, err = run_cli(compile_args, capsys)
    assert code == 0 and err == "", err
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == written

    edit_manifest(folder, lambda m: None, indent=4)  # the same content, laid out another way
    assert run_cli(compile_args, capsys)[0] == 0
    assert (folder / "pipeline.json").read_bytes() == written["pipeline.json"]


def test_a_manifest_from_before_its_own_digest_recompiles(tmp_path, capsys):
    """Folders the previous version wrote have no manifest_sha256: they cannot be told apart,
    and must not be taken for hand-edited."""
    model = write(tmp_path, "good.py", GOOD)
    compile_args = ["compile", model, "--stages", 2, "-o", tmp_path / "gen"]
    folder = tmp_path / "gen" / "good"
    assert run_cli(compile_args, capsys)[0] == 0
    written = (folder / "pipeline.json").read_text()
    edit_manifest(folder, lambda m: m.pop("manifest_sha256"))
    assert run_cli(["check", folder], capsys)[0] == 0
    assert run_cli(compile_args, capsys)[0] == 0
    assert (folder / "pipeline.json").read_text() == written


def test_a_recompile_removes_stale_stage_files_and_nothing_a_manifest_merely_lists(tmp_path, capsys):
    """With fewer stages the old last stage goes; a path a hand-edited manifest lists as a stage
    file is the user's, and --force leaves it."""
    model = write(tmp_path, "good.py", GOOD)
    folder = tmp_path / "gen" / "good"
    assert run_cli(["compile", model, "--stages", 3, "-o", tmp_path / "gen"], capsys)[0] == 0
    assert run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "gen"], capsys)[0] == 0
    assert sorted(path.name for path in folder.glob("stage*.py")) == ["stage0.py", "stage1.py"]

    notes = tmp_path / "notes.py"
    notes.write_text("kept\n")
    edit_manifest(folder, lambda m: m["stages"][1].update(file="../../notes.py"))
    assert run_cli(["compile", model, "--stages", 1, "-o", tmp_path / "gen", "--force"], capsys)[0] == 0
    assert notes.read_text() == "kept\n"


def test_check_runs_at_the_micro_batch_size_too(tmp_path, capsys):
    """A stage that holds only at the compile batch size (a hand-written `.view(8, -1)`) passed
    the check and failed in training, whose micro-batches are smaller."""
    assert run_cli(["compile", EXAMPLES / "mlp.py", "--stages", 2, "-o", tmp_path], capsys)[0] == 0
    folder = tmp_path / "mlp"
    assert json.loads((folder / "pipeline.json").read_text())["settings"]["micro_batches"] == 2
    code, out, _ = run_cli(["check", folder], capsys)
    assert code == 0 and "batch size 8," in out and "batch size 4," in out
    assert "check passed at batch sizes 8 and 4" in out
    stage = folder / "stage1.py"
    stage.write_text(stage.read_text().replace("x_1 = F.relu(hidden_2)", "x_1 = F.relu(hidden_2.view(8, -1))"))
    code, out, _ = run_cli(["check", folder], capsys)
    assert code == 1 and "check FAILED at batch sizes 8 and 4" in out
    assert run_cli(["check", folder, "--batch-size", 8], capsys)[0] == 0


def test_console_script_end_to_end(tmp_path):
    """The installed `ftc` command itself: compile and check the MLP example."""
    ftc = [sys.executable, "-m", "ftc.cli"]
    done = subprocess.run(
        [*ftc, "compile", EXAMPLES / "mlp.py", "--stages", "2", "-o", tmp_path],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    done = subprocess.run([*ftc, "check", tmp_path / "mlp"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "check passed" in done.stdout


COUNTER = """
import torch
import torch.nn as nn


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return self.b(torch.relu(self.a(x)))


def build_model():
    return Counter()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""


SLICE_ASSIGNED = """
import torch
import torch.nn as nn


class Patched(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x)
        h[:, :4] += x[:, 4:]
        return self.b(torch.relu(h))


def build_model():
    return Patched()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""


def test_an_assignment_into_a_slice_is_refused_by_fx_naming_export(tmp_path, capsys):
    """fx has no __setitem__ on a traced tensor; its refusal said to make Python independent of
    values, which `h[:, :4] += y` is. export records it, and the stages compute what it does."""
    from ftc.check import check_pipeline

    model = write(tmp_path, "patched.py", SLICE_ASSIGNED)
    refused = run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "fx", "--frontend", "fx"], capsys)
    assert_user_error(refused, "(at " + str(model) + ":14: h[:, :4] += x[:, 4:])",
                      "fix: torch.fx cannot record an assignment into part of a traced tensor", "--frontend export or auto")  # fmt: skip
    assert run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "auto"], capsys)[0] == 0
    assert check_pipeline(tmp_path / "auto" / "patched").ok


def test_a_reassigned_buffer_is_refused_by_fx_and_compiled_by_export(tmp_path, capsys):
    model = write(tmp_path, "counter.py", COUNTER)
    refused = run_cli(["compile", model, "--stages", 1, "-o", tmp_path / "fx", "--frontend", "fx"], capsys)
    assert_user_error(refused, "torch.fx could not trace the model", "forward assigns buffer calls",
                      "fix: compile with --frontend export or auto, or update the buffer in place")  # fmt: skip
    # export writes the buffer back onto itself after the last op; that no-op must not keep the
    # model from splitting. --frontend auto says why it took export.
    code, out, _ = run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "auto"], capsys)
    assert code == 0
    assert "note: traced with torch.export, as torch.fx could not: BufferAssigned: forward assigns buffer calls" in out
    assert json.loads((tmp_path / "auto" / "counter" / "ir.json").read_text())["frontend"] == "export"
    assert check_pipeline(tmp_path / "auto" / "counter").ok


def test_a_nested_output_is_named(tmp_path, capsys):
    text = GOOD.replace("return nn.Sequential(", "return Nested(nn.Sequential(") + """

class Nested(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        h = self.body(x)
        return {"logits": h, "hidden": (h, h)}
"""
    text = text.replace("nn.Linear(16, 4))", "nn.Linear(16, 4)))")
    model = write(tmp_path, "nested.py", text)
    result = run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "gen"], capsys)
    assert_user_error(result, "model output ['hidden'] is a tuple: the output is nested")


KWARGS_MODEL = """
import torch
import torch.nn as nn


class Options(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x, *, mask=None, **kwargs):
        h = self.a(x) * READ
        if mask is not None:
            h = h * mask
        return self.b(torch.relu(h))


def build_model():
    return Options()


def example_inputs(batch_size):
    return {"x": torch.randn(batch_size, 8), "mask": torch.ones(batch_size, 8)}
"""


CLAMPED_WEIGHT = """
import torch
import torch.nn as nn


class Clamped(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16) * 0.1)
        self.layers = nn.ModuleList([nn.Linear(16, 16) for _ in range(6)])

    def forward(self, x):
        with torch.no_grad():
            self.w.clamp_(-0.3, 0.3)
        h = x @ self.w
        for layer in self.layers:
            h = torch.relu(layer(h))
        return h @ self.w.t()


def build_model():
    return Clamped()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 16),)
"""


def test_auto_takes_export_where_fx_cannot_cut_enough_stages(tmp_path, capsys):
    """fx keeps every reader of a parameter forward clamps in place with the clamp (here: the
    whole model), so it allows 2 stages; export passes the clamped weight on as a value."""
    from ftc.check import check_pipeline

    model = write(tmp_path, "clamped.py", CLAMPED_WEIGHT)
    result = run_cli(["compile", model, "--stages", 3, "--frontend", "fx", "-o", tmp_path / "fx"], capsys)
    assert_user_error(result, "at most 2 stages are possible", "--frontend export may allow more")
    code, out, err = run_cli(["compile", model, "--stages", 3, "-o", tmp_path / "auto"], capsys)
    assert code == 0, err
    assert "note: traced with torch.export, whose graph splits into up to" in out and "torch.fx's allows 2" in out
    assert json.loads((tmp_path / "auto" / "clamped" / "ir.json").read_text())["frontend"] == "export"
    assert check_pipeline(tmp_path / "auto" / "clamped").ok
    assert run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "two"], capsys)[0] == 0  # fx suffices
    assert json.loads((tmp_path / "two" / "clamped" / "ir.json").read_text())["frontend"] == "fx"


def test_forward_options_through_kwargs_take_their_defaults(tmp_path, capsys):
    """fx traced **kwargs as a value and dropped everything that read it, the output included
    (an internal error); `.get(key, default)` is now the default, other reads are named."""
    from ftc.check import check_pipeline

    model = write(tmp_path, "options.py", KWARGS_MODEL.replace("READ", 'kwargs.get("scale", 2.0)'))
    assert run_cli(["compile", model, "--stages", 2, "--frontend", "fx", "-o", tmp_path / "gen"], capsys)[0] == 0
    assert "a * 2.0" in (tmp_path / "gen" / "options" / "stage0.py").read_text()
    assert check_pipeline(tmp_path / "gen" / "options").ok
    model = write(tmp_path, "strict.py", KWARGS_MODEL.replace("READ", 'kwargs["scale"]'))
    result = run_cli(["compile", model, "--stages", 2, "--frontend", "fx", "-o", tmp_path / "gen"], capsys)
    assert_user_error(result, "forward reads **kwargs other than by .get(key, default)", "give forward a named parameter")


STRUCTURED_OUTPUTS = {
    "named_tuple": (
        "from typing import NamedTuple\n\n\nclass Out(NamedTuple):",
        "Out",
        {"fx": "the model builds a NamedTuple (Out) in forward", "export": "the model builds a NamedTuple (Out) in forward"},
        "return a plain tuple or a dict",
    ),
    "dataclass": (
        "from dataclasses import dataclass\n\n\n@dataclass\nclass Result:",
        "Result",
        {"fx": "the model builds a dataclass (Result) in forward", "export": "forward returns a Result"},
        "return a",
    ),
}


@pytest.mark.parametrize("kind", sorted(STRUCTURED_OUTPUTS))
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_structured_output_is_named(kind, frontend, tmp_path, capsys):
    """A NamedTuple: fx named an internal module ("ftc_model_file.named_out_<hash>.Out cannot be
    imported") and export failed inside pytree (`issubclass() arg 1 must be a class`). A
    dataclass: fx told to remove torch.fx.wrap, which the model never used."""
    header, name, expected, hint = STRUCTURED_OUTPUTS[kind]
    text = GOOD.replace("return nn.Sequential(", "return Named(nn.Sequential(") + f"""

{header}
    logits: torch.Tensor
    hidden: torch.Tensor


class Named(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        h = self.body(x)
        return {name}(h, torch.tanh(h))
"""
    text = text.replace("nn.Linear(16, 4))", "nn.Linear(16, 4)))")
    model = write(tmp_path, f"{kind}_out.py", text)
    result = run_cli(["compile", model, "--stages", 2, "--frontend", frontend, "-o", tmp_path / "gen"], capsys)
    assert_user_error(result, expected[frontend], hint)


def test_check_against_another_model_says_so(tmp_path, capsys):
    model = write(tmp_path, "good.py", GOOD)
    other = write(tmp_path, "counter.py", COUNTER)
    assert run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "gen"], capsys)[0] == 0
    result = run_cli(["check", tmp_path / "gen" / "good", "--model", other], capsys)
    assert_user_error(result, "counter.py builds a model without", "it is another model")


MANIFEST_EDITS = [
    (lambda m: m["stages"][1]["inputs"].__setitem__(0, "renamed"), "stage 1: inputs ['renamed'] are neither"),
    (lambda m: m["stages"].pop(), "key 'outputs' lists ['classifier'], which no stage returns"),
    (lambda m: m["stages"][3].__setitem__("device", 5), "stages' devices are [0, 1, 2, 5]"),
    (lambda m: m["stages"][1].__setitem__("device", "1"), "stage 1: key 'device' is \"1\""),
    (lambda m: m.pop("batch_size"), "key 'batch_size' is missing"),
    (lambda m: m["stages"][0].pop("state"), "stage 0: key 'state' is missing"),
    (lambda m: m["values"].pop("x_3"), "key 'values' lacks the specs of ['x_3']\n  fix: a value a stage sends "
     "needs one: add \"x_3\" to \"values\" with its shape at batch size 8, dtype, batch_dim and requires_grad (like "
     "{\"x\": {\"kind\": \"tensor\", \"shape\": [8, 64]"),
    (lambda m: m["values"].__setitem__("x_3", {}), "value 'x_3' has kind null; it must be one of tensor"),
    (lambda m: m["values"]["x_3"].pop("shape"), "value 'x_3' has shape null; it must be a list of sizes"),
    (lambda m: m["values"]["x_3"].__setitem__("shape", "8x128"), "value 'x_3' has shape \"8x128\""),
    (lambda m: m["values"]["x_3"].__setitem__("dtype", "floaty"), "value 'x_3' has dtype \"floaty\"; it must name"),
    (lambda m: m["values"]["x_3"].__setitem__("batch_dim", 5), "value 'x_3' has batch_dim 5; it must be null or"),
    (lambda m: m["values"]["x_3"].__setitem__("other_batch_dims", [0]), "value 'x_3' has other_batch_dims [0]"),
    (lambda m: m.__setitem__("output_structure", {"kind": "dict"}), "key 'output_structure' is a dict, so its 'keys'"),
    (lambda m: m.__setitem__("tied", ["hidden.0.weight", "hidden.1.weight"]), "key 'tied' is [\"hidden.0.weight\""),
    (lambda m: m["stages"][0]["cost"].__setitem__("fwd_time", "fast"), "stage 0: cost 'fwd_time' is \"fast\""),
    (lambda m: m["stages"][0]["cost"].__setitem__("bwd_time", float("inf")), "stage 0: cost 'bwd_time' is Infinity"),
]


@pytest.mark.parametrize("edit, message", MANIFEST_EDITS, ids=range(len(MANIFEST_EDITS)))
def test_a_hand_edited_manifest_is_refused_by_every_command_with_the_key_named(edit, message, tmp_path, capsys):
    import shutil

    folder = tmp_path / "mlp"
    shutil.copytree(ROOT / "generated" / "mlp", folder)
    manifest = json.loads((folder / "pipeline.json").read_text())
    assert "x_3" in manifest["stages"][1]["outputs"]  # the edits above assume the committed split
    edit(manifest)
    (folder / "pipeline.json").write_text(json.dumps(manifest))
    for command in (["check", folder], ["explain", folder]):
        code, _, err = run_cli(command, capsys)
        assert code == 2 and message in err and "internal error" not in err, err


@pytest.mark.parametrize("edit", ["reorder outputs", "reorder keys"])
def test_reordered_model_outputs_are_named_as_the_hand_edit_they_are(edit, tmp_path, capsys):
    """Reordered outputs were blamed on ir.json; reordered dict keys passed the check, and the
    loss then read other tensors than the model's."""
    import shutil

    folder = tmp_path / "two_tower"
    shutil.copytree(ROOT / "generated" / "two_tower", folder)
    manifest = json.loads((folder / "pipeline.json").read_text())
    if edit == "reorder outputs":
        manifest["outputs"] = manifest["outputs"][::-1]
    else:
        manifest["output_structure"]["keys"] = manifest["output_structure"]["keys"][::-1]
    (folder / "pipeline.json").write_text(json.dumps(manifest))
    code, out, _ = run_cli(["check", folder, "--model", EXAMPLES / "two_tower.py", "--batch-size", 4], capsys)
    assert code == 1 and "check FAILED" in out and "ir.json itself" not in out
    assert "are not the model's: ir.json has ['score', 'query_embedding', 'item_embedding']" in out


def test_a_stage_class_that_is_no_module_class_is_named(tmp_path, capsys):
    import shutil

    folder = tmp_path / "mlp"
    shutil.copytree(ROOT / "generated" / "mlp", folder)
    manifest = json.loads((folder / "pipeline.json").read_text())
    manifest["stages"][1]["class"] = "F"  # the stage file's `import torch.nn.functional as F`
    (folder / "pipeline.json").write_text(json.dumps(manifest))
    result = run_cli(["check", folder, "--model", EXAMPLES / "mlp.py"], capsys)
    assert_user_error(result, "stage1.py: F is a module, not a torch.nn.Module class")


def test_an_output_folder_that_cannot_be_made_is_named_before_compiling(tmp_path, capsys):
    model = write(tmp_path, "model.py", GOOD)
    (tmp_path / "afile").write_text("")
    result = run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "afile" / "sub"], capsys)
    assert_user_error(result, "cannot be made", "afile is a file")


def test_output_cut_short_by_the_reader_is_no_error(tmp_path):
    """`ftc explain ... | head`: once head has its lines the pipe closes; that is no error."""
    script = (
        "import ftc.cli as cli\n"
        "cli.run_explain = lambda args: [print('row ' * 20) for _ in range(100_000)] and 0\n"
        "raise SystemExit(cli.main(['explain', 'folder']))\n"
    )
    (tmp_path / "long.py").write_text(script)
    result = subprocess.run(f"{sys.executable} long.py | head -1", shell=True, capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.startswith("row") and "Error" not in result.stderr and "error" not in result.stderr, result.stderr


def test_check_fails_a_stage_whose_output_the_runtime_could_not_send(tmp_path, capsys):
    """A hand edit that changes a sent value's dtype computes the same numbers, but the runtime
    refuses to send it: check says so rather than passing."""
    import shutil

    folder = tmp_path / "mlp"
    shutil.copytree(ROOT / "generated" / "mlp", folder)
    stage = folder / "stage1.py"
    assert "return (x_3,)" in stage.read_text()
    stage.write_text(stage.read_text().replace("return (x_3,)", "return (x_3.double(),)"))
    code, out, err = run_cli(["check", folder, "--model", EXAMPLES / "mlp.py"], capsys)
    assert code == 1 and "value x_3 is float64[8, 128], but pipeline.json says float32[8, 128]" in out, (out, err)


def test_explain_refuses_micro_batch_counts_the_runtime_cannot_split(capsys):
    code, _, err = run_cli(["explain", ROOT / "generated" / "gpt", "--micro-batches", "3"], capsys)
    assert code == 2 and "--micro-batches 3 does not split the batch of 8" in err, err


def test_stage_files_without_a_manifest_are_not_overwritten_without_force(tmp_path, capsys):
    model = write(tmp_path, "good.py", GOOD)
    (tmp_path / "gen" / "good").mkdir(parents=True)
    (tmp_path / "gen" / "good" / "stage0.py").write_text("print('my own code')\n")
    result = run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "gen"], capsys)
    assert_user_error(result, "holds stage files but no pipeline.json")
    assert run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "gen", "--force"], capsys)[0] == 0


def test_a_recompile_never_overwrites_files_ftc_did_not_write_or_an_edited_package_file(tmp_path, capsys):
    """A recompile with more stages overwrote the user's own stage2.py beside a 2-stage pipeline,
    and every recompile replaced a hand-edited __init__.py (or ir.json), without a word."""
    model = write(tmp_path, "good.py", GOOD)
    compile_args = ["compile", model, "--stages", 2, "-o", tmp_path / "gen"]
    folder = tmp_path / "gen" / "good"
    assert run_cli(compile_args, capsys)[0] == 0
    (folder / "notes.md").write_text("my notes\n")
    (folder / "stage2.py").write_text("print('my own experiment')\n")
    more = ["compile", model, "--stages", 3, "-o", tmp_path / "gen"]
    assert_user_error(run_cli(more, capsys), f"{folder}: stage2.py was not written by ftc", "--force")
    assert (folder / "stage2.py").read_text() == "print('my own experiment')\n"
    (folder / "stage2.py").unlink()
    assert run_cli(more, capsys)[0] == 0
    assert (folder / "notes.md").read_text() == "my notes\n"  # a file ftc never writes is left alone

    for name in ("__init__.py", "ir.json"):
        original = (folder / name).read_text()
        (folder / name).write_text(original.replace("\n", "\n\n", 1))
        assert_user_error(run_cli(more, capsys), "edited by hand", f"ftc wrote them: {name}\n", "--force")
        assert run_cli([*more, "--force"], capsys)[0] == 0
        assert (folder / name).read_text() == original


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt, as in a process started from a terminal: a pytest-xdist
    worker ignores it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_interrupted_compile_leaves_the_folder_whole(tmp_path, capsys, monkeypatch, ctrl_c_raises):
    """Ctrl-C while a compile wrote its files left new stage files beside the old pipeline.json:
    a folder that looked complete, trained the wrong code and read as hand-edited."""
    from pathlib import Path

    from ftc.backend import writer

    model = write(tmp_path, "good.py", GOOD)
    folder = tmp_path / "gen" / "good"
    assert run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "gen"], capsys)[0] == 0
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    three = ["compile", model, "--stages", 3, "-o", tmp_path / "gen"]

    # Interrupted while the files are written: nothing of the new compile is left.
    real_write = Path.write_text
    written = []

    def interrupted_write(path, text, *args, **kwargs):
        written.append(path.name)
        if len(written) == 2:
            raise KeyboardInterrupt
        return real_write(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", interrupted_write)
    code, _, err = run_cli(three, capsys)
    assert code == 130 and "ftc compile: interrupted" in err
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    monkeypatch.undo()

    # Interrupted while they are put in place: the signal waits until the folder is whole.
    real_replace = writer.os.replace

    def interrupted_replace(source, target):
        signal.raise_signal(signal.SIGINT)
        return real_replace(source, target)

    monkeypatch.setattr(writer.os, "replace", interrupted_replace)
    code, _, err = run_cli(three, capsys)
    assert code == 130 and "ftc compile: interrupted" in err
    monkeypatch.undo()
    assert sorted(path.name for path in folder.iterdir()) == ["__init__.py", "ir.json", "pipeline.json", "stage0.py", "stage1.py", "stage2.py"]
    assert len(json.loads((folder / "pipeline.json").read_text())["stages"]) == 3
    assert run_cli(three, capsys)[0] == 0  # every file is the one the manifest records


def test_an_interrupted_local_run_names_the_checkpoint_to_resume_from(tmp_path, capsys, monkeypatch):
    """Ctrl-C in mode local said only "interrupted", where mode dist names the checkpoints and
    how to resume."""
    import ftc.runtime.train

    config = tmp_path / "train.json"
    config.write_text(json.dumps({"pipeline": str(ROOT / "generated" / "mlp"), "mode": "local", "steps": 2,
                                  "batch_size": 8, "data": {"name": "digits"}, "checkpoint": {"dir": "checkpoints"}}))  # fmt: skip
    assert run_cli(["train", config], capsys)[0] == 0

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(ftc.runtime.train, "train", interrupted)
    code, _, err = run_cli(["train", config, "--set", "steps=4"], capsys)
    assert code == 130
    assert err == (f"ftc train: interrupted; the latest complete checkpoint is {tmp_path / 'checkpoints' / 'step-00000002'}: "
                   "resume with --set checkpoint.resume=true\n")  # fmt: skip
    code, _, err = run_cli(["train", config, "--set", f"checkpoint.dir={tmp_path / 'elsewhere'}"], capsys)
    assert code == 130 and f"no checkpoint was complete in {tmp_path / 'elsewhere'} yet" in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc, where no file can be made")
def test_an_output_the_file_system_refuses_is_a_user_error_named_before_compiling(tmp_path, capsys, monkeypatch):
    """-o in a folder nobody can write to failed with "internal error: FileNotFoundError" after the
    whole compile; explain --plot and merge-checkpoint -o there did too."""
    import ftc.compiler

    traced = []
    monkeypatch.setattr(ftc.compiler, "_traced", lambda *args: traced.append(args))
    model = write(tmp_path, "good.py", GOOD)
    result = run_cli(["compile", model, "--stages", 2, "-o", "/proc/gen"], capsys)
    assert_user_error(result, "the output folder /proc/gen/good cannot be written: /proc:", "pass another -o")
    assert traced == []  # refused before tracing
    result = run_cli(["explain", ROOT / "generated" / "mlp", "--plot", "/proc/loads.png"], capsys)
    assert_user_error(result, "--plot /proc/loads.png cannot be written", "name a .png file in a folder you can write")
    assert "internal error" not in result[2]


def test_a_rate_given_in_another_unit_is_warned_about(tmp_path, capsys):
    """--bandwidth 1e9 (meant as bytes/s) compiled silently as 1e9 GB/s: communication free."""
    model = write(tmp_path, "good.py", GOOD)
    code, _, err = run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "gen", "--bandwidth", "1e9"], capsys)
    assert code == 0
    assert "warning: --bandwidth 1e+09 means 1e+09 GB/s, more than any device or link has: --bandwidth is in GB/s" in err
    code, _, err = run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "gen", "--bandwidth", "900"], capsys)
    assert code == 0 and "warning" not in err


def test_ctrl_c_while_ftc_starts_is_an_interruption_not_a_traceback(capsys, monkeypatch):
    import ftc.cli

    def interrupted(command):
        raise KeyboardInterrupt

    monkeypatch.setattr(ftc.cli, "_parser", interrupted)
    code, out, err = run_cli(["compile", "model.py", "--stages", 2, "-o", "gen"], capsys)
    assert code == 130 and err == "ftc compile: interrupted\n" and "Traceback" not in out


def test_a_model_file_in_a_package_imports_its_siblings_relatively(tmp_path, capsys):
    """`from .blocks import Block` in a model file inside a package failed with "No module named
    'ftc_model_file'", and the fix it gave (`python model.py`) fails on relative imports too."""
    from ftc.runtime.config import load_config
    from ftc.runtime.train import train

    package = tmp_path / "my project" / "netpkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    write(package, "blocks.py", """
        import torch.nn as nn

        def block(width):
            return nn.Sequential(nn.Linear(width, width), nn.ReLU())
    """)
    model = write(package, "net.py", """
        import torch
        import torch.nn as nn

        from .blocks import block

        def build_model(width=8):
            from . import blocks  # a relative import while building, after the model file's import
            return nn.Sequential(nn.Linear(4, width), *[blocks.block(width) for _ in range(3)], nn.Linear(width, 2))

        def example_inputs(batch_size):
            return (torch.randn(batch_size, 4),)
    """)
    assert run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "gen"], capsys)[0] == 0
    assert run_cli(["check", tmp_path / "gen" / "net"], capsys)[0] == 0
    results = train(load_config(data={"pipeline": str(tmp_path / "gen" / "net"), "mode": "local", "steps": 2,
                                      "batch_size": 4, "micro_batches": 2, "loss": "mse_loss"}))  # fmt: skip
    assert len(results.loss) == 2

    write(package, "broken.py", "from .missing import nothing\n")
    assert_user_error(run_cli(["compile", package / "broken.py", "--stages", 2, "-o", tmp_path / "gen"], capsys),
                      "importing the model file raised ModuleNotFoundError", "run `python -m netpkg.broken`")  # fmt: skip


def test_a_manifest_a_hand_edit_left_unreadable_is_not_overwritten_without_force(tmp_path, capsys):
    model = write(tmp_path, "good.py", GOOD)
    compile_args = ["compile", model, "--stages", 2, "-o", tmp_path / "gen"]
    assert run_cli(compile_args, capsys)[0] == 0
    manifest = tmp_path / "gen" / "good" / "pipeline.json"
    manifest.write_text(manifest.read_text().replace('"device": 1', '"device": 0,', 1))  # a stray comma: no longer JSON
    assert_user_error(run_cli(compile_args, capsys), "good/pipeline.json is not a manifest ftc wrote", "--force")
    assert '"device": 0,' in manifest.read_text()
    assert run_cli([*compile_args, "--force"], capsys)[0] == 0
    assert json.loads(manifest.read_text())["stages"][1]["device"] == 1


def test_a_trace_that_fails_inside_a_library_names_the_library_line(tmp_path, capsys):
    """The model file's own lines are fine; a library it imports branches on a tensor's value.
    The error names that library's line for each tracer, as Hugging Face models' LayerDrop."""
    write(tmp_path, "layers.py", "import torch\n\n\ndef maybe_skip(x):\n    if x.sum() > 0:\n"
                                 "        return x\n    return x * 2\n")  # fmt: skip
    model = write(tmp_path, "skipping.py", "import sys\nimport torch\n\nsys.path.insert(0, __file__.rsplit('/', 1)[0])\n"
                  "from layers import maybe_skip\n\n\nclass Net(torch.nn.Module):\n    def __init__(self):\n"
                  "        super().__init__()\n        self.a = torch.nn.Linear(4, 4)\n\n    def forward(self, x):\n"
                  "        return maybe_skip(self.a(x))\n\n\ndef build_model():\n    return Net()\n\n\n"
                  "def example_inputs(batch_size):\n    return (torch.randn(batch_size, 4),)\n")  # fmt: skip
    refused = run_cli(["compile", model, "--stages", 1, "-o", tmp_path / "out"], capsys)
    assert_user_error(refused, "neither torch.fx nor torch.export could trace the model", "layers.py:5: if x.sum() > 0:")


def test_leaf_modules_that_only_fx_keeps_whole_are_named_when_fx_fails_elsewhere(tmp_path, capsys):
    """fx fails on a shape branch outside the leaf, export on the leaf's value-dependent loop
    (transformers' DbrxExperts iterating `expert_hit`): the hint said to list the class in
    LEAF_MODULES, where it already was."""
    model = write(tmp_path, "leafy.py", "import torch\n\n\nclass Experts(torch.nn.Module):\n"
                  "    def forward(self, x):\n        for row in (x > 0).nonzero():\n            x = x + row[0]\n"
                  "        return x\n\n\nLEAF_MODULES = (Experts,)\n\n\nclass Net(torch.nn.Module):\n"
                  "    def __init__(self):\n        super().__init__()\n        self.experts = Experts()\n\n"
                  "    def forward(self, x):\n        if x.shape[1] > 2:\n            x = x * 2\n"
                  "        return self.experts(x)\n\n\ndef build_model():\n    return Net()\n\n\n"
                  "def example_inputs(batch_size):\n    return (torch.randn(batch_size, 4),)\n")  # fmt: skip
    refused = run_cli(["compile", model, "--stages", 1, "-o", tmp_path / "out"], capsys)
    assert_user_error(refused, "neither torch.fx nor torch.export could trace the model",
                      "Experts's loop over a tensor", "only torch.fx keeps LEAF_MODULES (Experts) whole")  # fmt: skip
    assert "or list the class that contains that code in LEAF_MODULES" not in refused[2]


def test_a_random_layer_skip_only_in_training_is_named_with_the_config_fix(tmp_path, capsys):
    """transformers' speech models default to layerdrop=0.1: in training mode forward branches in
    Python on torch.rand, which no tracer can hold; in eval mode the same model traces. The error
    said to make forward's Python independent of values, which a library user cannot do."""
    model = write(
        tmp_path,
        "layerdrop.py",
        """
        import torch
        import torch.nn as nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

            def forward(self, x):
                for layer in self.layers:
                    if self.training and torch.rand([]) < 0.1:
                        continue
                    x = layer(x)
                return x

        def build_model():
            return Net()

        def example_inputs(batch_size):
            return (torch.randn(batch_size, 8),)
        """,
    )
    result = run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "gen"], capsys)
    assert_user_error(result, "torch.export could not trace the model in training mode",
                      "layerdrop.py:12", "but it can in eval mode", "layerdrop=0.0")  # fmt: skip
    model.write_text(model.read_text().replace("0.1", "0.0").replace("self.training and torch.rand([]) < 0.0", "False"))
    assert run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "gen"], capsys)[0] == 0


def test_a_training_only_check_of_values_is_not_blamed_on_a_layer_skip(tmp_path, capsys):
    """A training-only branch on values that draws nothing (I-BERT's QuantAct logs when its
    running range is near 0) was told to set layerdrop=0.0, which the model does not have."""
    model = write(
        tmp_path,
        "logged.py",
        """
        import torch
        import torch.nn as nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.layer = nn.Linear(8, 8)

            def forward(self, x):
                h = self.layer(x)
                if self.training and h.abs().max() < 1e-5:
                    print("all near 0")
                return h

        def build_model():
            return Net()

        def example_inputs(batch_size):
            return (torch.randn(batch_size, 8),)
        """,
    )
    result = run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "gen"], capsys)
    assert_user_error(result, "torch.export could not trace the model in training mode", "logged.py:12",
                      "a check or a log of values", "write the branch with torch ops")  # fmt: skip
    assert "layerdrop" not in result[2]


def test_a_torch_draw_fx_cannot_trace_goes_to_export_instead_of_being_fixed(tmp_path, capsys):
    """torch.randn(8) takes no traced value: fx ran it once while tracing and the stage code added
    the same noise at every step, where the model draws anew."""
    model = write(tmp_path, "noisy.py", GOOD.replace(
        "return nn.Sequential(", "return Noisy()\n\n\nclass Noisy(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.a = nn.Linear(8, 8)\n\n    def forward(self, x):\n"
        "        return self.a(x) + torch.randn(8)\n\n\ndef unused():\n    return nn.Sequential(",
    ))  # fmt: skip
    refused = run_cli(["compile", model, "--stages", 1, "-o", tmp_path / "fx", "--frontend", "fx"], capsys)
    assert_user_error(refused, "DrawnWhileTracing: randn at noisy.py:15 draws with no traced argument",
                      "compile with --frontend export or auto")  # fmt: skip
    assert run_cli(["compile", model, "--stages", 1, "-o", tmp_path / "auto"], capsys)[0] == 0
    folder = tmp_path / "auto" / "noisy"
    assert json.loads((folder / "ir.json").read_text())["frontend"] == "export"
    assert "torch.randn(" in (folder / "stage0.py").read_text()


def test_compile_plans_memory_for_micro_batches_the_runtime_can_run(tmp_path, capsys):
    """A micro-batch count that does not divide the batch is refused, as explain and train do;
    by default the plan takes the smallest divisor of the batch from the device count up (mpipe:
    devices, not stages), and the manifest records it."""
    mlp = EXAMPLES / "mlp.py"
    refused = run_cli(["compile", mlp, "--stages", 4, "--micro-batches", 16, "-o", tmp_path / "a"], capsys)
    assert_user_error(refused, "--micro-batches 16 does not split --batch-size 8 into equal micro-batches",
                      "use one of 1, 2, 4, 8")  # fmt: skip
    for args, planned in ((["--stages", 3, "--batch-size", 5], 5), (["--stages", 3], 4),
                          (["--stages", 4, "--method", "mpipe", "--bandwidth", 1000], 4)):  # fmt: skip
        folder = tmp_path / f"plan{planned}{len(args)}"
        assert run_cli(["compile", mlp, *args, "-o", folder], capsys)[0] == 0
        assert json.loads((folder / "mlp" / "pipeline.json").read_text())["settings"]["micro_batches"] == planned


def test_compile_option_combinations_that_mean_nothing_or_break_the_package_are_refused(tmp_path, capsys):
    mlp = EXAMPLES / "mlp.py"
    # A module's name is an identifier: the fix for it is another name, not how to spell one.
    for name, why, fix in (("torch", "is the name of a module the stage code or Python imports", "another --name"),
                           ("os", "is the name of a module the stage code or Python imports", "another --name"),
                           ("class", "is not a Python identifier a package can have", "letters, digits and _")):  # fmt: skip
        result = run_cli(["compile", mlp, "--stages", 2, "-o", tmp_path, "--name", name], capsys)
        assert_user_error(result, f"--name {name!r} {why}", f"fix: {'pass' if fix == 'another --name' else 'use'} {fix}")
    threads = run_cli(["compile", mlp, "--stages", 2, "-o", tmp_path, "--threads", 2], capsys)
    assert_user_error(threads, "--threads applies to measured profiles and --refine")
    # --device cuda plans the memory of training there (Adam's foreach step) without a GPU
    memory = {}
    for device in ("cpu", "cuda"):
        assert run_cli(["compile", mlp, "--stages", 2, "-o", tmp_path / device, "--device", device], capsys)[0] == 0
        stages = json.loads((tmp_path / device / "mlp" / "pipeline.json").read_text())["stages"]
        memory[device] = [s["cost"]["memory"] for s in stages]
    for cpu, cuda in zip(memory["cpu"], memory["cuda"]):
        assert cuda["temporaries"] == cuda["gradients"]  # foreach Adam: one copy of the stage's weights
        assert cpu["temporaries"] != cuda["temporaries"]  # per tensor on the CPU: two copies of the largest


def test_an_ema_teacher_updated_in_forward_is_refused_by_fx_and_trains_through_export(tmp_path, capsys):
    """`pt.mul_(0.9).add_(ps, alpha=0.1)` over `self.teacher.parameters()` in forward: fx sees real
    tensors there, so the update ran once while tracing and the stages trained without it (losses
    parted from the plain model's at step 2, ftc check passed). fx refuses it by name; auto takes
    export, and local mode trains as mode single does."""
    from ftc.runtime.config import load_config
    from ftc.runtime.train import train

    model = MODELS / "ema_teacher.py"
    refused = run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "fx", "--frontend", "fx"], capsys)
    assert_user_error(refused, "torch.fx could not trace the model", "forward writes teacher.0.weight and 3 more in place",
                      "fix: compile with --frontend export or auto")  # fmt: skip
    code, out, _ = run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "auto"], capsys)
    assert code == 0 and "as torch.fx could not: StateWrittenUntraced" in out
    folder = tmp_path / "auto" / "ema_teacher"
    losses = {}
    for mode in ("single", "local"):
        cfg = load_config(data={
            "pipeline": str(folder), "data": {"name": "synthetic", "size": 16}, "batch_size": 8,
            "micro_batches": 2, "steps": 3, "seed": 1, "mode": mode, "optimizer": {"name": "adamw", "lr": 0.05},
        })  # fmt: skip
        losses[mode] = train(cfg).loss
    assert losses["local"] == pytest.approx(losses["single"], rel=1e-6)


REGULARIZED = """
import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        l2 = sum(p.pow(2).sum() for name, p in self.named_parameters() if name.endswith("weight"))
        return self.b(F.relu(self.a(x))), l2


def build_model():
    return Net()


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)
"""


def test_a_term_computed_from_named_parameters_compiles_through_export(tmp_path, capsys):
    """An L2 term over `self.named_parameters()` returned beside the logits: fx sees real (meta)
    tensors there and made the sum a constant it could not write ("a tensor constant is only
    known on the meta device ... register it as a buffer", the wrong fix, and auto stopped
    there). fx now says what it is, and auto compiles it through export."""
    model = write(tmp_path, "regularized.py", REGULARIZED)
    refused = run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "fx", "--frontend", "fx"], capsys)
    assert_user_error(refused, "fx would fix as a constant a tensor made from parameters() or buffers()",
                      "fix: compile with --frontend export or auto")  # fmt: skip
    code, out, _ = run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "auto"], capsys)
    assert code == 0 and "as torch.fx could not: StateUntraced" in out
    assert check_pipeline(tmp_path / "auto" / "regularized").ok


BRANCHING = """
import torch
import torch.nn as nn

class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[0] > 1:
            x = x * 2
        return self.fc(x)

def build_model():
    return Branching()

def example_inputs(batch_size):
    return (torch.randn(batch_size, 4),)
"""


def test_the_fallback_note_in_ir_json_does_not_depend_on_how_the_model_file_was_named(tmp_path, capsys, monkeypatch):
    """The note on why fx failed named the model file as the command line gave it, so the same
    compile wrote other ir.json bytes from another directory or with an absolute path."""
    model = write(tmp_path, "branching.py", BRANCHING)
    assert run_cli(["compile", model.resolve(), "--stages", 1, "-o", tmp_path / "a"], capsys)[0] == 0
    monkeypatch.chdir(tmp_path)
    assert run_cli(["compile", "branching.py", "--stages", 1, "-o", "b"], capsys)[0] == 0
    first, second = ((tmp_path / out / "branching" / "ir.json").read_bytes() for out in ("a", "b"))
    assert first == second
    assert "as torch.fx could not: TraceError" in first.decode() and "(at branching.py:11:" in first.decode()


FLEX_ATTENTION = """
import torch
import torch.nn as nn
from torch.nn.attention.flex_attention import flex_attention


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], 8, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return flex_attention(q, k, v).transpose(1, 2).reshape(x.shape[0], 8, 16)


LEAF_MODULES = ()


def build_model():
    return nn.Sequential(nn.Linear(4, 16), Attention(), nn.Linear(16, 2))


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8, 4),)
"""


@pytest.mark.parametrize("frontend, leaves", [("auto", "()"), ("fx", "()"), ("auto", "(Attention,)")])
def test_flex_attention_is_named_with_a_fix_that_works(frontend, leaves, tmp_path, capsys):
    """torch's flex_attention runs neither on the meta device nor with gradients on the CPU: the
    errors said to make Python independent of values or to list the class in LEAF_MODULES (with
    it listed, to make the module accept stand-in inputs), none of which helps. The error names the
    call and scaled_dot_product_attention, which then compiles to stages that compute the model's
    numbers."""
    text = FLEX_ATTENTION.replace("LEAF_MODULES = ()", f"LEAF_MODULES = {leaves}")
    model = write(tmp_path, "flex.py", text)
    refused = run_cli(["compile", model, "--stages", 2, "--frontend", frontend, "-o", tmp_path / "out"], capsys)
    assert_user_error(refused, "forward calls torch's flex_attention at", "flex.py:14: return flex_attention(q, k, v)",
                      "F.scaled_dot_product_attention", 'attn_implementation="sdpa"')  # fmt: skip
    assert "torch.where" not in refused[2] and "stand-in inputs" not in refused[2]
    fixed = write(tmp_path, "sdpa.py", text.replace("from torch.nn.attention.flex_attention import flex_attention",
                  "from torch.nn.functional import scaled_dot_product_attention as flex_attention"))  # fmt: skip
    code, _, err = run_cli(["compile", fixed, "--stages", 2, "--frontend", frontend, "-o", tmp_path / "out"], capsys)
    assert code == 0, err
    assert check_pipeline(tmp_path / "out" / "sdpa", batch_size=3).ok


def test_train_and_merge_checkpoint_do_not_import_the_compiler(tmp_path):
    """`ftc train` built compile's arguments too, whose choices import ftc.frontends and with it
    torch.export and dynamo: seconds before every training run (and every torchrun launch)."""
    probe = textwrap.dedent(f"""
        import sys
        from ftc.cli import main
        codes = [main(["train", {str(tmp_path / "missing.json")!r}]), main(["merge-checkpoint", {str(tmp_path)!r}])]
        compiler = sorted(m for m in sys.modules if m.split(".")[:2] in (["ftc", "frontends"], ["ftc", "compiler"], ["torch", "_dynamo"]))
        print(codes, compiler)
    """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip() == "[2, 2] []", done.stdout + done.stderr
    assert "missing.json" in done.stderr


def test_more_mpipe_blocks_than_the_graph_has_cuts_says_how_many_it_packed(tmp_path, capsys):
    """--blocks past the places the graph can be cut at packed that many blocks without a word
    (mlp: 11 ops, so --blocks 100 is --blocks 11)."""
    mlp = EXAMPLES / "mlp.py"
    outputs = {}
    for blocks in (11, 100):
        code, out, err = run_cli(["compile", mlp, "--stages", 2, "--method", "mpipe", "--blocks", blocks,
                                  "-o", tmp_path / str(blocks)], capsys)  # fmt: skip
        assert code == 0, err
        outputs[blocks] = out
        stages = sorted((tmp_path / str(blocks) / "mlp").glob("stage*.py"))
        assert stages
    assert "note: --blocks 100 is more than the 11 runs of ops 'mlp' can be cut into: mpipe packed 11 blocks" in outputs[100]
    assert "note: --blocks" not in outputs[11]
    for stage in (tmp_path / "11" / "mlp").glob("stage*.py"):
        assert (tmp_path / "100" / "mlp" / stage.name).read_text() == stage.read_text()


LANGUAGE_MODEL = """
import torch
import torch.nn as nn
import torch.nn.functional as F

def build_model():
    blocks = [nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(4)]
    return nn.Sequential(nn.Embedding(2000, 16), *blocks, nn.Linear(16, 2000))

def example_inputs(batch_size):
    return (torch.randint(0, 2000, (batch_size, 16)),)

def loss_fn(output, target):
    return F.cross_entropy(output.flatten(0, 1), target.flatten())
"""


def test_an_infeasible_limit_names_flags_that_fit(tmp_path, capsys):
    """3 stages of a language model do not fit 2 MB at the 4 micro-batches planned for them; the
    error names what does, each compiled to prove it: --micro-batches 8, and --stages 5, whose
    compile plans 8 micro-batches (the hint priced other stage counts at 4 and said "try
    --stages 7 or more (up to 6 do not fit)"); 4 stages, not named, do not fit."""
    model, out = write(tmp_path, "lm.py", LANGUAGE_MODEL), tmp_path / "gen"
    limit = ["--memory-limit", "2MB", "-o", out, "--force"]
    code, _, err = run_cli(["compile", model, "--stages", 3, *limit], capsys)
    assert_user_error((code, "", err), "no split of lm into 3 stages fits 2.0 MB per device")
    assert "use --micro-batches 8, which fits" in err and "use --stages 5, which fits" in err
    for flags in (["--stages", 3, "--micro-batches", 8], ["--stages", 5]):
        code, _, err = run_cli(["compile", model, *flags, *limit], capsys)
        assert code == 0, err
        manifest = json.loads((out / "lm" / "pipeline.json").read_text())
        assert max(manifest["predicted"]["device_memory"]) <= 2 * 10**6
    assert run_cli(["compile", model, "--stages", 4, *limit], capsys)[0] == 2


def test_check_of_a_model_without_trainable_parameters_says_what_to_do(tmp_path, capsys):
    """A forward with no parameters compiles; ftc check then has no gradients to compare and
    says why and what to do, where it named no fix."""
    model = write(tmp_path, "scale.py", """
        import torch

        class Scale(torch.nn.Module):
            def forward(self, x):
                return x * 2 + 1

        def build_model():
            return Scale()

        def example_inputs(batch_size):
            return (torch.randn(batch_size, 4),)
        """)
    assert run_cli(["compile", model, "--stages", 2, "-o", tmp_path / "gen"], capsys)[0] == 0
    result = run_cli(["check", tmp_path / "gen" / "scale"], capsys)
    assert_user_error(result, "no trainable parameter reaches them", "fix: give forward a parameter that requires grad")
