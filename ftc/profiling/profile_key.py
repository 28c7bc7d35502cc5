"""What a measured profile depends on: the key the profile cache (cache.py) files it under, from
the model file, the files beside it that it imports, the traced graph, the device and the
settings."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from types import FunctionType, ModuleType

import torch

from ftc.frontends.common import INSTALLED_PACKAGES
from ftc.ir import Graph, TensorMeta
from ftc.ir.serialize import node_to_dict, tensor_meta_to_dict
from ftc.runtime.model_file import MODULE_PREFIX, ModelFile

from .measurement import MeasureSettings


def device_name(device: str) -> str:
    """What the times were measured on, for the cache key and the compile output."""
    if device == "cuda":
        return f"cuda {torch.cuda.get_device_name()}"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return f"cpu {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"cpu {os.uname().machine}"


def profile_key(model_file: ModelFile, graph: Graph, settings: MeasureSettings) -> dict:
    """Everything a measured profile depends on; the cache files it under this key's sha256.
    The model file's digest misses an edit of a file it imports, or a library upgrade, that
    changes what runs; the traced graph's digest catches those, and the digests of the files
    beside the model file that it imports (local_sources) what the graph does not show of
    them: the loss they compute, a leaf's forward. What happens inside a leaf of an installed
    library is left: `--no-cache` after changing one."""
    by_name = graph.by_name()
    inputs = {}
    for name in graph.inputs:
        meta = by_name[name].meta
        inputs[name] = [meta.shape, meta.dtype] if isinstance(meta, TensorMeta) else None
    return {
        "model_sha256": model_file.digest(),
        "graph_sha256": graph_digest(graph),
        "inputs": inputs,
        "batch_size": graph.batch_size,
        "frontend": graph.frontend,
        "device": device_name(settings.device),
        "torch": torch.__version__,
        "settings": asdict(settings),
        "local_sources": local_sources(model_file),
    }


def local_sources(model_file: ModelFile) -> dict[str, str]:
    """The sha256 of each module the model file imports, directly or through another, from its
    own folder or package (a helper with its blocks or its loss), by path relative to that
    folder. An edit there that leaves the traced graph as it was (the loss the measured profile
    times, a LEAF_MODULES class's forward) read back the old profile. Not frontends.common's
    CodeFiles, on purpose: that tells whether a file a frame runs is the model's code, for
    naming lines (any file in the model file's folder, imported or not, and the installed
    files of the model's module classes); this lists the files to hash, found from the model
    file's imports (so an unrelated script beside it changes no key), up to the package that
    holds the model file, and none installed (the graph and torch's version key those)."""
    module = model_file.module
    folder = model_file.path.resolve().parent
    # A model file in a package is imported as "outer.inner.model": its package's modules sit
    # under the folder above "outer".
    depth = 0 if module.__name__.startswith(MODULE_PREFIX) else module.__name__.count(".")
    root = folder.parents[depth - 1] if depth else folder
    found: dict[str, str] = {}
    pending, seen = [module], {module.__name__}
    while pending:
        for value in vars(pending.pop()).values():
            if isinstance(value, ModuleType):
                name = value.__name__
            elif isinstance(value, (type, FunctionType)):
                name = value.__module__
            else:
                continue
            imported = sys.modules.get(name) if isinstance(name, str) else None
            if imported is None or name in seen:
                continue
            seen.add(name)
            source = _local_file(imported, root)
            if source is not None:
                found[source.relative_to(root).as_posix()] = hashlib.sha256(source.read_bytes()).hexdigest()
                pending.append(imported)
    return dict(sorted(found.items()))


def _local_file(module: ModuleType, root: Path) -> Path | None:
    """The file `module` was imported from, where it lies under `root` outside installed
    packages and hidden folders (a .venv); else None."""
    file = getattr(module, "__file__", None)
    if not file:
        return None
    path = Path(file).resolve()
    if not path.is_file() or not path.is_relative_to(root):
        return None
    parts = path.relative_to(root).parts
    return None if any(part in INSTALLED_PACKAGES or part.startswith(".") for part in parts) else path


def graph_digest(graph: Graph) -> str:
    """The sha256 of what the graph runs: each node's op, target, arguments, module, shapes and
    dtypes, and the model's state; not where in the source a node came from, nor its costs."""
    where_and_cost = ("source", "callers", "label", "cost", "stage")
    nodes = [{key: value for key, value in node_to_dict(node).items() if key not in where_and_cost} for node in graph.nodes]
    state = {name: [t.kind, tensor_meta_to_dict(t.meta)] for name, t in graph.state.items()}
    return hashlib.sha256(json.dumps([nodes, state], sort_keys=True).encode()).hexdigest()
