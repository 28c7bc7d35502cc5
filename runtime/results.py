"""A run's results: the per-step figures (loss, learning rate, gradient norm, held-out loss),
throughput and memory, the results JSON, the loss curve and the summary `ftc train` prints.
Separate from the training loop, which only appends to them, so that readers of a results file
(the launcher of mode dist, tests) need not load it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import checkpoint
from .config import Config
from .progress import counted


@dataclass
class History:
    """The per-step figures of a run's steps before this process's first: a resumed run takes
    them from its checkpoint, so that its final figures and loss curve are the whole run's, as
    an uninterrupted run's are."""

    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"loss": self.loss, "lr": self.lr, "grad_norm": self.grad_norm,
                "eval": _eval_json(self.eval_loss)}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict) -> History:
        return cls(list(data["loss"]), list(data["lr"]), list(data["grad_norm"]), _eval_pairs(data["eval"]))


def _eval_json(pairs: list[tuple[int, float]]) -> list[dict]:
    return [{"step": step, "loss": loss} for step, loss in pairs]


def _eval_pairs(entries: list[dict]) -> list[tuple[int, float]]:
    return [(entry["step"], entry["loss"]) for entry in entries]


@dataclass
class Results:
    config: dict
    mode: str
    world_size: int
    first_step: int
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    samples_per_s: float = 0.0
    wall_time_s: float = 0.0
    checkpoint: str | None = None
    results: str | None = None
    plot: str | None = None
    peak_memory_bytes: list[int] | None = None  # per rank, on CUDA: torch.cuda.max_memory_allocated
    grad_norm: list[float] = field(default_factory=list)  # per step, before clipping (optimizer.clip_grad_norm)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss), config eval
    # A resumed run's steps before first_step (the lists above hold this process's steps only).
    earlier: History = field(default_factory=History)

    def history(self) -> History:
        """The run's figures from its first step (as far as its checkpoints carried them) to now."""
        earlier = self.earlier
        return History(earlier.loss + self.loss, earlier.lr + self.lr, earlier.grad_norm + self.grad_norm,
                       earlier.eval_loss + self.eval_loss)  # fmt: skip

    def to_json(self) -> dict:
        whole = self.history()
        last = whole.loss[-10:]
        return {
            "config": self.config, "mode": self.mode, "world_size": self.world_size,
            "first_step": self.first_step, "loss": self.loss, "lr": self.lr,
            "samples_per_s": self.samples_per_s, "wall_time_s": self.wall_time_s,
            "final": {"loss": whole.loss[-1] if whole.loss else None,
                      "mean_loss_last_10": sum(last) / len(last) if last else None,
                      "steps": self.first_step + len(self.loss)}
                     | ({"eval_loss": whole.eval_loss[-1][1]} if whole.eval_loss else {}),
            "checkpoint": self.checkpoint, "plot": self.plot, "peak_memory_bytes": self.peak_memory_bytes,
        } | ({"grad_norm": self.grad_norm} if self.grad_norm else {}) | (
            {"eval": _eval_json(self.eval_loss)} if self.eval_loss else {}
        ) | ({"before_resume": self.earlier.to_json()} if self.earlier.loss else {})  # fmt: skip

    @classmethod
    def from_json(cls, data: dict, results: str | None) -> Results:
        """What to_json wrote (`results`: where it was written)."""
        return cls(data["config"], data["mode"], data["world_size"], data["first_step"], data["loss"], data["lr"],
                   data["samples_per_s"], data["wall_time_s"], data["checkpoint"], results, data["plot"],
                   data["peak_memory_bytes"], data.get("grad_norm", []),
                   _eval_pairs(data.get("eval", [])),
                   History.from_json(data["before_resume"]) if "before_resume" in data else History())  # fmt: skip


def write_results(config: Config, results: Results) -> None:
    if not results.loss and _reached_by_earlier_results(config, results.first_step):
        # Resuming a finished run trains nothing: its results and loss curve stay, not an empty
        # pair written over them (mode dist's launcher then reads the kept results).
        results.results = config.results
        results.plot = config.plot if config.plot and Path(config.plot).is_file() else None
        return
    if config.plot:
        plot_loss(Path(config.plot), results)
        results.plot = config.plot
    if config.results:
        results.results = config.results
        checkpoint.write_json(Path(config.results), results.to_json())


def _reached_by_earlier_results(config: Config, step: int) -> bool:
    """Whether config.results already holds the results of a run that ended at `step`."""
    if not config.results or step == 0:
        return False
    try:
        earlier = json.loads(Path(config.results).read_text())
        return earlier["final"]["steps"] == step
    except (OSError, ValueError, KeyError, TypeError):
        return False


def plot_loss(path: Path, results: Results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.ticker
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4))
    whole = results.history()  # a resumed run's curve starts where its checkpoints' history does
    first = results.first_step - len(results.earlier.loss)
    axes.plot(range(first + 1, first + len(whole.loss) + 1), whole.loss, linewidth=1, label="training")
    if whole.eval_loss:
        axes.plot(*zip(*whole.eval_loss), marker="o", linewidth=1, label="held out")
        axes.legend()
    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes.set_ylabel("loss")
    # A log scale drops losses at or below zero (a negative log-likelihood, a custom loss), and
    # within a decade it shows little but tick labels such as 2.4×10⁰.
    shown = whole.loss + [loss for _, loss in whole.eval_loss]
    axes.set_yscale("log" if min(shown, default=0) > 0 and max(shown) >= 10 * min(shown) else "linear")
    name = Path(results.config["pipeline"]).name
    axes.set_title(f"{name}: {results.mode}, {counted(results.world_size, 'process', 'processes')}, {results.config['schedule']}")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    # The format the path names (loss.pdf, loss.svg), PNG for any other.
    kind = path.suffix.lstrip(".").lower()
    figure.savefig(temp, format=kind if kind in figure.canvas.get_supported_filetypes() else "png", dpi=100)
    pyplot.close(figure)
    os.replace(temp, path)


def summary(results: Results) -> str:
    final = results.to_json()["final"]
    if not results.loss:
        steps = results.config.get("steps", final["steps"])
        return f"nothing to train: the run is at step {final['steps']}, and the config asks for {steps} steps"
    lines = [
        f"final loss {final['loss']:.4f} (mean of the last {counted(min(10, len(results.history().loss)), 'step')} "
        f"{final['mean_loss_last_10']:.4f}) after {counted(final['steps'], 'step')}"
        + (f", held-out loss {final['eval_loss']:.4f}" if "eval_loss" in final else ""),
        (f"{results.samples_per_s:.1f} samples/s" if results.samples_per_s else
         "samples/s not measured (it counts from the end of the first step, or under async the first segment, "
         "and this run had no other)") + f", wall time {results.wall_time_s:.1f} s",
    ]
    for label, value in (
        ("results", results.results),
        ("loss curve", results.plot),
        ("checkpoints", results.checkpoint),
    ):
        if value:
            lines.append(f"{label}: {_shown(value)}")
    return "\n".join(lines)


def _shown(path: str) -> str:
    """A path as short as it is unambiguous: relative to the working folder when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
