"""Measured profile: every node's forward and backward time and the activation memory it keeps,
timed on real tensors at the compile batch size.

Two ways to run, both node by node with the IR interpreter:

- in context (the default): the real model is built on the device and the whole graph runs
  forward, then backward from all floating outputs, `warmup + repeats` times. Forward time is
  the clock around each node; backward time is attributed through post hooks on the autograd
  nodes each IR node created: the engine runs them one after another, so the time from one
  hook to the next belongs to the node whose hook fired, engine bookkeeping included, less
  the cost of a hook itself (calibrated on a chain of cheap ops), and less one engine start
  for the first (the whole model's backward starts the engine once; every stage pays its own
  start, in the stage call below). So a stage's predicted time, the sum of its nodes' times
  and one stage call, is what running that stage forward and backward costs, with the caches
  as warm as in training and the engine's per-node overhead, which a node timed alone on its
  cut inputs would not give (each such backward pays a whole engine start).
- save-memory (FTPipe's mode, for models larger than the device): the model stays on the meta
  device; each node gets only the parameters it reads materialized on the device (values from
  `initial_state`, good for timing), runs forward and its own backward on inputs cut from the
  graph, and its outputs go back to the host, where all activations live (views and in-place
  writes keep sharing memory there as in the model, so the values are the model's). Each
  backward then pays one engine start, which a stage pays once; the start of a trivial
  backward, measured the same way, is subtracted.

Beside the nodes, both modes time what every stage pays once (Graph.stage_cost): calling a
stage module whose forward returns a view of its input, and its backward, which starts the
engine; and the training loss (Graph.loss_cost), the model file's loss_fn on the model's
outputs cut from the graph, with a target made as the runtime's data sets make one
(ftc/profiling/loss.py), forward and backward (less an engine start), as the last stage runs it.

The parts: measurement.py (settings and results), in_context.py and save_memory.py (the two
modes), time_alone.py (a node timed alone), saved_bytes.py (activation memory), clock.py,
calibration.py (the fixed costs subtracted or charged per stage), profile_key.py (what a profile
depends on) and cache.py (profiles on disk).
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Any

import torch
from torch.utils._pytree import tree_map

from ftc.ir import Cost, FtcError, Graph
from ftc.repeats import tensors_in
from ftc.runtime.mode import train_model
from ftc.runtime.model_file import ModelFile
from ftc.runtime.seeding import seed_generators

from . import calibration
from .cache import ProfileCache
from .clock import Clock
from .in_context import InContext
from .loss import as_leaves, loss_target
from .measurement import MeasureSettings, Measurement, NodeProfile
from .profile_key import profile_key
from .save_memory import SaveMemory, wants_save_memory


def profile_measured(
    graph: Graph,
    model_file: ModelFile,
    meta_model: torch.nn.Module,
    settings: MeasureSettings,
    cache: ProfileCache | None = None,
) -> tuple[Graph, str]:
    """The graph with measured costs, read from `cache` when it holds them (measured and stored
    otherwise), and a line for the compile output that says which."""
    settings.check()
    key = profile_key(model_file, graph, settings)
    where = f"{key['device']}, {settings.threads} thread{'s' if settings.threads > 1 else ''}"
    if settings.device == "cuda":
        where = key["device"]
    if cache is not None:
        entries = cache.load(key)
        if entries is not None:
            try:
                cached = Measurement.from_json(entries, wants_save_memory(graph, settings))
                return apply_profile(graph, cached), f"profile: read from the cache {cache.path(key)} ({where})"
            except (FtcError, KeyError, TypeError, ValueError, AttributeError):
                pass  # an entry missing or malformed: measure again and overwrite it
    measurement = measure(graph, model_file, meta_model, settings)
    mode = "save-memory mode, one node at a time" if measurement.save_memory else "in context"
    note = f"profile: measured on {where} ({mode}, median of {settings.repeats})"
    if cache is not None:
        path = cache.store(key, measurement.to_json())
        note += f", cached in {path}"
    return apply_profile(graph, measurement), note


def measure(graph: Graph, model_file: ModelFile, meta_model: torch.nn.Module, settings: MeasureSettings) -> Measurement:
    """Time every compute node of `graph` on real tensors of the compile batch size."""
    settings.check()
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        seed_generators(0)
        clock = Clock(settings)
        if wants_save_memory(graph, settings):
            batch = model_file.inputs(graph.batch_size)  # on the host; nodes move what they read
            measurement = SaveMemory(graph, meta_model, settings).measure(batch)
        else:
            model = model_file.build(settings.device)
            # Timed in the mode training runs it in (the model's own train(), an override included).
            train_model(model, True)
            batch = model_file.inputs(graph.batch_size, settings.device)
            measurement = InContext(graph, model, settings).measure(batch)
        measurement.stage_call = calibration.stage_call(clock, settings.device)
        measurement.loss = _time_loss(model_file, measurement.outputs, graph.batch_size, settings, clock)
        return measurement
    finally:
        torch.set_num_threads(threads)


def apply_profile(graph: Graph, measurement: Measurement) -> Graph:
    """Write measured times and activation memory into the compute nodes' Cost, and the stage
    call's and the loss's times into the graph's (FLOPs and parameter bytes stay as the
    analytic profile counted them)."""
    nodes = measurement.nodes
    missing = [node.name for node in graph.nodes if node.is_compute and node.name not in nodes]
    if missing:
        raise FtcError(f"the measured profile lacks nodes {missing[:5]}", "measure again with --no-cache")
    updated = []
    for node in graph.nodes:
        if node.is_compute:
            profile = nodes[node.name]
            cost = replace(node.cost, fwd_time=profile.fwd_time, bwd_time=profile.bwd_time,
                           peak_memory=profile.peak_memory, transient_memory=profile.transient_memory)  # fmt: skip
            node = replace(node, cost=cost)
        updated.append(node)
    stage_cost = Cost(fwd_time=measurement.stage_call.fwd_time, bwd_time=measurement.stage_call.bwd_time)
    loss_cost = None
    if measurement.loss is not None:
        counted = graph.loss_cost or Cost()
        loss_cost = replace(counted, fwd_time=measurement.loss.fwd_time, bwd_time=measurement.loss.bwd_time)
    kind_costs = {kind: Cost(fwd_time=p.fwd_time, bwd_time=p.bwd_time) for kind, p in measurement.kinds.items()}
    return replace(graph, nodes=updated, stage_cost=stage_cost, loss_cost=loss_cost, kind_costs=kind_costs)


def _time_loss(
    model_file: ModelFile,
    outputs: Any,
    batch_size: int,
    settings: MeasureSettings,
    clock: Clock,
) -> NodeProfile | None:
    """loss_fn on the model's outputs, forward and backward to the outputs, as the last stage
    runs it: medians over the repeats after warm-up, the backward less an engine start (the
    stage call has it). None when there is no loss (ftc/profiling/loss.py)."""
    leaves = as_leaves(tree_map(lambda t: t.to(settings.device) if isinstance(t, torch.Tensor) else t, outputs))
    target = loss_target(model_file, leaves, batch_size, settings.device)
    if target is None:
        return None
    inputs = [t for t in tensors_in(leaves) if t.requires_grad]
    fwd, bwd = [], []
    for run in range(settings.warmup + settings.repeats):
        clock.sync()
        start = clock.stamp()
        loss = model_file.loss_fn(leaves, target)
        forward_end = clock.stamp()
        engine_start = calibration.engine_start(clock, settings.device, calibration.RUN_TRIES)
        middle = clock.stamp()
        torch.autograd.grad(loss, inputs, allow_unused=True)
        end = clock.stamp()
        clock.sync()
        if run >= settings.warmup:
            fwd.append(clock.seconds(start, forward_end))
            bwd.append(max(clock.seconds(middle, end) - engine_start, 0.0))
    return NodeProfile(statistics.median(fwd), statistics.median(bwd))


__all__ = ["apply_profile", "measure", "profile_measured"]
