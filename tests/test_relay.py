"""Mode dist: the ranks' warnings reach the launcher's stderr once each, and every other line
they write, marked with its rank (runtime/relay.py).

The relay is checked on rank files written by hand (what is a warning, what is noise, which
ranks are named, a terminal's progress line), and end to end: `ftc train` in mode dist on a
model file that warns in build_model (every rank), in loss_fn (the last rank only), with a
memory plan the config departs from (rank 0's ftc warning); on hand-edited stages that print,
print to stderr and log; and a model file without warnings, whose run prints nothing on stderr
(torchrun's own output stays in its log, deleted on success).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest

from ftc.compiler import CompileOptions, compile_model
from ftc.runtime.relay import OutputRelay, stderr_path, stdout_path

RANK0 = """[W1205 18:00:00.000000000 socket.cpp:755] [c10d] The client socket has failed to connect.
ftc train: warning: the run departs from its memory plan
  fix: recompile
/m.py:9: UserWarning: built by hand
  second line
Traceback (most recent call last):
  File "x.py", line 1
"""
RANK1 = """/m.py:9: UserWarning: built by hand
  second line
/m.py:22: FutureWarning: only here
ftc train: warning: model.py: building the whole model on the CPU to keep stages 1
"""


def test_each_warning_is_printed_once_naming_the_ranks_when_not_all_gave_it(tmp_path):
    """Other lines are printed marked with their rank (a traceback too), but torch's C++ log."""
    stderr_path(tmp_path, 0).write_text(RANK0)
    stderr_path(tmp_path, 1).write_text(RANK1)
    out = io.StringIO()
    OutputRelay(tmp_path, 2, err=out).poll(final=True)
    assert out.getvalue().splitlines() == [
        "rank 0: Traceback (most recent call last):", 'rank 0:   File "x.py", line 1',
        "ftc train: warning: the run departs from its memory plan", "  fix: recompile",
        "/m.py:9: UserWarning: built by hand", "  second line",
        "ftc train: rank 1: /m.py:22: FutureWarning: only here",
        "ftc train: rank 1: warning: model.py: building the whole model on the CPU to keep stages 1",
    ]  # fmt: skip


def test_a_warning_is_marked_when_a_rank_has_not_said_it_or_has_not_started(tmp_path):
    stderr_path(tmp_path, 0).write_text("/m.py:9: UserWarning: early\n")
    out = io.StringIO()
    OutputRelay(tmp_path, 2, err=out).poll(final=True)
    assert out.getvalue() == "ftc train: rank 0: /m.py:9: UserWarning: early\n"


def test_a_warning_waits_for_its_indented_lines_and_is_printed_once(tmp_path):
    path = stderr_path(tmp_path, 0)
    path.write_text("ftc train: warning: first line\n")
    out = io.StringIO()
    relay = OutputRelay(tmp_path, 1, err=out, poll_s=0)
    relay.poll(final=False)  # the file grew: the warning may still be getting its lines
    assert out.getvalue() == ""
    with open(path, "a") as file:
        file.write("  its second line\nftc train: warning: first line\n  its second line\nnoise\n")
    relay.poll(final=False)
    relay.poll(final=True)
    assert out.getvalue() == "ftc train: warning: first line\n  its second line\nrank 0: noise\n"


WARNING_MODEL = """
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


def build_model():
    {BUILD}
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def example_inputs(batch_size):
    return (torch.randn(batch_size, 8),)


def example_targets(batch_size):
    return torch.randint(0, 4, (batch_size,))


def loss_fn(output, target):
    {LOSS}
    return F.cross_entropy(output, target)
"""


def ftc_train(root, name, pipeline, **settings):
    config = {"pipeline": str(pipeline), "data": {"name": "synthetic"}, "batch_size": 8, "micro_batches": 2, "steps": 3,
              "mode": "dist", "timeout_s": 30, "results": str(root / name / "results.json"), **settings}  # fmt: skip
    path = root / f"{name}.json"
    path.write_text(json.dumps(config))
    command = [sys.executable, "-m", "ftc.cli", "train", str(path)]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=environment)


@pytest.mark.filterwarnings("ignore:built by hand", "ignore:the loss ignores")  # compiling runs them here
def test_the_ranks_warnings_reach_the_launcher_once_and_a_clean_run_prints_nothing_on_stderr(tmp_path):
    warning = WARNING_MODEL.replace("{BUILD}", 'warnings.warn("built by hand\\nits second line")')
    warning = warning.replace("{LOSS}", 'warnings.warn("the loss ignores class weights", FutureWarning)')
    (tmp_path / "warns.py").write_text(warning)
    (tmp_path / "clean.py").write_text(WARNING_MODEL.replace("{BUILD}", "pass").replace("{LOSS}", "pass"))
    planned = CompileOptions(stages=2, memory_limit=100e6)
    warns = compile_model(tmp_path / "warns.py", tmp_path / "generated", planned).folder
    clean = compile_model(tmp_path / "clean.py", tmp_path / "generated", CompileOptions(stages=2)).folder

    done = ftc_train(tmp_path, "warns", warns, schedule="gpipe")
    assert done.returncode == 0, done.stderr
    assert "step 3/3" in done.stdout and "final loss" in done.stdout
    err = done.stderr
    assert err.count("was partitioned to fit 100.0 MB per device (--memory-limit)") == 1, err
    assert "ftc train: warning: " in err and "trains with schedule gpipe (planned: 1f1b" in err
    built = f"{tmp_path / 'warns.py'}:10: UserWarning: built by hand\n  its second line\n"
    assert err.count(built) == 1 and "rank 0: " + str(tmp_path / "warns.py") not in err, err
    in_loss = f"ftc train: rank 1: {tmp_path / 'warns.py'}:23: FutureWarning: the loss ignores class weights\n"
    assert err.count(in_loss) == 1, err

    done = ftc_train(tmp_path, "clean", clean)
    assert done.returncode == 0, done.stderr
    assert "final loss" in done.stdout and done.stderr == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_a_relayed_line_clears_the_progress_line_first(tmp_path):
    """Rank 0's progress line (written with \\r, no newline) stays under the cursor on a terminal:
    a line printed after it would run on from its end."""
    stdout_path(tmp_path, 1).write_text("from rank 1\n")
    out = _Terminal()
    OutputRelay(tmp_path, 2, out=out, err=io.StringIO()).poll(final=True)
    assert out.getvalue() == "\r\x1b[Krank 1: from rank 1\n"


def test_every_line_the_ranks_write_reaches_the_launcher_marked_with_its_rank(tmp_path):
    """A hand-edited stage's print (stdout), print to stderr and logging record: rank 0's prints
    pass through as in mode local, between its whole log lines; every other line comes marked
    with its rank, on the stream it was written to. Before, the stderr lines were lost with the
    rank's file when the run succeeded."""
    (tmp_path / "chatty.py").write_text(WARNING_MODEL.replace("{BUILD}", "pass").replace("{LOSS}", "pass"))
    folder = compile_model(tmp_path / "chatty.py", tmp_path / "generated", CompileOptions(stages=2)).folder
    for index in (0, 1):
        path = folder / f"stage{index}.py"
        source = path.read_text().replace("import torch\n", "import logging\nimport sys\n\nimport torch\n", 1)
        head, forward, body = source.partition("    def forward(self, ")
        signature, _, rest = body.partition("\n")
        said = (f'        print("stage{index} prints")\n        print("stage{index} to stderr", file=sys.stderr)\n'
                f'        logging.getLogger("user").warning("stage{index} logs")\n')  # fmt: skip
        path.write_text(head + forward + signature + "\n" + said + rest)

    done = ftc_train(tmp_path, "chatty", folder, log_every=1)
    assert done.returncode == 0, done.stderr
    calls = 3 * 2  # steps x micro-batches
    out, err = done.stdout.splitlines(), done.stderr.splitlines()
    assert out.count("stage0 prints") == calls and out.count("rank 1: stage1 prints") == calls, done.stdout
    # Rank 0's log lines stay whole among the others.
    steps = [line for line in out if line.startswith("step")]
    whole = r"step [123]/3  loss \S+  lr \S+  [-\d.]+ samples/s"
    assert len(steps) == 3 and all(re.fullmatch(whole, step) for step in steps), out
    for index in (0, 1):
        assert err.count(f"rank {index}: stage{index} to stderr") == calls, done.stderr
        assert err.count(f"rank {index}: stage{index} logs") == calls, done.stderr
    assert len(err) == 4 * calls, done.stderr  # nothing else: no torch noise, no ftc line
