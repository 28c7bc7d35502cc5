"""Loading a generated pipeline folder: the manifest (pipeline.json) and its stage classes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftc.ir import FtcError

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
    def num_devices(self) -> int:
        """How many devices the stages are placed on; they must be numbered 0..n-1."""
        devices = sorted({s["device"] for s in self.manifest["stages"]})
        if devices != list(range(len(devices))):
            raise FtcError(
                f"{self.folder}/pipeline.json places stages on devices {devices}; "
                f"they must be numbered 0..{len(devices) - 1}",
                "renumber the stages' devices",
            )
        return len(devices)

    @property
    def model_file(self) -> Path:
        return (self.folder / self.manifest["model_file"]).resolve()

    def stage_class(self, spec: StageSpec) -> type[torch.nn.Module]:
        path = self.folder / spec.file
        if not path.is_file():
            raise FtcError(f"{path}: stage file is missing", "recompile the pipeline with `ftc compile`")
        # Imported afresh each time: the file may have been edited by hand since.
        module = import_file(path, f"ftc_stage.{self.name}", "stage")
        cls = getattr(module, spec.class_name, None)
        if cls is None:
            raise FtcError(f"{path}: defines no class {spec.class_name}", "keep the class name pipeline.json lists")
        return cls

    def assemble_output(self, values: dict[str, Any]) -> Any:
        """The model's output structure (a value, tuple or dict) from values by name."""
        structure = self.manifest["output_structure"]
        items = [values[name] for name in self.outputs]
        if structure["kind"] == "value":
            return items[0]
        if structure["kind"] == "dict":
            return dict(zip(structure["keys"], items))
        return tuple(items)


def load_pipeline(folder: str | Path) -> Pipeline:
    folder = Path(folder)
    manifest_path = folder / "pipeline.json"
    if not manifest_path.is_file():
        raise FtcError(
            f"{folder} holds no pipeline.json",
            "pass a folder written by `ftc compile` (generated/<name>)",
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as exc:
        raise FtcError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != MANIFEST_FORMAT:
        raise FtcError(
            f"{manifest_path}: format {manifest.get('format')!r} is not {MANIFEST_FORMAT!r}",
            "recompile the pipeline with this version of ftc",
        )
    return Pipeline(folder, manifest)


def check_stage_outputs(spec: StageSpec, outputs: Any) -> None:
    """A stage's forward must return a tuple of the values pipeline.json lists (hand edits may not)."""
    if not isinstance(outputs, tuple) or len(outputs) != len(spec.outputs):
        raise FtcError(
            f"{spec.file}: forward returned {type(outputs).__name__}"
            f"{f' of {len(outputs)}' if isinstance(outputs, tuple) else ''}; pipeline.json lists "
            f"{len(spec.outputs)} outputs {spec.outputs}",
            "return a tuple of the values pipeline.json lists, in order",
        )
