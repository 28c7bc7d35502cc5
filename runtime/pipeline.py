"""Loading a generated pipeline folder: the manifest (pipeline.json) and its stage classes."""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftc.ir import FtcError, strict_json

from .model_file import import_file

MANIFEST_FORMAT = "ftc-pipeline/1"


@dataclass
class StageSpec:
    index: int
    file: str
    class_name: str
    device: int
    inputs: list[str]
    outputs: list[str]
    state: list[str]
    recompute: bool


@dataclass
class Pipeline:
    folder: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def inputs(self) -> list[str]:
        return self.manifest["inputs"]

    @property
    def outputs(self) -> list[str]:
        return self.manifest["outputs"]

    @property
    def stages(self) -> list[StageSpec]:
        return [
            StageSpec(
                s["index"], s["file"], s["class"], s["device"], s["inputs"], s["outputs"], s["state"], s["recompute"]
            )
            for s in self.manifest["stages"]
        ]

    @property
    def tied(self) -> dict[str, str]:
        """Each tied alias's first name (`head.weight` -> `embed.weight`): one tensor under
        several state names. Pipelines written before ftc recorded ties have none."""
        return {name: group[0] for group in self.manifest.get("tied", []) for name in group[1:]}

    @property
    def planned_micro_batches(self) -> int:
        """The micro-batch count the compiler estimated memory for (pipeline.json's settings;
        one per stage for pipelines compiled before it was recorded)."""
        return self.manifest.get("settings", {}).get("micro_batches") or len(self.stages)

    @property
    def batch_range(self) -> tuple[int, int] | None:
        """The batch sizes forward works for (lowest, highest), where the compiler found them
        bounded; None: any."""
        sizes = self.manifest.get("batch_range")
        return (sizes[0], sizes[1]) if sizes is not None else None

    @property
    def packed_inputs(self) -> dict[str, float]:
        """Inputs with several rows per sample along their batch dimension (EmbeddingBag's flat
        indices, a flattened [B*T] token list), by rows per sample: a batch of them is not a
        stack of samples, and a micro-batch not a slice."""
        values, batch = self.manifest["values"], self.manifest["batch_size"]
        packed = {}
        for name in self.inputs:
            spec = values.get(name, {})
            dim = spec.get("batch_dim")
            if spec.get("kind") == "tensor" and dim is not None and spec["shape"][dim] != batch:
                packed[name] = spec["shape"][dim] / batch
        return packed

    @property
    def num_devices(self) -> int:
        """How many devices the stages are placed on (numbered 0..n-1, as load_pipeline checked)."""
        return len({s["device"] for s in self.manifest["stages"]})

    @property
    def model_file(self) -> Path:
        return (self.folder / self.manifest["model_file"]).resolve()

    def model_file_or(self, given: str | Path | None) -> Path:
        """The model file a command was given, else the one this pipeline was compiled from,
        which must still be where pipeline.json says (relative to the folder)."""
        if given:
            return Path(given)
        if not self.model_file.is_file():
            raise FtcError(f"{self.folder} was compiled from {self.model_file}, which does not exist (pipeline.json "
                           "names it relative to the folder: was the folder moved or copied?)",
                           "pass the model file: `ftc check --model FILE`, or the training config's \"model\" key "
                           "(--set model=FILE)")  # fmt: skip
        return self.model_file

    def stage_class(self, spec: StageSpec) -> type[torch.nn.Module]:
        path = self.folder / spec.file
        if not path.is_file():
            raise FtcError(f"{path}: stage file is missing", "recompile the pipeline with `ftc compile`")
        # Imported afresh each time: the file may have been edited by hand since.
        # A hand-edited stage may import a module of the user's from the folder, either way.
        module = import_file(path, f"ftc_stage.{self.name}", "stage", siblings=True, folder_package=True,
                             hint=f"fix the hand edit of {spec.file} and run `ftc check`, or recompile the pipeline "
                             "(`ftc compile ... --force` replaces edited stage files)")  # fmt: skip
        cls = getattr(module, spec.class_name, None)
        if cls is None:
            raise FtcError(f"{path}: defines no class {spec.class_name}", "keep the class name pipeline.json lists")
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            raise FtcError(f"{path}: {spec.class_name} is a {type(cls).__name__}, not a torch.nn.Module class",
                           "keep the stage class pipeline.json lists, a subclass of torch.nn.Module")  # fmt: skip
        _require_inputs_fit(path, cls, spec)
        return cls

    def as_compiled(self, spec: StageSpec) -> bool:
        """Whether the stage file is as the compile wrote it (its sha256 is pipeline.json's)."""
        recorded = next((stage.get("sha256") for stage in self.manifest["stages"] if stage["index"] == spec.index), None)
        path = self.folder / spec.file
        return recorded is not None and path.is_file() and hashlib.sha256(path.read_text().encode()).hexdigest() == recorded

    def output_shape_fix(self, spec: StageSpec) -> str:
        """The fix for a stage output of another shape than pipeline.json's: a hand edit's, or, in a
        stage as the compile wrote it, a shape the compile learned wrongly, which recompiling would
        learn again."""
        if not self.as_compiled(spec):
            return "keep stage outputs as pipeline.json lists them, or recompile with `ftc compile`"
        return (
            f"{spec.file} is as ftc wrote it, so recompiling gives the same shapes: the compile learns them without "
            "tensor values, and a LEAF_MODULES module that reads values runs then on stand-in inputs (random floats, "
            "integers all 0 or 1), with integer buffers ftc could not compute as 0, so an output size that follows "
            "such values came out as theirs; make the size independent of tensor values (pad or slice to a Python "
            "int, keep sizes in module attributes): a pipeline sends every value at the shape it compiled"
        )

    def assemble_output(self, values: dict[str, Any]) -> Any:
        """The model's output structure (a value, tuple, list or dict) from values by name."""
        structure = self.manifest["output_structure"]
        items = [values[name] for name in self.outputs]
        if structure["kind"] == "value":
            return items[0]
        if structure["kind"] == "dict":
            return dict(zip(structure["keys"], items))
        return items if structure["kind"] == "list" else tuple(items)


def load_pipeline(folder: str | Path) -> Pipeline:
    folder = Path(folder)
    manifest_path = folder / "pipeline.json"
    if not manifest_path.is_file():
        what = (
            "does not exist" if not folder.exists()
            else "is a file, not a folder" if folder.is_file()
            else "holds no pipeline.json"
        )  # fmt: skip
        # `ftc compile -o DIR` writes DIR/<name>/: DIR itself is the likely mistake.
        inside = sorted(sub for sub in folder.glob("*/pipeline.json")) if folder.is_dir() else []
        hint = (f"pass the pipeline folder inside it: {', '.join(str(p.parent) for p in inside[:3])}" if inside
                else "pass a folder written by `ftc compile` (`ftc compile MODEL.py -o DIR` writes DIR/<name>/)")  # fmt: skip
        raise FtcError(f"{folder} {what}", hint)
    try:
        manifest = strict_json(manifest_path.read_text())
    except ValueError as exc:
        raise FtcError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise FtcError(
            f"{manifest_path}: format {found!r} is not {MANIFEST_FORMAT!r}",
            "recompile the pipeline with this version of ftc",
        )
    validate_manifest(manifest, manifest_path)
    return Pipeline(folder, manifest)


_NAMES = "a list of value names"
_TOP_LEVEL = {
    "name": (str, "a string"), "model_file": (str, "a string"), "batch_size": (int, "a positive integer"),
    "inputs": (list, _NAMES), "outputs": (list, _NAMES), "output_structure": (dict, "an object"),
    "stages": (list, "a list of stages"), "values": (dict, "an object of value specs"),
}  # fmt: skip
_STAGE = {
    "index": (int, "the stage's position in the list"), "file": (str, "a file name"), "class": (str, "a class name"),
    "device": (int, "a device number"), "inputs": (list, _NAMES), "outputs": (list, _NAMES),
    "state": (list, "a list of parameter and buffer names"), "recompute": (bool, "true or false"),
}  # fmt: skip


def validate_manifest(manifest: dict, path: Path) -> None:
    """pipeline.json is written by `ftc compile` and may be edited by hand: every command that
    reads it first checks what they all rely on, so that a bad edit is named here, not met as
    a failure deep inside one of them."""

    def bad(where: str, what: str, hint: str = "undo the hand edit, or recompile the pipeline with `ftc compile`") -> FtcError:
        return FtcError(f"{path}: {where} {what}", hint)

    def check_keys(data: dict, keys: dict, where: str) -> None:
        for key, (kind, meaning) in keys.items():
            value = data.get(key)
            wrong = not isinstance(value, kind) or (kind is int and isinstance(value, bool))
            if kind is list and not wrong:
                wrong = key in ("inputs", "outputs", "state") and not all(isinstance(v, str) for v in value)
            if wrong or (key == "batch_size" and value < 1):
                raise bad(f"{where}key {key!r}", f"is {json.dumps(value) if key in data else 'missing'}; it must be {meaning}")

    check_keys(manifest, _TOP_LEVEL, "")
    structure = manifest["output_structure"]
    if structure.get("kind") not in ("value", "tuple", "list", "dict"):
        raise bad("key 'output_structure'", "must have kind \"value\", \"tuple\", \"list\" or \"dict\"")
    if structure["kind"] == "value" and len(manifest["outputs"]) != 1:
        raise bad("key 'output_structure'", f"is one value, but 'outputs' lists {len(manifest['outputs'])}")
    keys = structure.get("keys")
    if structure["kind"] == "dict" and not (
        isinstance(keys, list) and all(isinstance(k, str) for k in keys) and len(keys) == len(manifest["outputs"])
    ):
        raise bad("key 'output_structure'", f"is a dict, so its 'keys' must list {len(manifest['outputs'])} names, "
                  "one per output")  # fmt: skip
    tied = manifest.get("tied", [])
    if not isinstance(tied, list) or not all(
        isinstance(group, list) and len(group) > 1 and all(isinstance(n, str) for n in group) for group in tied
    ):
        raise bad("key 'tied'", f"is {json.dumps(tied)}; it must be a list of groups, each a list of two or more "
                  "names of one tensor")  # fmt: skip
    batch_range = manifest.get("batch_range", [1, 1])
    if not (
        isinstance(batch_range, list) and len(batch_range) == 2
        and all(isinstance(size, int) and not isinstance(size, bool) and size >= 1 for size in batch_range)
        and batch_range[0] <= batch_range[1]
    ):  # fmt: skip
        raise bad("key 'batch_range'", f"is {json.dumps(batch_range)}; it must be the lowest and highest batch size "
                  "forward works for, [low, high] with 1 <= low <= high")  # fmt: skip
    if not manifest["stages"]:
        raise bad("key 'stages'", "is empty")
    produced: dict[str, int] = {}
    available = set(manifest["inputs"])
    for position, stage in enumerate(manifest["stages"]):
        where = f"stage {position}:"
        if not isinstance(stage, dict):
            raise bad(where, "is not an object")
        check_keys(stage, _STAGE, f"{where} ")
        if stage["index"] != position:
            raise bad(f"{where} key 'index'", f"is {stage['index']}; stages are listed in order, so it must be {position}")
        if stage["device"] < 0:
            raise bad(f"{where} key 'device'", f"is {stage['device']}; devices are numbered from 0")
        unknown = [name for name in stage["inputs"] if name not in available]
        if unknown:
            raise bad(f"{where} inputs", f"{unknown} are neither model inputs nor outputs of an earlier stage")
        for name in stage["outputs"]:
            if name in produced:
                raise bad(f"{where} output {name!r}", f"is also an output of stage {produced[name]}")
            produced[name] = position
        available |= set(stage["outputs"])
    missing = [name for name in manifest["outputs"] if name not in available]
    if missing:
        raise bad("key 'outputs'", f"lists {missing}, which no stage returns")
    devices = sorted({stage["device"] for stage in manifest["stages"]})
    if devices != list(range(len(devices))):
        raise bad("stages' devices", f"are {devices}; they must be numbered 0..{len(devices) - 1}")
    unspecified = [name for name in [*manifest["inputs"], *produced] if name not in manifest["values"]]
    if unspecified:
        example = next(iter(manifest["values"].items()), None)
        like = f" (like {json.dumps({example[0]: example[1]})})" if example else ""
        raise bad("key 'values'", f"lacks the specs of {unspecified}",
                  f"a value a stage sends needs one: add \"{unspecified[0]}\" to \"values\" with its shape at batch size "
                  f"{manifest['batch_size']}, dtype, batch_dim and requires_grad{like}; or undo the hand edit")  # fmt: skip
    for name, spec in manifest["values"].items():
        problem = _spec_problem(spec)
        if problem:
            raise bad(f"value {name!r}", problem)
    for position, stage in enumerate(manifest["stages"]):
        cost = stage.get("cost", {})
        for key in ("fwd_time", "bwd_time"):
            value = cost.get(key, 0.0) if isinstance(cost, dict) else None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise bad(f"stage {position}: cost {key!r}", f"is {json.dumps(value)}; it must be a time in seconds, 0 or more")


_SCALARS = ("int", "bool", "float")
_SEQUENCES = ("tuple", "list", "size")


def _spec_problem(spec: Any) -> str:
    """What is wrong with a value spec (runtime/comm.py reads them to size receive buffers), or ""."""
    if not isinstance(spec, dict) or spec.get("kind") not in ("tensor", *_SCALARS, *_SEQUENCES, "object"):
        return f"has kind {json.dumps(spec.get('kind') if isinstance(spec, dict) else spec)}; it must be one of " \
               f"tensor, {', '.join((*_SCALARS, *_SEQUENCES))}, object"  # fmt: skip
    if spec["kind"] in _SEQUENCES:
        items = spec.get("items")
        if not isinstance(items, list):
            return "is a sequence without a list of 'items'"
        return next((problem for problem in map(_spec_problem, items) if problem), "")
    if spec["kind"] != "tensor":
        return ""
    shape, dtype, batch_dim = spec.get("shape"), spec.get("dtype"), spec.get("batch_dim", "missing")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"has shape {json.dumps(shape)}; it must be a list of sizes"
    if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
        return f"has dtype {json.dumps(dtype)}; it must name a torch dtype (float32, int64, ...)"
    if batch_dim is not None and not (isinstance(batch_dim, int) and not isinstance(batch_dim, bool) and 0 <= batch_dim < len(shape)):
        return f"has batch_dim {json.dumps(batch_dim)}; it must be null or a dimension of its shape {shape}"
    others = spec.get("other_batch_dims", [])
    if not (isinstance(others, list) and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < len(shape)
                                             and d != batch_dim for d in others)
            and (batch_dim is not None or not others)):  # fmt: skip
        return (f"has other_batch_dims {json.dumps(others)}; it must be a list of dimensions of its shape {shape} "
                "other than batch_dim, and empty where batch_dim is null")
    if not isinstance(spec.get("requires_grad"), bool):
        return f"has requires_grad {json.dumps(spec.get('requires_grad'))}; it must be true or false"
    return ""


def check_stage_outputs(spec: StageSpec, outputs: Any) -> None:
    """A stage's forward must return a tuple of the values pipeline.json lists (hand edits may not)."""
    if not isinstance(outputs, tuple) or len(outputs) != len(spec.outputs):
        raise FtcError(
            f"{spec.file}: forward returned {type(outputs).__name__}"
            f"{f' of {len(outputs)}' if isinstance(outputs, tuple) else ''}; pipeline.json lists "
            f"{len(spec.outputs)} outputs {spec.outputs}",
            "return a tuple of the values pipeline.json lists, in order",
        )


def _require_inputs_fit(path: Path, cls: type[torch.nn.Module], spec: StageSpec) -> None:
    """A forward hand-edited to take other parameters than pipeline.json's inputs fails only once
    a micro-batch reaches it, where it reads like bad data; name the mismatch as the stage loads."""
    try:
        signature = inspect.signature(cls.forward)
    except (TypeError, ValueError):  # a forward inspect cannot read (a C extension's): it runs as it is
        return
    try:
        signature.bind(None, *spec.inputs)
    except TypeError:
        taken = [name for name in signature.parameters][1:]
        raise FtcError(
            f"{path}: {spec.class_name}.forward takes ({', '.join(taken)}), but pipeline.json gives stage {spec.index} "
            f"the inputs {spec.inputs}, in that order",
            "give forward one parameter per input in pipeline.json's order, or change the stage's \"inputs\" there "
            "with the earlier stage's \"outputs\" (or undo the hand edit)",
        ) from None
