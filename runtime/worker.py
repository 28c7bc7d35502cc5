"""Distributed training through torchrun: the launcher (`ftc train` in mode "dist") and the
per-rank entry point it starts.

    python -m torch.distributed.run --standalone --nproc-per-node N \\
        -m ftc.runtime.worker CONFIG.json [--set key=value ...]

One process per pipeline device. Each rank writes its stderr to FTC_STATUS_DIR/rank-<r>.stderr
(and every rank but 0 its stdout to rank-<r>.stdout), which the launcher prints as it comes: each
warning once, every other line marked with its rank (relay.py). A rank that fails prints one line
naming itself and the step, records it in FTC_STATUS_DIR/rank-<r>.json and exits non-zero;
torchrun then stops the other ranks (those waiting on the failed one also time out on their own
after timeout_s), and the launcher reports every rank's last state. For several machines, set
the config key "torchrun" to the rendezvous flags, e.g. ["--nnodes", "2", "--node-rank", "0",
"--rdzv-backend", "c10d", "--rdzv-endpoint", "host0:29500", "--nproc-per-node", "2"], and start
the same command on each machine (the checkpoint folder must then be on a shared file system).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from ftc.ir import FtcError

from .comm import PeerFailure
from .config import Config, load_config
from .faults import check_fault_rank
from .pipeline import load_pipeline
from .model_file import load_model_file
from .preflight import check_micro_batch_size, check_trainable
from .progress import Status, warn
from .rank import training_device
from .relay import OutputRelay, send_output
from .results import Results
from .train import resolve_loss, train


class Stopped(Exception):
    """Training stopped by a signal (Ctrl-C: SIGINT), which every rank stopped on. Not an error:
    the command line names the checkpoint to resume from and exits with 128 + the signal."""

    def __init__(self, signum: int, details: str = ""):
        name = signal.Signals(signum).name
        self.signum = signum
        self.message = ("interrupted" if signum == signal.SIGINT else f"stopped by {name}") + details
        super().__init__(self.message)


def backend(config: Config, local_ranks: int = 1) -> str:
    """The process group's backend for `local_ranks` ranks on this machine: NCCL on CUDA when
    each rank has a GPU of its own; ranks that share GPUs (training_device deals them out
    round-robin) need gloo, as NCCL refuses two ranks on one GPU."""
    gpus = torch.cuda.device_count() if config.device == "cuda" else 0
    if config.backend == "nccl" and local_ranks > gpus:
        raise FtcError(f"config {config.source}: key 'backend' is \"nccl\", but {local_ranks} ranks share this "
                       f"machine's {gpus} GPU(s), and NCCL takes one rank per GPU",
                       'set backend to "auto" or "gloo" (which lets ranks share a GPU), or run on as many GPUs as '
                       "ranks")  # fmt: skip
    if config.backend != "auto":
        return config.backend
    return "nccl" if config.device == "cuda" and local_ranks <= gpus else "gloo"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ftc.runtime.worker", description="one rank of `ftc train` (mode dist)"
    )
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--source", help="where the config came from, as messages name it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    status = Status(rank)
    # Ctrl-C reaches every process of the terminal's group, the ranks too: a rank stops on it at
    # once, as on the SIGTERM torchrun passes on, not with a KeyboardInterrupt's traceback from
    # wherever it was. Its files are written whole or not at all (checkpoint._atomic).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if status.path is not None:
        send_output(status.path.parent, rank)
    try:
        config = rank_config(args)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))  # this machine's ranks
        if config.device == "cuda":
            torch.cuda.set_device(training_device(config, rank))
        else:
            # The ranks of one machine share its cores; oversubscribing them slows every rank.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        torch.distributed.init_process_group(
            backend(config, local), rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=config.timeout_s)
        )
        train(config, rank, world_size, status)
        # No rank closes its connections while a peer may still be reading from them.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        return 0
    except Exception as exc:
        step = _last_step(status)
        where = f"rank {rank}" + (f" at step {step}" if step >= 0 else "")
        # With its fix (the launcher's report of this rank is all a user may see of the error),
        # but for a lost peer's, which the failing peer's own line explains.
        if isinstance(exc, FtcError):
            message = exc.message if isinstance(exc, PeerFailure) else str(exc)
        else:
            message = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, FtcError):
            traceback.print_exc()
        print(
            f"ftc train: {where}: error: {exc if isinstance(exc, FtcError) else message}", file=sys.stderr, flush=True
        )
        # torch's own errors of a collective whose peer is gone (outside our wrapped calls) count
        # as the peer's failure too.
        caused_by_peer = isinstance(exc, (PeerFailure, torch.distributed.DistError))
        status.write("failed", step, message, caused_by_peer)
        return 1


def rank_config(args: argparse.Namespace) -> Config:
    """The launcher's config, as this rank reads it from the run folder; named in messages as
    the launcher's (the user's file and --set), not as the run folder's copy."""
    config = load_config(args.config, [*args.set, "mode=dist"])
    return dataclasses.replace(config, source=args.source) if args.source else config


def _last_step(status: Status) -> int:
    if status.path is None or not status.path.is_file():
        return -1
    return json.loads(status.path.read_text())["step"]


def launch(config: Config) -> Results | None:
    """Run `config` (mode dist) as a torchrun job; return rank 0's results (None on a machine of
    several whose ranks do not include rank 0) or raise an FtcError naming the ranks that failed
    and their steps."""
    from .checkpoint import write_json

    pipeline = load_pipeline(config.pipeline)
    # What every rank would fail on alike is said once, before any process starts.
    model_file = load_model_file(pipeline.model_file_or(config.model))
    resolve_loss(config, model_file)
    check_trainable(pipeline, model_file)
    check_micro_batch_size(config, pipeline)
    if config.nprocs is not None and not config.torchrun and config.nprocs != pipeline.num_devices:
        raise FtcError(f"config key 'nprocs' is {config.nprocs}, but {pipeline.folder} places its stages on "
                       f"{pipeline.num_devices} devices", f"set nprocs={pipeline.num_devices} or leave it out")  # fmt: skip
    nprocs = config.nprocs or pipeline.num_devices
    if config.torchrun:
        nodes, per_node = _flag(config.torchrun, "nnodes"), _flag(config.torchrun, "nproc-per-node")
        if per_node is not None and per_node.isdigit():
            nprocs = int(per_node)  # this machine's processes
            if nodes is not None and nodes.isdigit() and int(nodes) * nprocs != pipeline.num_devices:
                raise FtcError(f"config key 'torchrun' starts {nodes} x {per_node} processes, but {pipeline.folder} "
                               f"places its stages on {pipeline.num_devices} devices",
                               f"make --nnodes times --nproc-per-node {pipeline.num_devices}")  # fmt: skip
    check_fault_rank(config, pipeline.num_devices)
    if config.device == "cuda":
        training_device(config, 0)  # torch sees a GPU
        backend(config, nprocs)  # NCCL, asked for, takes one rank per GPU: said once, not by every rank
    run_dir = Path(tempfile.mkdtemp(prefix="ftc-train-"))
    resolved = run_dir / "config.json"
    write_json(resolved, config.to_json())
    # Without a results path of the config's, rank 0 hands its results over in the run folder.
    results_path = Path(config.results) if config.results else run_dir / "results.json"
    launcher = config.torchrun or ["--standalone", "--nproc-per-node", str(nprocs)]
    command = [
        sys.executable, "-m", "torch.distributed.run", *launcher,
        "-m", "ftc.runtime.worker", str(resolved), "--set", f"results={results_path}", f"--source={config.source}",
    ]  # fmt: skip
    env = {**os.environ, "FTC_STATUS_DIR": str(run_dir), "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    log = run_dir / "torchrun.log"
    print(f"launching {nprocs} process{'es' if nprocs != 1 else ''}: torchrun {' '.join(launcher)}", flush=True)
    with open(log, "w") as log_file, OutputRelay(run_dir, nprocs):
        # torchrun's own report of a failure is long; its log keeps it, the summary below says
        # which rank failed and why.
        code, stopped_by = _run_torchrun(command, env, log_file)
    logs = f"each rank's stderr: {run_dir}/rank-<r>.stderr; torchrun's log: {log}"
    states = [_rank_state(run_dir, rank) for rank in range(pipeline.num_devices)]
    if stopped_by is not None:
        steps = sorted({state["step"] for state in states if state and state["step"] >= 0})
        where = f" at step {steps[-1]}" if steps else " before training"
        # What the ranks left is their status and stderr, which say only that they were stopped.
        shutil.rmtree(run_dir, ignore_errors=True)
        raise Stopped(stopped_by, f"{where} (the launcher passed {stopped_by.name} on to torchrun, which stopped "
                                  "every rank)")  # fmt: skip
    if code != 0:
        nodes = _flag(config.torchrun, "nnodes")
        report = _failure_report(states, code, log.read_text(), several_machines=nodes not in (None, "1", "1:1"))
        if not (results_path.is_file() and all(state and state["state"] == "done" for state in states)):
            raise FtcError(report, logs)
        # Training, its results and its checkpoints are complete: a process that then failed
        # to shut down cleanly is worth a warning, not the loss of the run.
        warn(f"every rank finished, but {report}\n  ({logs})")
    if states[0] is None:
        # Several machines: rank 0 runs on another one, which writes the results.
        if code == 0:
            shutil.rmtree(run_dir)
        return None
    data = json.loads(results_path.read_text())
    if code == 0:
        shutil.rmtree(run_dir)
    return Results.from_json(data, config.results)


def _run_torchrun(command: list[str], env: dict, log_file) -> tuple[int, signal.Signals | None]:
    """Run torchrun to its end; (its exit code, the signal that stopped the launcher, or None).
    A SIGINT, SIGTERM or SIGHUP to the launcher is passed on to torchrun as SIGTERM, on which it
    stops its workers; and torchrun gets SIGTERM when the launcher dies (even by SIGKILL), so no
    rank trains on unwatched."""
    process = subprocess.Popen(command, env=env, stderr=log_file, preexec_fn=_terminate_with_parent())
    stopped_by: list[signal.Signals] = []

    def forward(signum: int, _frame: Any) -> None:
        stopped_by.append(signal.Signals(signum))
        process.send_signal(signal.SIGTERM)

    caught = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, forward) for signum in caught}
    ended: set[int] = set()
    try:
        while True:
            try:
                code = process.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                _end_frozen_ranks(Path(env["FTC_STATUS_DIR"]), ended)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return code, (stopped_by[0] if stopped_by else None)


def _end_frozen_ranks(run_dir: Path, ended: set[int]) -> None:
    """Once a rank has failed, SIGKILL the ranks still at work that are stopped (SIGSTOP, a
    stalled machine). torchrun stops them with SIGTERM, which a stopped process holds pending
    until it runs again: torchrun waited 30 s for it before SIGKILL, holding the run that long
    past the others' timeout. Ended, not woken (SIGCONT): a woken rank ran on into its failed
    peer and reported itself stopped by it, so the report no longer named the rank that hung.
    `ended`: the pids sent it."""
    states = [state for path in run_dir.glob("rank-*.json") if (state := _read_state(path)) is not None]
    if not any(state["state"] == "failed" for state in states):
        return
    for state in states:
        pid = state.get("pid")
        if state["state"] in _UNFINISHED and pid is not None and pid not in ended and _stopped(pid):
            ended.add(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _stopped(pid: int) -> bool:
    """Whether process `pid` is stopped by a signal (state T in /proc; False where /proc has no
    such process, or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] in ("T", "t")


def _read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # gone, or being replaced
        return None


def _terminate_with_parent() -> Callable[[], None] | None:
    """What the child runs before torchrun starts: ask Linux to send it SIGTERM when the launcher
    dies (prctl PR_SET_PDEATHSIG); None where there is no prctl. Looked up here, in the parent:
    the forked child should only make the call."""
    try:
        prctl = ctypes.CDLL(None).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _flag(arguments: list[str], name: str) -> str | None:
    """The value of torchrun's `--name V` or `--name=V` (dashes or underscores)."""
    spellings = {f"--{name}", f"--{name.replace('-', '_')}"}
    for k, argument in enumerate(arguments):
        key, _, value = argument.partition("=")
        if key in spellings:
            return value or (arguments[k + 1] if k + 1 < len(arguments) else None)
    return None


def _rank_state(run_dir: Path, rank: int) -> dict | None:
    path = run_dir / f"rank-{rank}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _failure_report(states: list[dict | None], code: int, log: str, several_machines: bool = False) -> str:
    """Every rank's last state, the ranks that caused the failure first: those that raised an
    error of their own, else those that died or hang (the others' errors then only say that a
    peer went silent)."""
    # torchrun's summary names the first process that failed: "rank : 2 (local_rank: 2)".
    root_cause = log.partition("Root Cause")[2]
    first = re.search(r"rank\s*:\s*(\d+)", root_cause)
    exit_code = re.search(r"exitcode\s*:\s*(-?\d+)", root_cause)
    first_rank = int(first[1]) if first else None
    raised = [rank for rank, state in enumerate(states)
              if state and state["state"] == "failed" and not state.get("caused_by_peer")]  # fmt: skip
    silent = [rank for rank, state in enumerate(states) if state and state["state"] in _UNFINISHED]
    causes = raised or silent
    if not raised and len(silent) > 1 and first_rank in silent:
        # torchrun stops every other rank once one fails, and a stopped rank leaves the same
        # state as a dead one: the first that failed is the cause, the others went with it
        causes = [first_rank]
    headline = f"training failed (torchrun exited with {code})"
    elsewhere = [rank for rank, state in enumerate(states) if state is None]
    if causes:
        headline += f", caused by {_ranks(causes)}"
    elif several_machines and elsewhere and any(state and state.get("caused_by_peer") for state in states):
        # Several machines: this one's ranks only lost a peer; what failed ran on another one.
        headline += (f", caused by a rank of another machine ({_ranks(elsewhere)} ran elsewhere: "
                     "`ftc train` there reports them)")  # fmt: skip
    lines = [headline + ":"]
    for rank in causes + [rank for rank in range(len(states)) if rank not in causes]:
        lines.append(f"  rank {rank}: " + _rank_line(states[rank], rank == first_rank, causes))
    first_state = states[first_rank] if first_rank is not None and first_rank < len(states) else None
    if first and not (first_state and first_state["state"] == "failed"):
        # Its exit code tells how a rank without an error of its own ended (a signal, an abort).
        lines.append(f"  torchrun saw rank {first_rank} fail first"
                     + (f" (exit code {exit_code[1]})" if exit_code else ""))  # fmt: skip
    return "\n".join(lines)


_UNFINISHED = {
    "setting up": "died or was stopped while building its stages and data set",
    "checkpointing": "died or was stopped while writing the checkpoint of step {step}",
    "running": "died or was stopped at step {step} without an error of its own",
}
_STOPPED_WITH = {
    "setting up": "stopped while building its stages and data set",
    "checkpointing": "stopped while writing the checkpoint of step {step}",
    "running": "stopped at step {step}",
}


def _rank_line(state: dict | None, failed_first: bool, causes: list[int]) -> str:
    if state is None:
        return "left no status here (it never started, or ran on another machine)"
    if state["state"] in _UNFINISHED:
        if causes and state["rank"] not in causes:  # torchrun stopped it, the cause having failed first
            return _STOPPED_WITH[state["state"]].format(step=state["step"]) + f", after {_ranks(causes)} failed"
        return _UNFINISHED[state["state"]].format(step=state["step"])
    if state["state"] == "failed":
        when = f"at step {state['step']}" if state["step"] >= 0 else "before training"
        # An error's further lines (a user's multi-line message) stay indented under its rank.
        error = state["error"].replace("\n", "\n  ")
        if state.get("caused_by_peer"):
            return f"stopped {when} because {_ranks(causes) if causes else 'a peer'} failed: {error}"
        return f"failed {when}: {error}"
    if failed_first:
        return "finished training, then its process failed while shutting down"
    return "finished"


def _ranks(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The rank's work is done and recorded (results, checkpoints, status). The interpreter's own
    # teardown would now destroy what is left of the communication library (objects kept alive
    # by reference cycles, threads of its transport), which at times aborted a finished rank
    # (SIGABRT, "terminate called without an active exception"); exiting here skips it.
    os._exit(code)
