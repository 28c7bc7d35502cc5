"""Building only a rank's stages: every rank builds the model, keeps real tensors only for the
parameters and buffers its stages adopt, and gives them exactly the values that build_model()
gives them on the CPU with Python's `random`, NumPy's and torch's generators seeded with the
config's seed (or a checkpoint's values). The builds (replay.py) run all of build_model()'s Python,
seeded alike, so its draws from Python's and NumPy's generators are the reference build's.

Which ops of the build give those values, and how the rest is skipped with every random draw
still made, is replay.py's part.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ftc.ir import FtcError

from .mode import set_mode
from .model_file import ModelFile
from .pipeline import Pipeline, StageSpec
from .replay import Unreplayable, named_state_tensors, replayed_build, state_tensors
from .seeding import seed_generators

log = logging.getLogger(__name__)


def build_stages(
    model_file: ModelFile,
    pipeline: Pipeline,
    stage_indices: list[int],
    device: torch.device | str,
    seed: int,
    checkpoint: str | Path | None = None,
) -> dict[int, torch.nn.Module]:
    """Stage index -> stage module for `stage_indices`, its parameters and buffers real tensors on
    `device`: the values `seed_generators(seed); build_model()` gives them on the CPU, or the
    checkpoint's. Stages that share a module or a tied parameter share the tensor objects."""
    specs = {spec.index: spec for spec in pipeline.stages}
    unknown = [index for index in stage_indices if index not in specs]
    if unknown:
        raise FtcError(
            f"{pipeline.folder}: the pipeline has no stage {', '.join(map(str, unknown))}",
            f"pick stages among {sorted(specs)}",
        )
    classes = {index: pipeline.stage_class(specs[index]) for index in stage_indices}
    with blamed_on_a_changed_model_file(model_file, pipeline):
        try:
            stages = _build_owned(model_file, classes, seed, pipeline)
        except Unreplayable as exc:
            log.warning(
                "%s: building the whole model on the CPU to keep stages %s, because %s",
                model_file.path,
                ", ".join(map(str, stage_indices)),
                exc,
            )
            stages = _build_whole(model_file, classes, seed, pipeline)
    _move(stages, torch.device(device))
    if checkpoint is not None:
        # pipeline.json lists parameters and buffers; those a stage does not save (non-persistent
        # buffers) are not checkpoint keys: the rank holding one refuses it, as the model would.
        unsaved = {name for stage in stages.values() for name, _ in stage.named_buffers()} - {
            key for stage in stages.values() for key in stage.state_dict()
        }
        model_keys = ({key for spec in pipeline.stages for key in spec.state} | set(pipeline.tied)) - unsaved
        load_checkpoint(stages, checkpoint, model_keys, pipeline.tied)
    return stages


def model_file_changed(model_file: ModelFile, pipeline: Pipeline) -> bool:
    """Whether the model file is not the one the pipeline was compiled from (pipeline.json's
    sha256 of it; a manifest without one cannot tell)."""
    recorded = pipeline.manifest.get("model_file_sha256")
    return recorded is not None and recorded != model_file.digest()


@contextlib.contextmanager
def blamed_on_a_changed_model_file(model_file: ModelFile, pipeline: Pipeline) -> Iterator[None]:
    """Stages that no longer fit a model file edited since compiling (a renamed or an added
    layer) fail as if the stages or pipeline.json's "state" were edited by hand, which their fix
    lines say to undo; where the model file changed, the error inside blames that, with the
    command that recompiles."""
    try:
        yield
    except FtcError as exc:
        if not model_file_changed(model_file, pipeline):
            raise
        raise FtcError(
            f"{model_file.path} is not the model file {pipeline.folder} was compiled from (it changed since, or is "
            f"another file: its sha256 is not pipeline.json's model_file_sha256), and the stages no longer fit the "
            f"model it builds: {exc.message}",
            recompile_hint(model_file, pipeline),
        ) from exc


def recompile_hint(model_file: ModelFile, pipeline: Pipeline) -> str:
    """How to bring a pipeline up to date with its model file as it is now."""
    name = f" --name {pipeline.name}" if pipeline.name != model_file.stem else ""
    return (
        f"recompile the pipeline from the model file as it is now: `ftc compile {model_file.path} --stages "
        f"{pipeline.num_devices} -o {pipeline.folder.parent}{name}` with the other options of the first compile "
        "(and --force over hand-edited stages), or restore the model file it was compiled from"
    )


def load_checkpoint(
    stages: dict[int, torch.nn.Module], checkpoint: str | Path, model_keys: set[str] | None = None,
    tied: dict[str, str] | None = None,
) -> None:  # fmt: skip
    """Copy into the stages' parameters and buffers, in place, the checkpoint's tensors for their
    state_dict keys (the original model's keys). `checkpoint` is a safetensors file or a torch
    state_dict file; it may hold keys of other stages too, but only the model's (`model_keys`,
    when given: as strict as the model's own load_state_dict). A tied tensor (`tied`: alias ->
    first name) may be saved under any one of its names, as Hugging Face saves them."""
    path = Path(checkpoint)
    if path.is_dir():
        # A training run's checkpoint folder (or one of its step folders) holds one shard per rank.
        raise FtcError(f"checkpoint {path} is a folder, not a state_dict file",
                       f"merge a training run's checkpoints into one file with `ftc merge-checkpoint {path} -o "
                       "merged.safetensors` and pass that file, or continue the run with checkpoint.resume")  # fmt: skip
    if not path.is_file():
        raise FtcError(f"checkpoint {path} does not exist", "pass the path of a .safetensors or torch .pt file")
    # Keys that name one tensor object (tied parameters) need only one of them in the checkpoint.
    groups: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for stage in stages.values():
        for key, tensor in stage.state_dict(keep_vars=True).items():
            groups.setdefault(id(tensor), (tensor, []))[1].append(key)
    # A rank may hold one name of a tied tensor whose other name another rank holds.
    tied = tied or {}
    for _, keys in groups.values():
        first = {tied.get(key, key) for key in keys}
        keys += [name for name in sorted(first | {a for a, f in tied.items() if f in first}) if name not in keys]
    source = _read_checkpoint(path)
    unknown = sorted(set(source.keys) - model_keys) if model_keys is not None else []
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise FtcError(
            f"checkpoint {path} holds {len(unknown)} key(s) the model does not have: {shown}",
            "pass a checkpoint of this model (one of a larger or other model would load only in part)",
        )
    missing = [keys for _, keys in groups.values() if not any(key in source.keys for key in keys)]
    if missing:
        names = [keys[0] for keys in missing]
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        raise FtcError(
            f"checkpoint {path} lacks {len(names)} key(s) of stages {', '.join(map(str, sorted(stages)))}: {shown}",
            "pass a checkpoint of the original model's state_dict (safetensors, or torch.save(model.state_dict())) "
            "with the model's own keys",
        )
    for tensor, keys in groups.values():
        key, *other_names = [key for key in keys if key in source.keys]
        shape = source.shape(key)
        if shape != tuple(tensor.shape):
            raise FtcError(
                f"checkpoint {path}: {key} has shape {list(shape)} but the model's is {list(tensor.shape)}",
                "the checkpoint is of a model built with other settings; rebuild it from this model file",
            )
        value = source.tensor(key)
        # Each rank holding a tied tensor reads it under its own name first: names that disagree
        # would start the ranks' copies apart, and in one process the model would keep one of them.
        disagreeing = [name for name in other_names if not torch.equal(source.tensor(name), value)]
        if disagreeing:
            raise FtcError(
                f"checkpoint {path} holds {key} and {', '.join(disagreeing)}, which the model ties (one tensor), "
                "with different values",
                "save the tied tensor once, or with one value under every name (torch.save(model.state_dict()) "
                "of a model that ties them does)",
            )
        with torch.no_grad():
            tensor.copy_(value)


def _build_owned(
    model_file: ModelFile, classes: dict[int, type], seed: int, pipeline: Pipeline | None = None
) -> dict[int, torch.nn.Module]:
    def adopted(meta_model: torch.nn.Module) -> list[torch.Tensor]:
        return [tensor for stage in _construct(classes, meta_model, pipeline).values() for tensor in state_tensors(stage)]

    model = replayed_build(model_file, seed, adopted)
    stages = _construct(classes, model)
    set_mode(model, stages.values(), True)
    for index, stage in stages.items():
        for name, tensor in named_state_tensors(stage):
            if tensor.is_meta:
                raise Unreplayable(f"stage {index}'s {name} was not built from tensors the stage adopts")
    return stages


def _build_whole(
    model_file: ModelFile, classes: dict[int, type], seed: int, pipeline: Pipeline | None = None
) -> dict[int, torch.nn.Module]:
    seed_generators(seed)
    model = model_file.build()
    stages = _construct(classes, model, pipeline)
    set_mode(model, stages.values(), True)
    return stages


def _construct(classes: dict[int, type], model: torch.nn.Module, pipeline: Pipeline | None = None) -> dict[int, torch.nn.Module]:
    if pipeline is not None:
        check_tied(model, pipeline)
    specs = {spec.index: spec for spec in pipeline.stages} if pipeline is not None else {}
    stages = {}
    for index, cls in classes.items():
        stages[index] = construct_stage(cls, model, pipeline, specs.get(index))
    return stages


def construct_stage(cls: type, model: torch.nn.Module, pipeline: Pipeline | None, spec: StageSpec | None) -> torch.nn.Module:
    """`cls(model)`, with an error naming the stage file when its __init__ fails, and checked
    against pipeline.json's list of what the stage holds (`spec.state`), which says what the
    runtime initializes, loads, saves and sums across devices."""
    where = spec.file if spec is not None else f"{cls.__module__}.{cls.__name__}"
    try:
        stage = cls(model)
    except Exception as exc:
        raise FtcError(
            f"{where}: {cls.__name__}.__init__ raised {type(exc).__name__}: {exc}",
            "make the stage adopt the model's submodules, parameters and buffers by their qualified names, "
            "then run `ftc check`",
        ) from exc
    if pipeline is not None and spec is not None:
        _check_state_list(stage, model, pipeline, spec)
    return stage


def _check_state_list(stage: torch.nn.Module, model: torch.nn.Module, pipeline: Pipeline, spec: StageSpec) -> None:
    held = {name for name, _ in stage.named_parameters(remove_duplicate=False)}
    held |= {name for name, _ in stage.named_buffers(remove_duplicate=False)}
    of_model = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    of_model |= {name for name, _ in model.named_buffers(remove_duplicate=False)}
    listed = set(spec.state)
    missing, unlisted = sorted(listed - held), sorted((held & of_model) - listed)
    # Parameters and saved buffers: a non-persistent buffer of the stage's own (a constant the
    # compiler wrote into it) is neither trained nor saved.
    added = sorted(set(stage.state_dict(keep_vars=True)) - of_model - listed)
    if added:
        # A layer added by hand: trained, but the runtime would neither initialize it alike on
        # every rank nor save and resume it unless pipeline.json lists it.
        raise FtcError(f"{pipeline.folder / spec.file} holds {', '.join(added[:4])}{' ...' if len(added) > 4 else ''}, "
                       f"which the model does not have and pipeline.json's stage {spec.index} \"state\" does not "
                       "list; the runtime initializes, loads, saves and syncs by that list",
                       f"add {', '.join(repr(name) for name in added[:4])}{' ...' if len(added) > 4 else ''} to stage "
                       f"{spec.index}'s \"state\" in pipeline.json to train the new layer (or remove it from the "
                       "stage)")  # fmt: skip
    if missing or unlisted:
        what = "; ".join(part for part in (
            f"it lists {', '.join(missing[:4])}, which {spec.file} does not hold" if missing else "",
            f"{spec.file} holds {', '.join(unlisted[:4])}, which it does not list" if unlisted else "",
        ) if part)  # fmt: skip
        raise FtcError(f"{pipeline.folder / 'pipeline.json'}: stage {spec.index}'s \"state\" is not what the stage holds "
                       f"({what}); the runtime initializes, loads, saves and syncs by that list",
                       "undo the hand edit of \"state\" (or make it name exactly the parameters and buffers the stage "
                       "adopts), then run `ftc check`")  # fmt: skip


def check_tied(model: torch.nn.Module, pipeline: Pipeline) -> None:
    """pipeline.json's "tied" (alias -> first name) must name one tensor of the model: the
    engine sums the gradients of the names across devices, which for two tensors trains
    neither as the model would."""
    manifest = pipeline.folder / "pipeline.json"
    for alias, first in pipeline.tied.items():
        tensors = []
        for name in (alias, first):
            try:
                tensors.append(model.get_parameter(name))
            except AttributeError:
                try:
                    tensors.append(model.get_buffer(name))
                except AttributeError:
                    raise FtcError(f"{manifest}: \"tied\" names {name!r}, which is no parameter or buffer of the model",
                                   "undo the hand edit, or recompile the pipeline with `ftc compile`") from None  # fmt: skip
        if tensors[0] is not tensors[1]:
            raise FtcError(f"{manifest}: \"tied\" lists {alias!r} with {first!r}, but the model holds them as two "
                           f"tensors ({list(tensors[0].shape)} and {list(tensors[1].shape)}): their gradients would be "
                           "summed across devices", "undo the hand edit, or recompile the pipeline with `ftc compile`")  # fmt: skip
    # The other way round: one parameter under several names held on several devices must be
    # tied, or its copies would train apart (a shared buffer nothing updates stays equal).
    names: dict[int, list[str]] = {}
    for name, tensor in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(tensor), []).append(name)
    devices: dict[str, set[int]] = {}
    for spec in pipeline.stages:
        for key in spec.state:
            devices.setdefault(key, set()).add(spec.device)
    for group in names.values():
        held = [name for name in group if name in devices]
        canonical = {pipeline.tied.get(name, name) for name in held}
        on = sorted(set().union(*(devices[name] for name in held)))
        if len(canonical) > 1 and len(on) > 1:
            raise FtcError(f"{manifest}: the model holds {' and '.join(map(repr, held))} as one tensor, on devices "
                           f"{on}, but \"tied\" does not list them "
                           "together: their gradients would not be summed, and the copies would train apart",
                           "undo the hand edit of \"tied\", or recompile the pipeline with `ftc compile`")  # fmt: skip


def _move(stages: dict[int, torch.nn.Module], device: torch.device) -> None:
    """Move every parameter and buffer to `device` once, keeping shared tensors shared: a
    parameter keeps its object (its .data moves), a buffer's every holder gets the same copy."""
    moved: dict[int, torch.Tensor] = {}
    held: list[torch.Tensor] = []  # keeps ids unique while moving
    for stage in stages.values():
        for module in stage.modules():
            for param in module._parameters.values():
                if param is not None and id(param) not in moved:
                    param.data = param.data.to(device)
                    moved[id(param)] = param
                    held.append(param)
            for name, buffer in module._buffers.items():
                if buffer is None:
                    continue
                if id(buffer) not in moved:
                    moved[id(buffer)] = buffer.to(device)
                    held.append(buffer)
                module._buffers[name] = moved[id(buffer)]


@dataclass
class _CheckpointEntries:
    """What a checkpoint file holds, read lazily: its keys, and each key's shape and tensor."""

    keys: set[str]
    shape: Callable[[str], tuple[int, ...]]
    tensor: Callable[[str], torch.Tensor]


def _read_checkpoint(path: Path) -> _CheckpointEntries:
    """A safetensors file (by its suffix) or a torch state_dict file, memory-mapped: only the
    tensors asked for are read."""
    try:
        if path.suffix == ".safetensors":
            source = safe_open(str(path), framework="pt", device="cpu")
            return _CheckpointEntries(
                set(source.keys()), lambda key: tuple(source.get_slice(key).get_shape()), source.get_tensor
            )
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message on a pickled object runs over a dozen lines about weights_only, with
        # terminal escapes, and suggests loading code from the file, which ftc never does.
        raise FtcError(
            f"checkpoint {path} holds objects other than tensors (a whole model saved with torch.save(model), "
            "say): ftc loads weights only",
            "save the weights alone: torch.save(model.state_dict(), path) or safetensors.torch.save_file",
        ) from exc
    except Exception as exc:
        raise FtcError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}",
            "pass a .safetensors file or a file written by torch.save(model.state_dict(), path)",
        ) from exc
    if not isinstance(state, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise FtcError(
            f"checkpoint {path} is not a state_dict (a mapping of names to tensors)",
            "save it with torch.save(model.state_dict(), path) or safetensors.torch.save_file",
        )
    return _CheckpointEntries(set(state), lambda key: tuple(state[key].shape), state.__getitem__)
