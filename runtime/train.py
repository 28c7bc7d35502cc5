"""The training loop, the same in every mode.

- "single": the original model in one process, plain PyTorch: each micro-batch's loss divided
  by micro_batches * step_every, backward, an optimizer step every step_every batches. It is
  the baseline the pipeline modes must match (reference.py).
- "local": every stage in one process, run by the pipeline engine.
- "dist": this process is one pipeline device (rank) of a torchrun job (see worker.py).

One optimizer step ("step") takes step_every batches of batch_size samples, each split into
micro_batches micro-batches. Batch b of the run is the sampler's batch b, so a step's data
depends only on the seed and the step: resumed runs and every rank see the same batches.

A run sets up (plan_run, build_trainer, resume_point, prepare_data), trains its steps
(run_steps), and ends (finish). The checks before training are preflight.py's, checkpoints
resume.py's, the figures results.py's, what it prints progress.py's.
"""

from __future__ import annotations

import datetime
import functools
import math
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from ftc.ir import FtcError

from . import checkpoint, shared_copies
from .config import Config
from .data import (
    Sampler,
    epoch_steps,
    held_out_indices,
    load_batch,
    output_specs,
    split_held_out,
    synthetic_targets,
    tree_map,
)
from .datasets import build_dataset, target_batch_dims
from .engine import Engine, unique_parameters
from .faults import inject_fault
from .materialize import build_stages
from .model_file import ModelFile, function_from_file, load_model_file
from .optim import build_optimizer, build_scheduler, lr_factor
from .pipeline import Pipeline, load_pipeline
from .precision import autocast as precision_autocast, check_device as check_precision_device, value_specs
from .preflight import check_inputs, check_run, check_sparse_gradients, small_split_warnings, warmup_warnings
from .progress import Progress, Status, counted, headline, warn
from .rank import Rank, plan_rank, training_device
from .reference import SingleProcess, build_single
from .results import Results, write_results
from .resume import earlier_history, resume, sampling_changes, save
from .seeding import seeded
from .setup_sync import agree_on_data, gather_setup, new_setup_group
from .staleness import SharedSet, StaleWeights, shared_sets
from .streamed_batches import BatchStream


@dataclass
class Plan:
    """What this rank trains, as the config, the pipeline and the model file say, checked before
    anything is built."""

    config: Config  # with the steps that epochs come to, where the config counts epochs
    rank: int
    world_size: int
    pipeline: Pipeline
    model_file: ModelFile
    loss_fn: Callable
    me: Rank
    batch_dims: dict[str, int | None]  # input name -> its batch dimension (None: shared by all samples)
    target_dims: Any  # the targets' batch dimensions (datasets.target_batch_dims)
    outputs: Any  # synthetic targets shaped like the outputs, where the model file does not say what they are
    dataset: Any  # built already where epochs decide the steps, else None

    @property
    def asynchronous(self) -> bool:
        # Mode single is the synchronous baseline whatever the schedule: it has no pipeline.
        return self.config.schedule == "async" and self.config.mode != "single"


@dataclass
class Trainer:
    """This rank's modules and what trains them."""

    modules: list[torch.nn.Module]
    engine: Any  # the pipeline Engine, mode single's SingleProcess; async: the first segment's engine
    eval_engine: Any
    optimizer: Any  # None on a rank of parameter-free stages
    scheduler: Any
    stale: StaleWeights | None = None  # async only, as the next
    segment_engine: Callable[[int], Engine] | None = None  # the engine of a segment of so many steps


@dataclass
class Batches:
    """This rank's data and how it loads a step's batches and held-out ones: (inputs, targets),
    None for what this rank does not read."""

    dataset: Any  # None where this rank reads neither inputs nor targets
    trained: int | None  # how many of the data set's samples training draws from
    load: Callable[[list[int]], tuple[Any, Any]]
    load_held_out: Callable[[int], tuple[Any, Any]]


def train(config: Config, rank: int = 0, world_size: int = 1, status: Status | None = None) -> Results:
    """Train per `config` as rank `rank` of `world_size` (mode "dist": the process group is up);
    return the results (rank 0 also writes them)."""
    status = status or Status(rank)
    status.write("setting up", -1)
    started = time.perf_counter()
    # For the waits that may be long (building the stages and the data set; writing checkpoints),
    # which timeout_s, the bound of one message, must not cut short.
    setup_group = new_setup_group(config)
    plan = plan_run(config, rank, world_size)
    config = plan.config
    trainer = build_trainer(plan, setup_group)
    root = Path(config.checkpoint.dir) if config.checkpoint.dir else None
    first_step, run, resumed_from = resume_point(plan, trainer, root, setup_group)
    batches = prepare_data(plan, trainer, setup_group)
    results = Results(config.to_json(), config.mode, world_size, first_step, checkpoint=str(root) if root else None)
    if rank == 0 and first_step:
        results.earlier = earlier_history(resumed_from)
    if rank == 0:
        print(headline(config, plan.pipeline, world_size, batches.dataset, batches.trained), flush=True)
        if first_step:
            print(f"resumed from {checkpoint.step_folder(root, first_step)}", flush=True)

    def save_checkpoint(step: int) -> None:
        save(root, step, plan.me, trainer.modules, trainer.optimizer, trainer.scheduler, config, run,
             plan.pipeline.tied, setup_group, results.history())  # fmt: skip

    run_steps(plan, trainer, batches, results, status, first_step, save_checkpoint if root is not None else None)
    finish(plan, results, started)
    status.write("done", config.steps)
    return results


def plan_run(config: Config, rank: int, world_size: int) -> Plan:
    """Read the pipeline, the model file and the loss the config names, check them together, and
    count the steps where the config counts epochs (the data set's size decides them)."""
    pipeline = load_pipeline(config.pipeline)
    model_file = load_model_file(pipeline.model_file_or(config.model))
    loss_fn = resolve_loss(config, model_file)
    check_run(config, pipeline, model_file, rank, world_size)
    device = training_device(config, rank)
    check_precision_device(config.precision, device, config.source)
    batch_dims = {name: pipeline.manifest["values"].get(name, {}).get("batch_dim", 0) for name in pipeline.inputs}
    # Synthetic targets shaped like the outputs, where the model file does not say what they are.
    shaped = config.data["name"] == "synthetic" and getattr(model_file.module, "example_targets", None) is None
    outputs = synthetic_targets(output_specs(pipeline, config.batch_size // config.micro_batches), loss_fn) if shaped else None
    target_dims = target_batch_dims(model_file, outputs)
    dataset = None
    if config.epochs is not None:
        # Every rank counts the steps itself (the data set's size decides them), so ranks that
        # read no data build the data set too, once.
        with seeded(config.seed):
            dataset = build_dataset(config.data, model_file, outputs)
        config = replace(config, steps=epoch_steps(config.epochs, training_samples(config, len(dataset)),
                                                   config.batch_size * config.step_every))  # fmt: skip
    if rank == 0:
        for line in warmup_warnings(config):
            warn(line)
    me = plan_rank(config, pipeline, rank, world_size, device)
    return Plan(config, rank, world_size, pipeline, model_file, loss_fn, me, batch_dims, target_dims, outputs, dataset)


def build_trainer(plan: Plan, setup_group: Any) -> Trainer:
    """The modules this rank trains (mode single: the original model; else its stages), their
    engines and optimizer. In mode dist the ranks make their process groups here, in step."""
    config, pipeline, device = plan.config, plan.pipeline, plan.me.device
    if config.mode == "single":
        model = build_single(config, plan.model_file, device)
        engine = SingleProcess(model, plan.loss_fn, config.micro_batches, plan.batch_dims, plan.target_dims,
                               autocast=functools.partial(precision_autocast, device, config.precision),
                               precision=config.precision)  # fmt: skip
        return Trainer([model], engine, engine, *build_optimizers(config, [model], engine.parameters()))
    stage_modules = build_stages(plan.model_file, pipeline, plan.me.stages, device, config.seed, config.init)
    if config.mode == "dist":
        # Mode local builds the model once: there, what stages share is one tensor.
        digests = gather_setup(setup_group, shared_copies.digests(pipeline, stage_modules), plan.world_size)
        shared_copies.check_equal(pipeline, digests)
    modules = list(stage_modules.values())
    # The dtypes values cross devices in under autocast, learned once for every engine of the
    # run (in dist, the ranks tell each other what their stages produce).
    exchange = functools.partial(gather_setup, setup_group, world_size=plan.world_size) if config.mode == "dist" else None
    values = value_specs(pipeline, stage_modules, device, config.precision, exchange)
    make_engine = functools.partial(
        Engine, pipeline, stage_modules, schedule=config.schedule, loss_fn=plan.loss_fn, seed=config.seed,
        device=device, recompute=recompute_set(config, pipeline), distributed=config.mode == "dist",
        timeout_s=config.timeout_s, target_dims=plan.target_dims, precision=config.precision, values=values,
    )  # fmt: skip
    if not plan.asynchronous:
        engine = make_engine(micro_batches=config.micro_batches, batch_size=config.batch_size)
        return Trainer(modules, engine, engine, *build_optimizers(config, modules, engine.parameters()))
    optimizer, scheduler = build_optimizers(config, modules, unique_parameters(stage_modules))
    stale = StaleWeights(stage_modules, optimizer, lambda step: learning_rate(config, step), config.staleness,
                         config.micro_batches * config.step_every, pipeline.tied,
                         async_shared_sets(pipeline, config.mode == "dist", config.timeout_s))  # fmt: skip
    engines: dict[int, Engine] = {}

    def segment_engine(steps: int) -> Engine:
        """The engine of a segment of `steps` steps (their micro-batches in one run)."""
        if steps not in engines:
            batches = steps * config.step_every
            engines[steps] = make_engine(micro_batches=batches * config.micro_batches,
                                         batch_size=batches * config.batch_size, stale=stale,
                                         batch_micro_batches=config.micro_batches)  # fmt: skip
        return engines[steps]

    engine = segment_engine(segment_end(config, 0))
    # Async engines run segments of steps with stale weights: evaluation runs a plain one (made
    # here, where every rank is in step, as its process groups need).
    eval_engine = make_engine(micro_batches=config.micro_batches, batch_size=config.batch_size, schedule="1f1b") if (
        config.eval.every) else engine  # fmt: skip
    return Trainer(modules, engine, eval_engine, optimizer, scheduler, stale, segment_engine)


def build_optimizers(config: Config, modules: list[torch.nn.Module], parameters: list) -> tuple[Any, Any]:
    """The optimizer of `parameters` and its lr schedule."""
    check_sparse_gradients(config, modules)
    # A rank may hold only parameter-free stages (a pooling, a normalization): it steps nothing.
    optimizer = build_optimizer(parameters, config.optimizer) if parameters else None
    scheduler = build_scheduler(optimizer, config.lr_schedule, config.optimizer.lr, config.steps) if optimizer else None
    return optimizer, scheduler


def resume_point(plan: Plan, trainer: Trainer, root: Path | None, setup_group: Any) -> tuple[int, str, Path | None]:
    """The step the run starts after, its id, and the checkpoint it resumes from (None: it starts
    afresh). Resuming loads that checkpoint into the trainer."""
    config, rank, pipeline = plan.config, plan.rank, plan.pipeline
    first_step, run = 0, uuid.uuid4().hex[:12]
    if root is None:
        return first_step, run, None
    # Rank 0 clears half-written step folders before any rank can write one (that needs a
    # step, which needs rank 0); complete ones stay, the latest for the others to resume from.
    folder = checkpoint.prepare(root, config.checkpoint.resume) if rank == 0 else checkpoint.latest(root)
    if config.mode == "dist" and config.checkpoint.resume:
        # Every rank resumes from rank 0's choice: prepare may have just put a step folder in
        # place (checkpoint.prepare), after another rank looked for the latest.
        folder = gather_setup(setup_group, folder, plan.world_size)[0]
    if rank == 0 and config.checkpoint.resume:
        for damaged, missing in checkpoint.damaged_steps(root).items():
            warn(f"skipped {damaged}: it lacks {', '.join(missing)}")
    if folder is not None and config.checkpoint.resume:
        model_keys = {key for stage in pipeline.stages for key in stage.state} | set(pipeline.tied)
        model_keys |= {key for module in trainer.modules for key in module.state_dict()}  # mode single: the model's
        first_step = resume(folder, plan.me, trainer.modules, trainer.optimizer, trainer.scheduler, pipeline.tied,
                            model_keys)  # fmt: skip
        if rank == 0:
            for line in sampling_changes(config, checkpoint.manifest(folder)):
                warn(line)
        return first_step, checkpoint.run_of(folder), folder
    if rank == 0 and config.checkpoint.resume:
        warn(f"checkpoint.resume is true, but {root} holds no complete checkpoint: training starts at step 1")
    return first_step, run, None


def prepare_data(plan: Plan, trainer: Trainer, setup_group: Any) -> Batches:
    """The data set, built where this rank reads inputs or targets (the engine's message plan
    says which ranks read inputs and which computes the loss), and how to load its batches."""
    config, device = plan.config, plan.me.device
    reads_inputs, reads_targets = (True, True) if config.mode == "single" else (
        trainer.engine.reads_inputs, trainer.engine.reads_targets)  # fmt: skip
    dataset = plan.dataset
    if not (reads_inputs or reads_targets):
        dataset = None
    elif dataset is None:
        with seeded(config.seed):
            dataset = build_dataset(config.data, plan.model_file, plan.outputs)
    # With evaluation, training draws from the data set's first samples, evaluation its last.
    trained = training_samples(config, len(dataset)) if dataset is not None else None
    sampler = Sampler(trained, config.batch_size, config.seed) if dataset is not None else None
    if plan.rank == 0 and trained is not None:
        for line in small_split_warnings(config, len(dataset), trained):
            warn(line)
    if config.mode == "dist":
        agree_on_data(setup_group, dataset, sampler, plan.world_size)

    def load(batches: list[int]) -> tuple[Any, Any]:
        """The samples of these batches as one batch, on the device."""
        if sampler is None:
            return None, None
        return load_samples([i for batch in batches for i in sampler.indices(batch)])

    def load_held_out(batch: int) -> tuple[Any, Any]:
        if sampler is None:
            return None, None
        return load_samples(held_out_indices(trained, len(dataset), batch, config.batch_size))

    def load_samples(indices: list[int]) -> tuple[Any, Any]:
        inputs, targets = load_batch(dataset, indices, reads_inputs, reads_targets, plan.batch_dims, plan.target_dims)
        if inputs is not None:
            check_inputs(inputs, plan.pipeline, config)
        return tuple(None if t is None else tree_map(lambda x: x.to(device), t) for t in (inputs, targets))

    return Batches(dataset, trained, load, load_held_out)


def run_steps(
    plan: Plan, trainer: Trainer, batches: Batches, results: Results, status: Status, first_step: int,
    save_checkpoint: Callable[[int], None] | None,
) -> None:  # fmt: skip
    """Train from step `first_step` to the config's last, recording each step's figures in
    `results`; evaluate and checkpoint (`save_checkpoint`, None: no checkpoints) where the config
    asks."""
    config = plan.config
    progress = Progress(config.steps, config.log_every, enabled=plan.rank == 0)
    samples, timed_from = 0, time.perf_counter()
    step = first_step
    while step < config.steps:
        # Async: a segment of steps runs as one pipeline fill and drain; the others: one step.
        end = segment_end(config, step) if plan.asynchronous else step + 1
        # Steps as people see them, in the progress lines and in errors, count from 1; an async
        # segment's failure is reported at its first step (its steps overlap).
        status.write("running", step + 1)
        losses, grad_norm = train_steps(plan, trainer, batches, step, end)
        if grad_norm is not None:
            results.grad_norm.append(grad_norm)
        if step == first_step and (not plan.asynchronous or end < config.steps):
            # The first step (segment) pays for warm-up (allocations, connections): throughput starts after it.
            timed_from, samples = time.perf_counter(), 0
        else:
            samples += config.batch_size * config.step_every * (end - step)
        results.samples_per_s = samples / (time.perf_counter() - timed_from) if samples else 0.0
        for done, loss in enumerate(losses, start=step + 1):
            results.loss.append(loss)
            results.lr.append(learning_rate(config, done - 1))
            norm = results.grad_norm[-1] if results.grad_norm else None
            progress.update(done - 1, loss, results.lr[-1], results.samples_per_s, norm)
        # After the last step, and where a multiple of eval.every falls in this step (or segment).
        if config.eval.every and (end == config.steps or end // config.eval.every > step // config.eval.every):
            held_out_loss = evaluate(trainer.eval_engine, trainer.modules, end, config.eval.batches, batches.load_held_out)
            results.eval_loss.append((end, held_out_loss))
            progress.note(f"eval after step {end}: loss {results.eval_loss[-1][1]:.4f} "
                          f"({counted(config.eval.batches, 'held-out batch', 'held-out batches')})")  # fmt: skip
        step = end
        if save_checkpoint is not None and (
            end == config.steps or (config.checkpoint.every and end % config.checkpoint.every == 0)
        ):
            status.write("checkpointing", end)
            save_checkpoint(end)


def train_steps(plan: Plan, trainer: Trainer, batches: Batches, step: int, end: int) -> tuple[list[float], float | None]:
    """Steps step+1 to end (one, or an async segment of several), up to and including the
    optimizer's: each step's loss, and the gradient norm before clipping where the config clips."""
    config, engine, optimizer = plan.config, trainer.engine, trainer.optimizer
    for later in range(step, end):
        inject_fault(config, plan.me, later + 1, trainer.modules)
    if plan.asynchronous:
        losses = train_segment(trainer.segment_engine(end - step), trainer.stale, config, step, end, batches.load)
    else:
        batch_losses = [
            engine.train_step(batch, *batches.load([batch]), loss_scale=1.0 / config.step_every)
            for batch in range(step * config.step_every, end * config.step_every)
        ]
        losses = [sum(batch_losses) / len(batch_losses)]
    for done, loss in enumerate(losses, start=step + 1):
        if not math.isfinite(loss):
            raise FtcError(f"the loss is {loss} at step {done}; stopping",
                           "lower optimizer.lr, add warmup (lr_schedule.warmup_steps) or check the data")  # fmt: skip
    grad_norm = None
    if not plan.asynchronous:
        engine.sync_shared_grads()
        check_finite_gradients(trainer.modules, end, losses[-1])
        if config.optimizer.clip_grad_norm is not None:
            grad_norm = engine.clip_gradients(config.optimizer.clip_grad_norm)
    if optimizer is not None:
        if not plan.asynchronous:  # async segments stepped each stage as its backwards finished
            optimizer.step()
        for _ in range(end - step):
            trainer.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, grad_norm


def check_finite_gradients(modules: list[torch.nn.Module], step: int, loss: float) -> None:
    """Stop before the optimizer step where a gradient holds a NaN or an infinity though the loss
    is finite (an operation whose derivative is infinite where it is evaluated, sqrt at 0 say):
    stepped, every weight it reaches turns NaN, the checkpoint of this step with them, and the
    run stopped only at the next step's loss, blaming the learning rate. One check for all
    gradients (one host sync); the names only once it fails."""
    named = {id(p): (name, p) for module in modules for name, p in module.named_parameters() if p.grad is not None}
    grads = [p.grad.coalesce().values() if p.grad.is_sparse else p.grad for _, p in named.values()]
    # The largest magnitude is NaN or inf exactly where an element is, and, unlike the 2-norm,
    # cannot overflow; torch computes it over all gradients in a few fused kernels, not one per tensor.
    if not grads or torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=float("inf"))):
        return
    bad = [name for (name, _), grad in zip(named.values(), grads) if not torch.isfinite(grad).all()]
    raise FtcError(f"the gradients of {len(bad)} parameter(s) ({', '.join(bad[:5])}) hold NaN or inf at step {step}, "
                   f"though its loss is {loss:g}; stopping before the optimizer step, so the weights stay finite",
                   "look for an operation whose derivative is infinite where the model evaluates it (sqrt, log or "
                   "pow with an exponent below 1 at 0; division by a value that reaches 0) in the computation of "
                   "these parameters; clip_grad_norm cannot scale an infinite gradient")  # fmt: skip


def finish(plan: Plan, results: Results, started: float) -> None:
    """The run's wall time and peak memory into `results`, which rank 0 writes."""
    device = plan.me.device
    results.wall_time_s = time.perf_counter() - started
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        results.peak_memory_bytes = [peak] * plan.world_size
        if plan.config.mode == "dist":
            dist.all_gather_object(results.peak_memory_bytes, peak)
    if plan.rank == 0:
        write_results(plan.config, results)


def resolve_loss(config: Config, model_file: ModelFile) -> Callable:
    if config.loss is None:
        if model_file.loss_fn is None:
            raise FtcError(f"{model_file.path} defines no loss_fn and config key 'loss' is not set",
                           "add `def loss_fn(output, target)` to the model file or set \"loss\"")  # fmt: skip
        return model_file.loss_fn
    if ":" in config.loss:
        return function_from_file(config.loss, "loss", "ftc_loss")
    name = config.loss.removeprefix("torch.nn.functional.").removeprefix("F.")
    function = getattr(model_file.module, config.loss, None) or getattr(torch.nn.functional, name, None)
    if not callable(function):
        raise FtcError(f"config key 'loss' is {config.loss!r}, which names no function",
                       "name a function of the model file, of torch.nn.functional, or \"file.py:function\"")  # fmt: skip
    return function


def recompute_set(config: Config, pipeline: Pipeline) -> set[int]:
    if config.recompute == "always":
        return {s.index for s in pipeline.stages}
    if config.recompute == "never":
        return set()
    return {s.index for s in pipeline.stages if s.recompute}


def training_samples(config: Config, size: int) -> int:
    """How many of a data set's `size` samples training draws from: the first ones, all but those
    evaluation holds out."""
    return split_held_out(size, config.eval.fraction, config.source) if config.eval.every else size


def evaluate(engine: Any, modules: list[torch.nn.Module], step: int, batches: int, load: Callable) -> float:
    """The mean loss of `batches` held-out batches, every module in eval mode (dropout off,
    normalization by its running statistics), their flags restored after: the model's own
    train() is not called, so the modes an override of it chose for training stay. So are the
    buffers: stage code that keeps a branch on self.training as traced in training mode (export,
    `if self.training: self.mean.mul_(...)`) updates them in eval mode too, where the original
    model does not, and training would go on from other statistics than mode single's."""
    flags = [(module, module.training) for stage in modules for module in stage.modules()]
    buffers = {id(b): (b, b.clone()) for stage in modules for b in stage.buffers()}
    for module, _ in flags:
        module.training = False
    try:
        losses = [engine.evaluate(step, *load(batch))[0] for batch in range(batches)]
    finally:
        for module, training in flags:
            module.training = training
        with torch.no_grad():
            for buffer, value in buffers.values():
                buffer.copy_(value)
    return sum(losses) / len(losses)


def learning_rate(config: Config, step: int) -> float:
    return config.optimizer.lr * lr_factor(step, config.lr_schedule, config.optimizer.lr, config.steps)


def segment_end(config: Config, step: int) -> int:
    """Schedule async: the step (exclusive) where the segment starting at `step` flushes: after
    staleness.flush_every steps, at a checkpoint, or at the end; the same boundaries whichever
    step a run resumed from. An injected fault (a testing aid) starts a segment, so that it
    strikes at its step, not at the start of the segment holding it."""
    every = [config.staleness.flush_every] + ([config.checkpoint.every] if config.checkpoint.every else [])
    ends = [config.steps] + [(step // n + 1) * n for n in every]
    fault = config.inject_fault
    if fault is not None and fault.step - 1 > step:
        ends.append(fault.step - 1)
    return min(ends)


def train_segment(engine: Engine, stale: StaleWeights, config: Config, first: int, end: int, load) -> list[float]:
    """Steps first..end-1 as one async pipeline run; the loss of each step (the mean of its
    micro-batches')."""
    stale.begin(first)
    stream = BatchStream(lambda batch: load([batch]), first * config.step_every)
    # The engine divides each micro-batch's loss by all its micro-batches; a step's are 1 / (end - first) of them.
    losses = engine.train_losses(first * config.step_every, stream, None, loss_scale=end - first)
    per_step = config.micro_batches * config.step_every
    return [sum(losses[k : k + per_step]) / per_step for k in range(0, len(losses), per_step)]


def async_shared_sets(pipeline: Pipeline, distributed: bool, timeout_s: float = 60.0) -> list[SharedSet]:
    """Schedule async: the parameter sets several stages hold, with a process group for those
    whose stages sit on several devices in mode dist (new_group is collective: every rank
    makes every group, in the same order)."""
    sets = shared_sets(pipeline)
    if distributed:
        device_of = {s.index: s.device for s in pipeline.stages}
        for entry in sets:
            devices = sorted({device_of[stage] for stage in entry.stages})
            if len(devices) > 1:
                entry.group = dist.new_group(devices, timeout=datetime.timedelta(seconds=timeout_s))
                entry.ranks = devices
    return sets
