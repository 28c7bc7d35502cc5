"""The truth for schedule "async": PipeDream-style asynchronous pipeline training, written in
plain PyTorch on the ORIGINAL model, with no ftc engine, stage module or staleness code.

From ftc it takes only what defines the run, not how the pipeline executes it: the config
(ftc.runtime.config), the initial weights as mode "single" builds them (train.build_single), the
data (data.build_dataset, Sampler, load_batch), the optimizer's settings (optim.build_optimizer)
and the learning-rate schedule (optim.lr_factor); and from the compiled pipeline.json only which
stage holds which parameter.

The semantics (staleness.predict and staleness.gap_aware false):

- P stages in a chain, stage i (the i-th of pipeline.json's "stages" by index) at depth
  d_i = P - i. Mt = micro_batches * step_every micro-batches make one optimizer step.
- Steps are grouped into segments; a segment ends after (1-based) step `done` when
  done % flush_every == 0, or checkpoint.every > 0 and done % checkpoint.every == 0, or
  done == steps. The pipeline is empty between segments.
- In a segment of K steps starting at step t0, micro-batches g = 0 .. K * Mt - 1: g belongs to
  step t0 + g // Mt and is piece g % M (tensor.chunk(M) along dim 0, inputs and targets) of
  data batch t0 * step_every + g // M.
- Stage i runs g's forward, and its backward (weight stashing), with its weights after
  max(0, (g - d_i + 1) // Mt) of the segment's updates (and all updates before the segment):
  those of the steps whose last micro-batch is at most g - d_i, as 1F1B runs a stage's forward
  of g right after its backward of g - d_i.
- The gradient of stage i's weights from g is d(loss_g / Mt) / d(the weights stage i used for g);
  stage i's update for step u is one optimizer step on its summed gradients of step u's Mt
  micro-batches, with lr = optimizer.lr * lr_factor(u, ...). Every stage updates once a step,
  so one elementwise optimizer over all parameters, stepped once a step on each stage's summed
  gradient, is the same as one optimizer per stage.
- A step's loss: the mean of its Mt micro-batch losses (the loss function's value, unscaled).

How it computes that: micro-batches in order g = 0, 1, ...; every version v (weights after v
updates) of every parameter is kept as a snapshot; g's forward is torch.func.functional_call of
the original model with each parameter taken from the snapshot of its stage's version for g;
after the last micro-batch of a step, the optimizer steps the live parameters (the latest
version) on the summed gradients, and their new values become the next snapshot. Every
snapshot a micro-batch uses exists by then: g's versions are at most its own step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.func import functional_call

from ftc.runtime.config import Config
from ftc.runtime.data import Sampler, build_dataset, load_batch, seeded
from ftc.runtime.model_file import load_model_file
from ftc.runtime.optim import build_optimizer, lr_factor
from ftc.runtime.train import build_single


@dataclass
class ReferenceRun:
    losses: list[float]  # per optimizer step, steps 0 .. steps-1
    state: dict[str, torch.Tensor]  # the final state_dict of the original model
    stale_forwards: int = 0  # (stage, micro-batch) forwards that ran on weights older than their step's
    # per micro-batch, all segments in order: stage -> the version (updates applied) its forward used
    versions_used: list[dict[int, int]] = field(default_factory=list)
    segment_states: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # segment end step -> state_dict


def stage_parameters(pipeline: Path, parameter_names: list[str]) -> list[list[str]]:
    """The parameter names each stage holds, stages in chain order (pipeline.json's index);
    every trainable parameter in exactly one stage, as schedule async requires."""
    manifest = json.loads((Path(pipeline) / "pipeline.json").read_text())
    stages = sorted(manifest["stages"], key=lambda stage: stage["index"])
    names = set(parameter_names)
    held = [[key for key in stage["state"] if key in names] for stage in stages]
    holders: dict[str, list[int]] = {}
    for i, keys in enumerate(held):
        for key in keys:
            holders.setdefault(key, []).append(i)
    shared = {key: stages for key, stages in holders.items() if len(stages) > 1}
    assert not shared, f"parameters held by several stages (async refuses them): {shared}"
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


def async_reference(config: Config, model_path: Path | None = None, pipeline: Path | None = None) -> ReferenceRun:
    """Train `config` (its optimizer, lr schedule, data, seed, batch_size, micro_batches,
    step_every, steps, staleness.flush_every, checkpoint.every) the async way, on one process."""
    assert not config.staleness.predict and not config.staleness.gap_aware, "the reference has neither"
    pipeline = Path(pipeline or config.pipeline)
    if model_path is None:
        manifest = json.loads((pipeline / "pipeline.json").read_text())
        model_path = pipeline / manifest["model_file"]
    model_file = load_model_file(Path(model_path))
    device = torch.device("cpu")
    model = build_single(config, model_file, device)  # the initial weights of mode single
    dropout = [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0]
    assert not dropout, "the reference assumes no dropout"
    assert not list(model.buffers()), "the reference assumes no buffers (BatchNorm statistics)"
    named = dict(model.named_parameters(remove_duplicate=False))
    assert len(named) == len({id(p) for p in named.values()}), "the reference assumes no tied parameters"
    trainable = [name for name, p in named.items() if p.requires_grad]
    stages = stage_parameters(pipeline, trainable)
    depth = {key: len(stages) - i for i, keys in enumerate(stages) for key in keys}
    stage_of = {key: i for i, keys in enumerate(stages) for key in keys}

    params = [named[name] for name in trainable]
    optimizer = build_optimizer(params, config.optimizer)
    with seeded(config.seed):
        dataset = build_dataset(config.data, model_file)
    sampler = Sampler(len(dataset), config.batch_size, config.seed)
    M, S = config.micro_batches, config.step_every
    Mt = M * S

    def pieces(batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        (inputs,), targets = load_batch(dataset, sampler.indices(batch), True, True)
        return list(zip(inputs.chunk(M), targets.chunk(M)))

    def snapshot() -> dict[str, torch.Tensor]:
        return {name: named[name].detach().clone() for name in trainable}

    run = ReferenceRun(losses=[], state={})
    versions = {0: snapshot()}  # updates applied (= steps done) -> every trainable parameter's values then
    t0 = 0
    for end in segment_ends(config):
        K = end - t0
        gradients: dict[str, torch.Tensor] = {}
        losses: list[float] = []
        cached: dict[int, list] = {}
        for g in range(K * Mt):
            step = t0 + g // Mt
            batch = t0 * S + g // M
            if batch not in cached:
                cached = {batch: pieces(batch)}
            x, y = cached[batch][g % M]
            used = {key: t0 + max(0, (g - depth[key] + 1) // Mt) for key in trainable}
            assert all(version <= step for version in used.values())
            run.versions_used.append({stage_of[key]: version for key, version in used.items()})
            run.stale_forwards += len({stage_of[key] for key, version in used.items() if version < step})
            leaves = {key: versions[used[key]][key].detach().requires_grad_() for key in trainable}
            loss = model_file.loss_fn(functional_call(model, leaves, (x.clone(),)), y)
            grads = torch.autograd.grad(loss / Mt, [leaves[key] for key in trainable], allow_unused=True)
            for key, grad in zip(trainable, grads):
                if grad is not None:
                    gradients[key] = grad if key not in gradients else gradients[key] + grad
            losses.append(loss.detach().to(torch.float64).item())
            if g % Mt == Mt - 1:  # the step's last micro-batch: every stage updates
                for group in optimizer.param_groups:
                    group["lr"] = config.optimizer.lr * lr_factor(step, config.lr_schedule, config.optimizer.lr,
                                                                  config.steps)  # fmt: skip
                for key in trainable:
                    named[key].grad = gradients.get(key)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                gradients = {}
                versions[step + 1] = snapshot()
                run.losses.append(sum(losses) / Mt)
                losses = []
        # A flush: no later micro-batch needs an older version.
        versions = {end: versions[end]}
        run.segment_states[end] = {key: value.detach().clone() for key, value in model.state_dict().items()}
        t0 = end
    run.state = run.segment_states[config.steps]
    return run
