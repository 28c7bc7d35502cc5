"""Writes a generated pipeline folder (DESIGN.md, "Generated-folder contract"):

    DIR/<name>/pipeline.json   the manifest the runtime reads
    DIR/<name>/ir.json         the annotated IR the stages came from
    DIR/<name>/stage<k>.py     one standalone module per stage
    DIR/<name>/__init__.py     imports the stages, so the folder is a package

Same IR in, same bytes out: nothing depends on time, absolute paths or dict order. The manifest
records each stage file's sha256 and its own, so a later compile can tell the files users edit by
hand (stages, and pipeline.json's device map, recompute flags, ...) and refuse to overwrite them
without --force; files in the folder that ftc did not write (the user's own stage2.py, say) are
never overwritten without it either. A compile writes every file to a temporary first and then
renames them all into place with Ctrl-C and termination signals held back, pipeline.json last, so
an interrupted compile leaves the folder as the last one wrote it, not half new.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ftc.ir import FtcError, Graph, TensorMeta, dumps, meta_nbytes, strict_json
from ftc.ir.graph import ScalarMeta, SeqMeta
from ftc.passes.partition.problem import Problem

from .codegen import render_package_init, render_stages
from .plan import StagePlan, plan_stages

MANIFEST_FORMAT = "ftc-pipeline/1"
# The manifest's own sha256: pipeline.json is edited by hand too, and a recompile must not lose that.
MANIFEST_DIGEST = "manifest_sha256"
# The sha256s of the folder's other files ftc writes (the package __init__.py, ir.json), which a
# recompile must not overwrite either when they were edited by hand.
FILE_DIGESTS = "files_sha256"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def manifest_text(manifest: dict) -> str:
    return json.dumps(manifest, indent=1) + "\n"


def manifest_digest(manifest: dict) -> str:
    """The sha256 of the manifest as ftc writes it, less its own digest. Taken over the parsed
    content (json round-trips it exactly), so only a change of content counts as an edit."""
    return sha256(manifest_text({key: value for key, value in manifest.items() if key != MANIFEST_DIGEST}))


def previous_manifest(folder: Path) -> dict:
    """The manifest the last compile into `folder` wrote ({} for a new folder)."""
    manifest_path = folder / "pipeline.json"
    if not manifest_path.is_file():
        if any(folder.glob("stage*.py")) or (folder / "__init__.py").is_file():
            raise FtcError(
                f"{folder} holds stage files but no pipeline.json, so hand edits cannot be told apart",
                "copy away what you want to keep, then remove the folder or pass --force to overwrite it",
            )
        return {}
    try:
        manifest = strict_json(manifest_path.read_text())
    except ValueError:
        manifest = None
    stages = manifest.get("stages") if isinstance(manifest, dict) else None
    readable = isinstance(stages, list) and all(
        isinstance(stage, dict) and isinstance(stage.get("file"), str) for stage in stages
    )
    if not readable:
        raise FtcError(
            f"{manifest_path} is not a manifest ftc wrote, so hand edits cannot be told apart",
            "copy away what you want to keep, then remove the folder or pass --force to overwrite it",
        )
    return manifest


def edited_files(folder: Path, manifest: dict) -> list[str]:
    """The files in `folder` that differ from the digests in the manifest the last compile wrote.
    A stage listed without a digest was added by hand; a manifest without its own digest was
    written before ftc recorded one, so it cannot be told apart and passes."""
    edited = [
        stage["file"]
        for stage in manifest.get("stages", [])
        if (folder / stage["file"]).is_file() and sha256((folder / stage["file"]).read_text()) != stage.get("sha256")
    ]
    recorded = manifest.get(MANIFEST_DIGEST)
    if recorded is not None and recorded != manifest_digest(manifest):
        edited.append("pipeline.json")
    others = manifest.get(FILE_DIGESTS)
    for name, digest in (others.items() if isinstance(others, dict) else ()):
        if name in ("__init__.py", "ir.json") and (folder / name).is_file() and sha256((folder / name).read_text()) != digest:
            edited.append(name)
    return sorted(edited)


def foreign_files(folder: Path, manifest: dict, names: list[str]) -> list[str]:
    """Those of `names` (the files a compile is about to write) that exist in `folder` but that
    the last compile into it did not write: the user's own (a stage2.py of theirs beside a
    2-stage pipeline). Without a manifest, every one of them is."""
    if not manifest:
        ours: set[str] = set()
    else:
        ours = {"pipeline.json", "__init__.py", "ir.json"} | {stage["file"] for stage in manifest.get("stages", [])}
    return sorted(name for name in names if (folder / name).exists() and name not in ours)


def stale_stage_files(manifest: dict, written: dict[str, str]) -> list[str]:
    """Stage files the last compile wrote that this one does not. Only names ftc gives stage files
    count: a hand-edited manifest may list any path, and --force must not delete it."""
    listed = {stage["file"] for stage in manifest.get("stages", [])}
    return sorted(file for file in listed - set(written) if re.fullmatch(r"stage\d+\.py", file))


def value_spec(meta) -> dict:
    """How a value that crosses stages looks, for the runtime's receive buffers."""
    if isinstance(meta, TensorMeta):
        return {
            "kind": "tensor",
            "shape": meta.shape,
            "dtype": meta.dtype,
            "batch_dim": meta.batch_dim,
            "requires_grad": meta.requires_grad,
        } | ({"other_batch_dims": meta.other_batch_dims} if meta.other_batch_dims else {})
    if isinstance(meta, ScalarMeta):
        return {"kind": meta.type, "batch_dependent": meta.batch_dependent}
    if isinstance(meta, SeqMeta):
        return {"kind": meta.type, "items": [value_spec(item) for item in meta.items]}
    return {"kind": "object"}


def stage_costs(graph: Graph, problem: Problem, plans: list[StagePlan], recompute: list[bool]) -> list[dict]:
    """Predicted per-stage figures for the manifest and the CLI table: time (compute,
    communication and the re-forward of a recomputing stage) and memory (bytes, memory.py)."""
    by_name = graph.by_name()
    state_bytes = {name: t.meta.nbytes for name, t in graph.state.items()}
    stage_of = np.array([by_name[name].stage for name in problem.ops])
    rows = []
    for plan in plans:
        members = stage_of == plan.index
        parameters = [graph.state[name] for name in plan.state if graph.state[name].kind == "parameter"]
        memory = problem.stage_memory(members, plan.index, len(plans), recompute[plan.index])
        fixed = problem.fixed(members)  # the stage call, and the loss on the last stage
        device = np.isin(stage_of, [other.index for other in plans if other.device == plan.device])
        comm_fwd, comm_bwd = problem.member_comm(members, device)
        rows.append(
            {
                "ops": len(plan.nodes),
                "parameters": sum(math.prod(t.meta.shape) for t in parameters),
                "parameter_bytes": sum(state_bytes[name] for name in plan.state),
                "fwd_flops": sum(n.cost.fwd_flops for n in plan.nodes),
                "bwd_flops": sum(n.cost.bwd_flops for n in plan.nodes),
                "fwd_time": sum(n.cost.fwd_time for n in plan.nodes) + fixed.fwd,
                "bwd_time": sum(n.cost.bwd_time for n in plan.nodes) + fixed.bwd,
                "bytes_in": sum(meta_nbytes(by_name[name].meta) for name in plan.inputs),
                "bytes_out": sum(meta_nbytes(by_name[name].meta) for name in plan.outputs),
                "predicted_time": problem.stage_time(members, recompute[plan.index], device),
                "recompute_time": problem.recompute_time(members, recompute[plan.index]),
                "comm_fwd_time": comm_fwd,
                "comm_bwd_time": comm_bwd,
                "memory": memory.to_json(),
            }
        )
    return rows


def write_pipeline(
    graph: Graph,
    problem: Problem,
    out_dir: str | Path,
    model_file: str | Path,
    method: str,
    settings: dict,
    force: bool = False,
    recompute: list[bool] | None = None,
) -> tuple[Path, dict]:
    """Write the stage modules, ir.json and pipeline.json into out_dir/<name>; return that
    folder and the manifest. `recompute`: which stages recompute (None: none does)."""
    folder = Path(out_dir) / graph.name
    try:
        previous = previous_manifest(folder)
    except FtcError:
        if not force:
            raise
        previous = {}
    edited = edited_files(folder, previous)
    if edited and not force:
        raise FtcError(
            f"{folder}: files were edited by hand since ftc wrote them: {', '.join(edited)}",
            "to keep your edits, copy these files elsewhere or compile into another folder (-o); "
            "to overwrite them, pass --force",
        )
    plans = plan_stages(graph)
    names = [f"stage{plan.index}.py" for plan in plans] + ["__init__.py", "ir.json", "pipeline.json"]
    foreign = foreign_files(folder, previous, names) if not force else []
    if foreign:
        raise FtcError(
            f"{folder}: {', '.join(foreign)} {'was' if len(foreign) == 1 else 'were'} not written by ftc's last compile "
            "into this folder, and this compile would overwrite "
            f"{'it' if len(foreign) == 1 else 'them'}",
            "move your files elsewhere or compile into another folder (-o); to overwrite them, pass --force",
        )
    folder.mkdir(parents=True, exist_ok=True)
    model_rel = Path(os.path.relpath(Path(model_file).resolve(), folder.resolve())).as_posix()
    recompute = recompute or [False] * len(plans)
    costs = stage_costs(graph, problem, plans, recompute)
    sources = render_stages(graph, plans, model_rel)
    stage_sources = {f"stage{plan.index}.py": source for plan, source in zip(plans, sources)}
    position = {node.name: k for k, node in enumerate(graph.nodes)}
    # Every value the runtime handles: what crosses stages, and the model's inputs and outputs
    # (an input no stage reads, or one returned as an output, still comes from the data).
    handled = {name for plan in plans for name in plan.inputs + plan.outputs}
    handled |= set(graph.inputs) | {ref.name for ref in graph.outputs.values}
    crossing = sorted(handled, key=position.__getitem__)
    by_name = graph.by_name()
    device_times: dict[int, float] = {}
    for plan, row in zip(plans, costs):
        device_times[plan.device] = device_times.get(plan.device, 0.0) + row["predicted_time"]
    times = [device_times[device] for device in sorted(device_times)]
    stage_of = np.array([by_name[name].stage for name in problem.ops])
    device_memory = [
        sum(row["memory"]["total"] for plan, row in zip(plans, costs) if plan.device == device)
        - problem.footprint.shared_bytes([stage_of == plan.index for plan in plans if plan.device == device])
        for device in sorted(device_times)
    ]
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": graph.name,
        "model_file": model_rel,
        "model_file_sha256": hashlib.sha256(Path(model_file).read_bytes()).hexdigest(),
        "frontend": graph.frontend,
        "batch_size": graph.batch_size,
        "method": method,
        "settings": settings,
        "inputs": graph.inputs,
        "outputs": [ref.name for ref in graph.outputs.values],
        "output_structure": {"kind": graph.outputs.kind, "keys": graph.outputs.keys},
        "num_devices": len(set(graph.stage_devices)),
        "tied": tied_groups(graph),
        **({"batch_range": list(graph.batch_range)} if graph.batch_range is not None else {}),
        "stages": [
            {
                "index": plan.index,
                "file": f"stage{plan.index}.py",
                "class": f"Stage{plan.index}",
                "sha256": sha256(stage_sources[f"stage{plan.index}.py"]),
                "device": plan.device,
                "inputs": plan.inputs,
                "outputs": plan.outputs,
                "state": plan.state,
                "recompute": recompute[plan.index],
                "cost": cost,
            }
            for plan, cost in zip(plans, costs)
        ],
        "values": {name: value_spec(by_name[name].meta) for name in crossing},
        "predicted": {
            "device_times": times,
            "bottleneck_time": max(times),
            "balance": max(times) / (sum(times) / len(times)),
            # the stages of each device the figures below are for (a device map edited by hand
            # makes them another device's)
            "device_stages": [
                [plan.index for plan in plans if plan.device == device] for device in sorted(device_times)
            ],
            # a tensor several stages of one device read is counted once
            "device_memory": device_memory,
            "device_parameters": [
                sum(math.prod(graph.state[key].meta.shape) for key in {k for plan in plans if plan.device == device
                    for k in plan.state} if graph.state[key].kind == "parameter")
                for device in sorted(device_times)
            ],  # fmt: skip
        },
    }
    package = {"__init__.py": render_package_init(graph, plans), "ir.json": dumps(graph)}
    manifest[FILE_DIGESTS] = {name: sha256(text) for name, text in package.items()}
    manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
    files = {**stage_sources, **package, "pipeline.json": manifest_text(manifest)}
    write_files(folder, files, stale_stage_files(previous, files))
    return folder, manifest


def tied_groups(graph: Graph) -> list[list[str]]:
    """The state names of each tensor known under several names (`head.weight = embed.weight`),
    first name first: stages on other devices hold separate copies the runtime keeps equal."""
    groups: dict[str, list[str]] = {}
    for name, tensor in graph.state.items():
        if tensor.alias_of is not None:
            groups.setdefault(tensor.alias_of, [tensor.alias_of]).append(name)
    return [groups[first] for first in sorted(groups)]


def write_files(folder: Path, files: dict[str, str], stale: list[str]) -> None:
    """Write `files` (name -> text) into `folder` and remove the `stale` ones, as one step as far
    as Ctrl-C goes: every file goes to a temporary first (an interruption there removes them and
    leaves the folder as it was), then all are renamed into place, pipeline.json last, with
    SIGINT, SIGTERM and SIGHUP held back until the folder is whole."""
    temporaries: dict[str, Path] = {}
    try:
        for name, text in files.items():
            temporary = folder / f".{name}.tmp"
            temporaries[name] = temporary
            temporary.write_text(text)
        with signals_held():
            for name in sorted(files, key=lambda name: name == "pipeline.json"):
                os.replace(temporaries.pop(name), folder / name)
            for name in stale:
                (folder / name).unlink(missing_ok=True)
    finally:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)


@contextmanager
def signals_held():
    """Hold SIGINT, SIGTERM and SIGHUP back while the block runs, then deliver the first that
    came (Ctrl-C then raises KeyboardInterrupt after the block, not inside it). Outside the main
    thread, where Python cannot set handlers, the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    # A handler installed outside Python (None here) could not be put back: that signal is left be.
    caught = [signum for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if signal.getsignal(signum) is not None]
    previous = {signum: signal.signal(signum, lambda signum, _frame: held.append(signum)) for signum in caught}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if held:
            signal.raise_signal(held[0])
