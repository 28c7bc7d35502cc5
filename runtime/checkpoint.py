"""Checkpoints: one shard per rank, in the original model's state_dict keys.

    DIR/step-00000100/rank-0.safetensors   the rank's weights and buffers (its stages' state_dict)
    DIR/step-00000100/rank-0.pt            its optimizer, lr schedule, step and RNG state
    DIR/step-00000100/manifest.json        written last, by rank 0, once every shard is there

Ranks write their shards into a hidden staging folder (DIR/.step-00000100.partial); rank 0
writes the manifest there once every shard is complete and then renames the folder into place,
so a step-* folder is always complete and a run that dies mid-write leaves the previous
checkpoint intact. A new run (not resuming) leaves an earlier run's checkpoints alone until its
own first checkpoint is complete, then removes them: a run that fails early loses nothing. A
step folder is removed whole (moved aside first), so a run stopped meanwhile leaves none that
lacks files.
Weights load by key, from whichever shard holds them; a parameter tied across ranks (the same
key in two shards) is stored by both and merged into one copy.
What a training run puts into its shards, and how it resumes from them, is resume.py's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ftc.ir import FtcError

FORMAT = "ftc-checkpoint/1"
MANIFEST = "manifest.json"
STEP_FOLDER = re.compile(r"step-(\d{8})")
STAGING = re.compile(r"\.step-(\d{8})\.(partial|old)")
REMOVED = re.compile(r"\.step-\d{8}\.removed")


def step_folder(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def staging_folder(root: Path, step: int) -> Path:
    return Path(root) / f".step-{step:08d}.partial"


def file_in_the_way(folder: Path) -> Path | None:
    """The file (not folder) at `folder` or above it that keeps `folder` from being made."""
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


def _atomic(path: Path, write) -> None:
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        write(temp)
        # mkstemp makes the file private (0600); give it the permissions a plain write would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic(path, lambda temp: Path(temp).write_text(json.dumps(data, indent=1) + "\n"))


def save_state_dict(path: Path, state: dict[str, torch.Tensor]) -> None:
    """A state_dict as .safetensors or, for any other suffix, a torch file; atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share storage (tied weights under two keys): store copies.
    plain = {key: value.detach().cpu().contiguous().clone() for key, value in state.items()}
    if path.suffix == ".safetensors":
        _atomic(path, lambda temp: save_file(plain, temp))
    else:
        _atomic(path, lambda temp: torch.save(plain, temp))


def save_shard(root: Path, step: int, rank: int, modules: list[torch.nn.Module], training_state: dict) -> None:
    """Rank `rank`'s part of the checkpoint at `step`: weights first, then the training state,
    whose file marks the shard complete."""
    folder = staging_folder(root, step)
    folder.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    for module in modules:
        state.update(module.state_dict())
    save_state_dict(folder / f"rank-{rank}.safetensors", state)
    _atomic(folder / f"rank-{rank}.pt", lambda temp: torch.save(training_state, temp))


def write_manifest(root: Path, step: int, world_size: int, run: str, extra: dict, keep: int | None = None) -> None:
    """Rank 0, once every rank's shard is complete (resume.save waits for that): mark the step
    complete and move it into place (replacing an earlier run's folder of the same step), then
    remove the checkpoints of earlier runs (those whose manifest names another `run`) and, with
    `keep`, all but this run's latest `keep`."""
    folder = staging_folder(root, step)
    missing = [rank for rank in range(world_size) if not (folder / f"rank-{rank}.pt").is_file()]
    if missing:
        # Every rank has written its shard by now (resume.save waits for them): where it is not
        # here, it went to another folder of that name, on another machine's disk.
        raise FtcError(f"checkpoint at step {step}: ranks {missing} wrote no shard into {folder}, though they "
                       "reported their shards written",
                       f"with several machines, checkpoint.dir ({Path(root).resolve()}) must be one folder every machine "
                       "shares (a shared file system, at that path on each)")  # fmt: skip
    shards = {}
    for rank in range(world_size):
        with safe_open(str(folder / f"rank-{rank}.safetensors"), framework="pt") as file:
            shards[f"rank-{rank}.safetensors"] = sorted(file.keys())
    write_json(folder / MANIFEST, {"format": FORMAT, "step": step, "world_size": world_size, "run": run,
                                   "shards": shards, **extra})  # fmt: skip
    final = step_folder(root, step)
    if final.exists():
        replaced = final.with_name(f".{final.name}.old")
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
        os.replace(folder, final)
        shutil.rmtree(replaced)
    else:
        os.replace(folder, final)
    for other in complete_steps(root):
        if run_of(other) != run:
            _remove(other)
    if keep is not None:
        for older in complete_steps(root)[:-keep]:
            _remove(older)


def _remove(folder: Path) -> None:
    """Remove a step folder at once: a run stopped while deleting its files would otherwise leave
    a step folder that lacks some, which looks damaged by hand. Moved aside first, it is gone
    from the step folders whole; `prepare` deletes what a stop left of it."""
    removed = folder.with_name(f".{folder.name}.removed")
    os.replace(folder, removed)
    shutil.rmtree(removed)


def run_of(folder: Path) -> str:
    """The run a complete step folder belongs to ("" for checkpoints from before runs were named)."""
    return manifest(folder).get("run", "")


def complete_steps(root: Path) -> list[Path]:
    """The complete step folders under `root`, oldest first: a manifest, and every shard and
    training state it names (a folder damaged after it was written is not complete)."""
    return [folder for folder in _step_folders(root) if missing_files(folder) == []]


def damaged_steps(root: Path) -> dict[Path, list[str]]:
    """Step folders that lack some of their files (only a hand could have removed them, as a
    step folder appears whole), with what they lack."""
    return {folder: missing for folder in _step_folders(root) if (missing := missing_files(folder))}


def _step_folders(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if STEP_FOLDER.fullmatch(p.name) and p.is_dir()), key=lambda p: p.name)


def missing_files(folder: Path) -> list[str]:
    try:
        data = manifest(folder)
    except OSError:
        return [MANIFEST]
    except ValueError:
        return [f"a valid {MANIFEST}"]
    names = [*data.get("shards", {}), *(f"rank-{rank}.pt" for rank in range(data.get("world_size", 0)))]
    return [name for name in names if not (folder / name).is_file()]


def latest(root: Path) -> Path | None:
    folders = complete_steps(root)
    return folders[-1] if folders else None


def prepare(root: Path, resume: bool) -> Path | None:
    """Before a run: drop what a crashed run left half-written; with `resume`, return the
    latest complete step folder. Complete checkpoints stay until this run completes its first."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for removed in [p for p in root.iterdir() if REMOVED.fullmatch(p.name)]:
        shutil.rmtree(removed)
    # A run stopped inside write_manifest's swap of a step folder it was replacing (an earlier
    # run's of the same step) leaves no step folder but a complete staging one (with its
    # manifest) and the replaced one (".old"): the complete one is put in place, the newer
    # first, rather than both being deleted.
    staged = sorted((p for p in root.iterdir() if STAGING.fullmatch(p.name)),
                    key=lambda p: (p.name.split(".")[1], p.name.endswith(".old")))  # fmt: skip
    for folder in staged:
        final = step_folder(root, int(STAGING.fullmatch(folder.name)[1]))
        if not final.exists() and missing_files(folder) == []:
            os.replace(folder, final)
        else:
            shutil.rmtree(folder)
    return latest(root) if resume else None


def left_to_resume(directory: str | None) -> str:
    """What a stopped run leaves to resume from, said once none of its ranks writes any more. A
    step sealed (its manifest written) but not yet moved into place when the run stopped is put
    there first, as the next run's `prepare` would, so the step named is the one a resume takes."""
    if not directory:
        return "no checkpoint.dir was set, so there is no checkpoint to resume from"
    last = prepare(Path(directory), resume=True) if Path(directory).is_dir() else None
    if last is None:
        return f"no checkpoint was complete in {directory} yet"
    return f"the latest complete checkpoint is {last}: resume with --set checkpoint.resume=true"


def manifest(folder: Path) -> dict:
    return json.loads((Path(folder) / MANIFEST).read_text())


def load_weights(folder: Path, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The weights of a complete step folder by key (all keys, or those in `keys`); a key that
    several shards hold (a tied parameter) must be equal in all of them."""
    state: dict[str, torch.Tensor] = {}
    for shard, shard_keys in manifest(folder)["shards"].items():
        wanted = [k for k in shard_keys if keys is None or k in keys]
        if not wanted:
            continue
        try:
            file = safe_open(str(Path(folder) / shard), framework="pt")
        except Exception as exc:
            raise FtcError(f"checkpoint {folder}: cannot read {shard}: {type(exc).__name__}: {exc}",
                           f"the step folder was damaged after it was written: delete {folder} to resume from the "
                           "step before (ftc merge-checkpoint takes that step's folder too)") from exc  # fmt: skip
        with file:
            for key in wanted:
                tensor = file.get_tensor(key)
                if key in state and not torch.equal(state[key], tensor):
                    raise FtcError(f"checkpoint {folder}: the shards disagree on {key!r}",
                                   "a tied parameter drifted apart between ranks; this checkpoint is not usable")  # fmt: skip
                state[key] = tensor
    return state


def load_training_state(folder: Path, rank: int) -> dict:
    """Rank `rank`'s training state (optimizer state by parameter name, scheduler, step, RNG),
    memory-mapped: only the tensors used are read."""
    path = Path(folder) / f"rank-{rank}.pt"
    if not path.is_file():
        raise FtcError(f"checkpoint {folder}: rank-{rank}.pt, rank {rank}'s training state, is missing",
                       "the step folder was damaged after it was written: delete it to resume from the one before")  # fmt: skip
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:
        raise FtcError(f"checkpoint {folder}: cannot read rank-{rank}.pt, rank {rank}'s training state "
                       f"({type(exc).__name__}: {exc})",
                       "the step folder was damaged after it was written: delete it to resume from the one before")  # fmt: skip


def training_states(folder: Path) -> list[dict]:
    """Every rank's training state in a step folder, rank by rank."""
    return [load_training_state(folder, rank) for rank in range(manifest(folder)["world_size"])]


def merge(root: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """The latest complete checkpoint under `root` (or the step folder `root` itself) as one
    state_dict of the original model."""
    if not root.exists():
        raise FtcError(f"{root} does not exist", "pass the checkpoint.dir of a training run, or one of its step-*/ folders")
    folder = root if (root / MANIFEST).is_file() else latest(root)
    if folder is None:
        raise FtcError(f"{root} holds no complete checkpoint (a step-*/ folder with {MANIFEST})",
                       "pass the checkpoint.dir of a training run")  # fmt: skip
    return manifest(folder)["step"], load_weights(folder)
