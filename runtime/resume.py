"""What a run keeps in its checkpoints and takes back when it resumes: each rank's weights,
optimizer and lr-schedule state, RNG state and (rank 0) the run's figures so far, and the
settings that decide which samples each step draws. Weights and optimizer state go by parameter
name, so a run resumes in any mode and layout. checkpoint.py is the format on disk; this module
is what training puts into it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ftc.ir import FtcError

from . import checkpoint
from .comm import PeerFailure, peer_reason
from .config import Config
from .rank import Rank
from .results import History
from .setup_sync import within_setup_timeout
from .staleness import GAP_SQUARES


def save(
    root: Path, step: int, me: Rank, modules: list[torch.nn.Module], optimizer, scheduler, config: Config, run: str,
    tied: dict[str, str], group: Any = None, history: History | None = None,
) -> None:
    """Every rank writes its shard; once all have (`group`, mode dist: a writer of a large shard is
    slow, not dead), rank 0 seals the step. `history`: the run's figures so far, which rank 0's
    shard carries for a resumed run's results."""
    state = {
        "step": step, "optimizer": optimizer.state_dict() if optimizer else None,
        "scheduler": scheduler.state_dict() if scheduler else None,
        "rng": torch.get_rng_state(), "stages": me.stages, "parameters": parameter_names(modules, optimizer, tied),
    }  # fmt: skip
    if me.rank == 0 and history is not None:  # rank 0 writes the results, from any checkpoint's rank 0
        state["history"] = history.to_json()
    if me.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(me.device)
    checkpoint.save_shard(root, step, me.rank, modules, state)
    if group is not None:
        try:
            dist.barrier(group=group)
        except RuntimeError as exc:
            raise PeerFailure(f"not every rank wrote its checkpoint shard of step {step} {within_setup_timeout(exc)} "
                              f"({peer_reason(exc)})",
                           "a rank that failed says why in its own line; raise setup_timeout_s if shards take "
                           "this long to write") from exc  # fmt: skip
    if me.rank == 0:
        checkpoint.write_manifest(root, step, me.world_size, run, {"mode": config.mode, "sampling": sampling(config)},
                                  config.checkpoint.keep)  # fmt: skip


def sampling(config: Config) -> dict:
    """The settings that decide which samples, and which dropout masks, each step draws."""
    return {"seed": config.seed, "batch_size": config.batch_size, "step_every": config.step_every,
            "data": config.data, "eval.fraction": config.eval.fraction if config.eval.every else None}  # fmt: skip


def sampling_changes(config: Config, manifest: dict) -> list[str]:
    """Lines that say which of the checkpoint's sampling settings this config changes: the
    resumed steps then draw other samples (and dropout masks) than the run would have drawn
    uninterrupted. Checkpoints written before manifests recorded them say nothing."""
    then, now = manifest.get("sampling"), sampling(config)
    if then is None:
        return []
    changed = [key for key in now if json.dumps(then.get(key), sort_keys=True) != json.dumps(now[key], sort_keys=True)]
    return [f"config {config.source}: {key} is {json.dumps(now[key])}, but the checkpoint's run used "
            f"{json.dumps(then.get(key))}: the resumed steps draw other samples (and dropout masks) than that run "
            f"would have" for key in changed]  # fmt: skip


def parameter_names(modules: list[torch.nn.Module], optimizer, tied: dict[str, str]) -> list[str]:
    """The optimizer's parameters by name, in its order (a tied weight by its first name), so a
    checkpoint's optimizer state maps onto the same weights in any mode."""
    if optimizer is None:
        return []
    names: dict[int, str] = {}
    for module in modules:
        for name, param in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), tied.get(name, name))
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


# The state torch's optimizers keep per parameter, by kind: Adam and AdamW read each other's;
# SGD's is its momentum buffer, or async gap-aware's running mean of squares (staleness.py).
_OPTIMIZER_KINDS = {"SGD": "SGD", "Adam": "Adam", "AdamW": "Adam"}


def _state_kind(states: Any) -> str | None:
    """The kind of per-parameter optimizer state (see _OPTIMIZER_KINDS), None when it holds no
    tensors (SGD without momentum)."""
    for state in states:
        if "exp_avg" in state:
            return "Adam"
        if isinstance(state.get("momentum_buffer"), torch.Tensor) or GAP_SQUARES in state:
            return "SGD"
    return None


def _optimizer_state(optimizer: Any, states: list[dict], folder: Path, now: list[str]) -> dict:
    """The optimizer state for this run's parameters `now`, in its order, gathered by name from
    the checkpoint's ranks (`states`): a run may resume with other ranks than wrote it, mode
    single from a pipeline's checkpoint and the reverse (a tied parameter's state is the same
    on every rank that holds it)."""
    by_name: dict[str, Any] = {}
    for state in states:
        saved, optimizer_state = state.get("parameters") or [], state["optimizer"]
        if optimizer_state is None:  # a rank of parameter-free stages
            continue
        for k, name in enumerate(saved):
            if k in optimizer_state["state"]:
                by_name.setdefault(name, optimizer_state["state"][k])
    written, kind = _state_kind(by_name.values()), _OPTIMIZER_KINDS.get(type(optimizer).__name__)
    if written is None:
        by_name = {}  # nothing to carry over (SGD without momentum): any optimizer starts afresh
    elif kind is not None and written != kind:
        raise FtcError(f"checkpoint {folder} holds {written} optimizer state, but the config's optimizer.name is "
                       f"{type(optimizer).__name__.lower()}, which cannot take it over",
                       f"resume with the optimizer that wrote it, or start a new run from its weights: "
                       f"`ftc merge-checkpoint {folder}` and set \"init\" to the merged file")  # fmt: skip
    trained = {name for state in states for name in state.get("parameters") or []}
    missing = sorted(set(now) - trained)
    if missing:
        raise FtcError(f"checkpoint {folder} holds no optimizer state for {len(missing)} of this rank's parameters "
                       f"({', '.join(missing[:5])})",
                       "it is another model's checkpoint: resume with the model that wrote it, or start a new run "
                       "with \"init\" set to a merged checkpoint (ftc merge-checkpoint)")  # fmt: skip
    (group,) = next(state["optimizer"]["param_groups"] for state in states if state["optimizer"] is not None)
    return {
        "state": {k: by_name[name] for k, name in enumerate(now) if name in by_name},
        "param_groups": [{**group, "params": list(range(len(now)))}],
    }


def resume(
    folder: Path, me: Rank, modules: list[torch.nn.Module], optimizer, scheduler, tied: dict[str, str],
    model_keys: set[str] | None = None,
) -> int:  # fmt: skip
    """Load this rank's weights and training state from a complete step folder, whichever mode
    and processes wrote it: weights and optimizer state go by name. `model_keys`: every state key
    of the model (all ranks'), which the checkpoint must not exceed."""
    if model_keys is not None:
        # Each rank loads only its own keys; a checkpoint of a larger model (another model with
        # this one's names, and more) would lose its other weights without a word.
        unknown = sorted({key for keys in checkpoint.manifest(folder)["shards"].values() for key in keys} - model_keys)
        if unknown:
            raise FtcError(f"checkpoint {folder} holds {len(unknown)} weights the model does not have "
                           f"({', '.join(unknown[:5])})",
                           "it is another model's checkpoint: resume with the model and pipeline that wrote it, or "
                           "set checkpoint.dir to a new folder")  # fmt: skip
    written = checkpoint.manifest(folder)["world_size"]
    own = checkpoint.load_training_state(folder, me.rank) if me.rank < written else None
    now = parameter_names(modules, optimizer, tied)
    # The same layout reads its own shard only; another gathers what it holds from every shard.
    states = [own] if own is not None and set(now) <= set(own.get("parameters") or []) else checkpoint.training_states(folder)
    state = own if own is not None else states[0]
    keys = {key for module in modules for key in module.state_dict()}
    weights = checkpoint.load_weights(folder, keys)
    missing = sorted(keys - set(weights))
    if missing:
        raise FtcError(f"checkpoint {folder} lacks {len(missing)} of rank {me.rank}'s weights ({', '.join(missing[:5])})",
                       "it is another model's checkpoint: resume with the model and pipeline that wrote it, or "
                       "set checkpoint.dir to a new folder")  # fmt: skip
    for module in modules:
        for key, tensor in module.state_dict().items():
            if weights[key].shape != tensor.shape:
                raise FtcError(f"checkpoint {folder}: {key} has shape {list(weights[key].shape)} but the model's is "
                               f"{list(tensor.shape)}",
                               "it is the checkpoint of a model built with other settings: resume with the model that "
                               "wrote it, or set checkpoint.dir to a new folder")  # fmt: skip
        module.load_state_dict({key: weights[key] for key in module.state_dict()}, strict=True)
    if optimizer is not None:
        # The config's settings (lr, betas, weight decay, schedule) govern the resumed steps; the
        # checkpoint gives the optimizer's state and the schedule's position.
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(_optimizer_state(optimizer, states, folder, now))
        # Every rank steps the same schedule; one with parameters saved it.
        scheduler.load_state_dict(next(s["scheduler"] for s in [state, *states] if s["scheduler"] is not None))
        scheduler.base_lrs = [group["initial_lr"] for group in settings]
        for group, fresh, factor in zip(optimizer.param_groups, settings, scheduler.lr_lambdas):
            group.update(fresh)
            group["lr"] = fresh["initial_lr"] * factor(scheduler.last_epoch)
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and me.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], me.device)
    return state["step"]


def earlier_history(folder: Path) -> History:
    """The figures of the steps up to the checkpoint `folder` that it carries (none from a
    checkpoint written before checkpoints carried them)."""
    data = checkpoint.load_training_state(folder, 0).get("history")
    return History() if data is None else History.from_json(data)
