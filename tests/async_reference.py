"""The truth for schedule "async": PipeDream-style asynchronous pipeline training, written in
plain PyTorch on the ORIGINAL model, with no ftc engine, stage module or staleness code.

From ftc it takes only what defines the run, not how the pipeline executes it: the config
(ftc.runtime.config), the initial weights as mode "single" builds them (reference.build_single), the
data (datasets.build_dataset, Sampler, load_batch), the optimizer's settings (optim.build_optimizer),
the learning-rate schedule (optim.lr_factor), the global order of a segment's actions (the
textbook 1F1B order, from ftc's simulator: schedule.simulate with policy IN_ORDER, as the
definition of that order, not of what happens in it), and from the compiled pipeline.json which
stage holds which parameter, the tied aliases ("tied"), the stages' devices and costs.

The semantics (staleness.predict and staleness.gap_aware false):

- Mt = micro_batches * step_every micro-batches make one optimizer step.
- Steps are grouped into segments; a segment ends after (1-based) step `done` when
  done % flush_every == 0, or checkpoint.every > 0 and done % checkpoint.every == 0, or
  done == steps. The pipeline is empty between segments.
- In a segment of K steps starting at step t0, micro-batches g = 0 .. n - 1 (n = K * Mt): g
  belongs to step t0 + g // Mt and is piece g % M (tensor.chunk(M) along dim 0, inputs and
  targets) of data batch t0 * step_every + g // M.
- The segment's global order: simulate(stages, n, "1f1b", costs, outputs, policy=IN_ORDER)'s
  actions, positions 0, 1, ...; costs = {stage: (fwd_time, bwd_time + fwd_time if the stage
  recomputes)} from pipeline.json's stage costs, or None where a stage lacks them (as
  Engine._costs).
- A parameter's canonical key: the first name of its pipeline.json "tied" group, or its name. A
  stage holds a key when the key or an alias of it is in its "state". Keys are grouped by the
  set of stages holding them (one stage for most; the embedding's and the head's stages for a
  tied embedding and LM head). Group G's update for step t0 + k is applied at position
  p(G, k) = max over its stages h of the position of B(h, (k + 1) * Mt - 1): one optimizer step
  of G's parameters on the sum, over all holders and all Mt micro-batches of the step, of
  d(loss_g / Mt) / d(the value the holder used), with lr = optimizer.lr * lr_factor(step, ...).
  For a stage's own parameters that is right after its backward of the step's last micro-batch,
  which in a chain of one stage per device is the closed form: stage i of P (depth d = P - i)
  runs g on its weights after max(0, (g - d + 1) // Mt) of the segment's updates.
- The forward F(s, g), and its backward (weight stashing), use every parameter of stage s as it
  is after all updates applied at positions before F(s, g)'s (and all earlier segments'). So the
  two stages of a tied pair may run the same micro-batch on different versions of the tensor:
  the model runs with torch.func.functional_call(..., tie_weights=False), each alias name given
  the value its own stage sees. A parameter read under ONE name by two stages cannot be given
  two values so; the reference refuses such a pipeline.
- A step's loss: the mean of its Mt micro-batch losses (the loss function's value, unscaled).

How it computes that: it walks each segment's global order once, keeping every key's current
value (a fresh tensor after each update, so the values a forward recorded stay as they were). At
F(s, g) it records the values of stage s's names for g; once every stage has forwarded g (the
loss stage's forward, in a chain), it runs g's forward and backward on the original model with
those values and adds the gradients to g's step's sums by key; after each action it applies the
updates due at its position. A B action never precedes the forwards of its micro-batch, so every
gradient an update needs exists by then (asserted).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_unflatten

from ftc.runtime.config import Config
from ftc.runtime.data import Sampler, load_batch, output_specs, synthetic_targets
from ftc.runtime.datasets import build_dataset
from ftc.runtime.model_file import load_model_file
from ftc.runtime.optim import build_optimizer, lr_factor
from ftc.runtime.pipeline import Pipeline, load_pipeline
from ftc.runtime.schedule import BACKWARD, FORWARD, IN_ORDER, Action, simulate
from ftc.runtime.seeding import seeded
from ftc.runtime.reference import build_single


@dataclass
class ReferenceRun:
    losses: list[float]  # per optimizer step, steps 0 .. steps-1
    state: dict[str, torch.Tensor]  # the final state_dict of the original model
    stale_forwards: int = 0  # (stage, micro-batch) forwards that ran on a parameter older than their step's
    # per micro-batch, all segments in order: stage -> the version (updates applied) of its own
    # parameters (those no other stage holds) its forward used
    versions_used: list[dict[int, int]] = field(default_factory=list)
    # the same for parameters several stages hold: (stage, canonical key) -> the version that stage used
    shared_versions_used: list[dict[tuple[int, str], int]] = field(default_factory=list)
    segment_states: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # segment end step -> state_dict


def stage_parameters(pipeline: Path, parameter_names: list[str]) -> list[list[str]]:
    """The parameter names (tied aliases included) each stage holds, stages in chain order
    (pipeline.json's index); every name in exactly one stage: one name read by several stages
    could not be given each stage's own version."""
    manifest = json.loads((Path(pipeline) / "pipeline.json").read_text())
    stages = sorted(manifest["stages"], key=lambda stage: stage["index"])
    names = set(parameter_names)
    held = [[key for key in stage["state"] if key in names] for stage in stages]
    holders: dict[str, list[int]] = {}
    for i, keys in enumerate(held):
        for key in keys:
            holders.setdefault(key, []).append(i)
    shared = {key: stages for key, stages in holders.items() if len(stages) > 1}
    assert not shared, f"parameters several stages read under one name (the reference cannot run them): {shared}"
    missing = names - set(holders)
    assert not missing, f"parameters no stage holds: {sorted(missing)}"
    return held


def segment_ends(config: Config, first_step: int = 0) -> list[int]:
    """The (exclusive) end step of each segment from `first_step` on."""
    ends = []
    for done in range(first_step + 1, config.steps + 1):
        flush = done % config.staleness.flush_every == 0
        checkpoint = bool(config.checkpoint.every) and done % config.checkpoint.every == 0
        if flush or checkpoint or done == config.steps:
            ends.append(done)
    return ends


def global_order(pipeline: Pipeline, config: Config, micro_batches: int) -> list[Action]:
    """A segment's actions in the textbook 1F1B order, simulated with pipeline.json's costs (a
    recomputing stage's backward includes its forward again); unit costs without them."""
    if config.recompute == "always":
        recompute = {stage.index for stage in pipeline.stages}
    elif config.recompute == "never":
        recompute = set()
    else:
        recompute = {stage.index for stage in pipeline.stages if stage.recompute}
    costs: dict[int, tuple[float, float]] | None = {}
    for stage in pipeline.manifest["stages"]:
        cost = stage.get("cost") or {}
        if "fwd_time" not in cost or "bwd_time" not in cost:
            costs = None
            break
        forward, backward = cost["fwd_time"], cost["bwd_time"]
        costs[stage["index"]] = (forward, backward + (forward if stage["index"] in recompute else 0.0))
    timeline = simulate(pipeline.stages, micro_batches, "1f1b", costs, pipeline.outputs, policy=IN_ORDER)
    return [timed.action for timed in timeline.actions]


def async_reference(config: Config, model_path: Path | None = None, pipeline: Path | None = None) -> ReferenceRun:
    """Train `config` (its optimizer, lr schedule, data, seed, batch_size, micro_batches,
    step_every, steps, staleness.flush_every, checkpoint.every, recompute) the async way, on one
    process."""
    assert not config.staleness.predict and not config.staleness.gap_aware, "the reference has neither"
    folder = Path(pipeline or config.pipeline)
    spec = load_pipeline(folder)
    model_file = load_model_file(Path(model_path) if model_path is not None else folder / spec.manifest["model_file"])
    device = torch.device("cpu")
    model = build_single(config, model_file, device)  # the initial weights of mode single
    dropout = [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0]
    assert not dropout, "the reference assumes no dropout"
    assert not list(model.buffers()), "the reference assumes no buffers (BatchNorm statistics)"

    # Names (aliases included) -> canonical keys, as pipeline.json ties them; the model must tie
    # exactly those names.
    named = dict(model.named_parameters(remove_duplicate=False))
    first_name = {name: group[0] for group in spec.manifest.get("tied", []) for name in group}
    canonical = {name: first_name.get(name, name) for name in named}
    for name, param in named.items():
        assert canonical[name] in named and named[canonical[name]] is param, f"{name}: pipeline.json's ties"
    assert len(set(canonical.values())) == len({id(p) for p in named.values()}), "ties pipeline.json lacks"
    trainable = [name for name, p in named.items() if p.requires_grad]
    keys = list(dict.fromkeys(canonical[name] for name in trainable))
    held = stage_parameters(folder, trainable)
    stage_indices = [stage.index for stage in spec.stages]
    assert stage_indices == list(range(len(held))), "stages listed by index"
    holders: dict[str, set[int]] = {}
    for stage, names in enumerate(held):
        for name in names:
            holders.setdefault(canonical[name], set()).add(stage)
    groups: dict[tuple[int, ...], list[str]] = {}  # the stages holding them -> keys
    for key in keys:
        groups.setdefault(tuple(sorted(holders[key])), []).append(key)
    own = {stage: [key for key in keys if holders[key] == {stage}] for stage in range(len(held))}

    optimizer = build_optimizer([named[key] for key in keys], config.optimizer)
    # Synthetic targets as training makes them where the model file has no example_targets:
    # shaped like the outputs, class indices where the loss takes them.
    shaped = config.data["name"] == "synthetic" and getattr(model_file.module, "example_targets", None) is None
    outputs = synthetic_targets(output_specs(spec, config.batch_size // config.micro_batches), model_file.loss_fn) if shaped else None
    with seeded(config.seed):
        dataset = build_dataset(config.data, model_file, outputs)
    sampler = Sampler(len(dataset), config.batch_size, config.seed)
    M, S = config.micro_batches, config.step_every
    Mt = M * S

    def pieces(batch: int) -> list[tuple[tuple[torch.Tensor, ...], Any]]:
        """The batch's M micro-batches: (positional inputs, targets in the data set's structure)."""
        inputs, targets = load_batch(dataset, sampler.indices(batch), True, True)
        leaves, structure = tree_flatten(targets)
        target_pieces = [tree_unflatten(list(chunks), structure) for chunks in zip(*(t.chunk(M) for t in leaves))]
        return list(zip(zip(*(x.chunk(M) for x in inputs)), target_pieces))

    run = ReferenceRun(losses=[], state={})
    current = {key: named[key].detach().clone() for key in keys}  # each key's latest value
    version = dict.fromkeys(keys, 0)  # updates applied to each key, all segments
    t0 = 0
    for end in segment_ends(config):
        n = (end - t0) * Mt
        order = global_order(spec, config, n)
        position = {action: q for q, action in enumerate(order)}
        due: dict[int, list[tuple[tuple[int, ...], int]]] = {}  # position -> (group, step offset) applied after it
        for stages in groups:
            for k in range(end - t0):
                last = (k + 1) * Mt - 1  # the step's last micro-batch
                applied = max(position[Action(BACKWARD, s, last)] for s in stages)
                due.setdefault(applied, []).append((stages, k))
        recorded: dict[int, dict[str, torch.Tensor]] = {}  # micro-batch -> name -> the value its stage used
        forwarded: dict[int, set[int]] = {}
        gradients: dict[int, dict[str, torch.Tensor]] = {}  # step offset -> key -> summed gradient
        done_micro_batches = [0] * (end - t0)
        losses: dict[int, float] = {}
        versions_used = [{} for _ in range(n)]
        shared_versions_used = [{} for _ in range(n)]
        cached: dict[int, list] = {}

        def forward_backward(g: int) -> None:
            nonlocal cached
            batch = t0 * S + g // M
            if batch not in cached:
                cached = {batch: pieces(batch)}
            x, y = cached[batch][g % M]
            values = recorded.pop(g)
            leaves = {name: values[name].detach().requires_grad_() for name in trainable}
            loss = model_file.loss_fn(functional_call(model, leaves, tuple(v.clone() for v in x), tie_weights=False), y)
            grads = torch.autograd.grad(loss / Mt, [leaves[name] for name in trainable], allow_unused=True)
            summed = gradients.setdefault(g // Mt, {})
            for name, grad in zip(trainable, grads):
                if grad is not None:
                    key = canonical[name]
                    summed[key] = grad if key not in summed else summed[key] + grad
            losses[g] = loss.detach().to(torch.float64).item()
            done_micro_batches[g // Mt] += 1

        def update(stages: tuple[int, ...], k: int) -> None:
            assert done_micro_batches[k] == Mt, f"stages {stages}, step {t0 + k}: an update before its gradients"
            step = t0 + k
            for group in optimizer.param_groups:
                group["lr"] = config.optimizer.lr * lr_factor(step, config.lr_schedule, config.optimizer.lr,
                                                              config.steps)  # fmt: skip
            summed = gradients[k]
            for key in groups[stages]:
                named[key].grad = summed.pop(key, None)
            if any(named[key].grad is not None for key in groups[stages]):
                optimizer.step()  # elementwise, and only these keys hold gradients
            optimizer.zero_grad(set_to_none=True)
            for key in groups[stages]:
                current[key] = named[key].detach().clone()
                version[key] += 1

        for q, action in enumerate(order):
            if action.kind == FORWARD:
                s, g = action.stage, action.micro_batch
                step = t0 + g // Mt
                values = recorded.setdefault(g, {})
                for name in held[s]:
                    values[name] = current[canonical[name]]
                own_versions = {version[key] for key in own[s]}
                assert len(own_versions) <= 1
                if own_versions:
                    versions_used[g][s] = own_versions.pop()
                for key in dict.fromkeys(canonical[name] for name in held[s]):
                    if len(holders[key]) > 1:
                        shared_versions_used[g][(s, key)] = version[key]
                if any(version[canonical[name]] < step for name in held[s]):
                    run.stale_forwards += 1
                forwarded.setdefault(g, set()).add(s)
                if len(forwarded[g]) == len(held):
                    forward_backward(g)
            for stages, k in due.pop(q, []):
                update(stages, k)
        assert not due and not recorded and all(not summed for summed in gradients.values())
        for k in range(end - t0):
            run.losses.append(sum(losses[g] for g in range(k * Mt, (k + 1) * Mt)) / Mt)
        run.versions_used += versions_used
        run.shared_versions_used += shared_versions_used
        run.segment_states[end] = {key: value.detach().clone() for key, value in model.state_dict().items()}
        t0 = end
    run.state = run.segment_states[config.steps]
    return run
