"""What a run says while it trains: the progress lines on rank 0's terminal (and the line that
opens them), its warnings, and each rank's status file, from which the launcher of mode dist says which rank
failed, at which step, and why. The figures themselves are results.py's."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from . import checkpoint
from .config import Config
from .pipeline import Pipeline


def headline(config: Config, pipeline: Pipeline, world_size: int, dataset: Any, trained: int | None) -> str:
    """The line rank 0 prints before the first step: what trains, how, and on which data
    (`trained`: how many of the data set's samples training draws from)."""
    epochs = f" ({counted(config.epochs, 'epoch')})" if config.epochs is not None else ""
    held_out = f", the last {len(dataset) - trained} held out for eval" if dataset is not None and config.eval.every else ""
    return (f"{pipeline.name}: mode {config.mode}, {counted(world_size, 'process', 'processes')}, "
            f"{counted(len(pipeline.stages), 'stage')}, schedule {config.schedule}{async_settings(config)}, "
            f"{'bf16 autocast, ' if config.precision == 'bf16' else ''}"
            f"batch {config.batch_size} = {counted(config.micro_batches, 'micro-batch', 'micro-batches')}"
            f"{f' x {config.step_every} per step' if config.step_every > 1 else ''}, {counted(config.steps, 'step')}{epochs}, "
            f"data {config.data['name']}" + (f" ({len(dataset)} samples{held_out})" if dataset is not None else ""))  # fmt: skip


class Progress:
    """A \\r status line on a terminal, plus a log line every log_every steps; only the latter
    when the output is not a terminal."""

    def __init__(self, steps: int, log_every: int, enabled: bool):
        self.steps = steps
        self.log_every = log_every
        self.enabled = enabled
        self.tty = enabled and sys.stdout.isatty()
        self.status_width = 0  # of the \r line on screen, which the next line must cover

    def update(self, step: int, loss: float, lr: float, samples_per_s: float, grad_norm: float | None = None) -> None:
        if not self.enabled:
            return
        speed = f"{samples_per_s:.1f} samples/s" if samples_per_s else "- samples/s"
        norm = f"  grad norm {grad_norm:.3g}" if grad_norm is not None else ""
        line = f"step {step + 1:>{len(str(self.steps))}}/{self.steps}  loss {loss:.4f}{norm}  lr {lr:.3g}  {speed}"
        if (step + 1) % self.log_every == 0 or step + 1 == self.steps or step == 0:
            print(("\r" + line.ljust(self.status_width)) if self.tty else line, flush=True)
            self.status_width = 0
        elif self.tty:
            bar = "#" * (20 * (step + 1) // self.steps)
            status = f"[{bar:<20}] {line}"
            print("\r" + status.ljust(self.status_width), end="", flush=True)
            self.status_width = len(status)

    def note(self, line: str) -> None:
        """A line of its own (an evaluation's result), over the status line where one shows."""
        if not self.enabled:
            return
        print(("\r" + line.ljust(self.status_width)) if self.tty else line, flush=True)
        self.status_width = 0


class Status:
    """This rank's state in FTC_STATUS_DIR/rank-<r>.json (when set), so the launcher can say
    which rank failed, at which step, and why."""

    def __init__(self, rank: int):
        folder = os.environ.get("FTC_STATUS_DIR")
        self.path = Path(folder) / f"rank-{rank}.json" if folder else None
        self.rank = rank

    def write(self, state: str, step: int, error: str | None = None, caused_by_peer: bool = False) -> None:
        """`caused_by_peer`: the error is another rank's failure seen from here (PeerFailure)."""
        if self.path is not None:
            checkpoint.write_json(self.path, {"rank": self.rank, "state": state, "step": step, "error": error,
                                              "caused_by_peer": caused_by_peer, "pid": os.getpid()})  # fmt: skip


def warn(message: str, kind: str = "warning") -> None:
    """`ftc train: warning: message` (or `note:`) on stderr, where the launcher of mode dist
    relays each such line once (relay.py)."""
    print(f"ftc train: {kind}: {message}", file=sys.stderr, flush=True)


def counted(count: float, noun: str, nouns: str | None = None) -> str:
    """'1 step', '3 steps', '0.5 epochs'."""
    return f"{count:g} {noun if count == 1 else nouns or noun + 's'}"


def async_settings(config: Config) -> str:
    if config.schedule != "async" or config.mode == "single":
        return ""
    staleness = config.staleness
    mitigations = [name for name, on in (("weight prediction", staleness.predict), ("gap-aware", staleness.gap_aware)) if on]
    return f" (a flush every {staleness.flush_every} steps, weight stashing{''.join(', ' + m for m in mitigations)})"
