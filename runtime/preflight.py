"""Checks of a config against the pipeline, the model file and the data, made before anything
trains (and of each batch's inputs as it loads): a mistake found here gets an error or a
warning that names its cause and the key to change, rather than a shape error deep inside a
stage, or a checkpoint that cannot be written after an hour of training."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ftc.ir import FtcError

from .config import Config
from .faults import check_fault_rank
from .model_file import ModelFile
from .pipeline import Pipeline
from .progress import warn


def check_run(config: Config, pipeline: Pipeline, model_file: ModelFile, rank: int, world_size: int) -> None:
    """What the config, the pipeline and the model file say together, before anything is built:
    mistakes raise; rank 0 prints warnings for what may not be meant."""
    if config.mode == "dist" and pipeline.num_devices != world_size:
        raise FtcError(f"{pipeline.folder} places its stages on {pipeline.num_devices} devices, "
                       f"but {world_size} processes run", "set nprocs to the number of pipeline devices")  # fmt: skip
    recorded = pipeline.manifest.get("model_file_sha256")
    if rank == 0 and recorded is not None and recorded != model_file.digest():
        warn(f"{model_file.path} is not the model file {pipeline.folder} was compiled from (it changed since, or is "
             "another file): the stages run the code of compile time, and only the values passed between stages are "
             "checked\n  fix: recompile with `ftc compile`; `ftc check` compares the stages with this model file")
    if config.nprocs is not None and config.mode != "dist":
        warn(f"config {config.source}: nprocs ({config.nprocs}) applies to mode dist; mode {config.mode} runs in "
             "this one process")
    if rank == 0 and config.mode == "single" and config.schedule == "async":
        warn("mode single trains the original model synchronously: schedule async applies to modes local and dist",
             kind="note")
    if rank == 0 and config.mode != "single":
        for line in memory_plan_differences(config, pipeline):
            warn(line)
    check_fault_rank(config, world_size if config.mode == "dist" else 1)
    check_unpacked_inputs(pipeline)
    check_micro_batch_size(config, pipeline)
    check_trainable(pipeline, model_file)
    if rank == 0:
        check_writable(config)


def warmup_warnings(config: Config) -> list[str]:
    """A warmup as long as the run (steps known, which epochs may decide) never reaches the
    configured learning rate."""
    if not config.lr_schedule.warmup_steps >= config.steps > 0:
        return []
    return [f"config {config.source}: lr_schedule.warmup_steps ({config.lr_schedule.warmup_steps}) is not below steps "
            f"({config.steps}): the learning rate never reaches optimizer.lr ({config.optimizer.lr:g}), and no decay "
            "follows"]  # fmt: skip


def check_trainable(pipeline: Pipeline, model_file: ModelFile) -> None:
    """Training needs a loss that some parameter's gradient flows into; pipeline.json records
    whether each output of the model needs a gradient. Without one, backward would fail deep
    inside autograd; a model whose parameters are frozen only in part trains them as usual."""
    values = pipeline.manifest["values"]
    if any(values.get(name, {}).get("requires_grad") for name in pipeline.outputs):
        return
    raise FtcError(f"{model_file.path}: no output of the model depends on a trainable parameter (every parameter has "
                   "requires_grad=False, or forward computes the outputs under torch.no_grad): training would have "
                   "nothing to update",
                   "leave requires_grad=True on the parameters to train (build_model), then recompile with "
                   f"`ftc compile` ({pipeline.folder} records the outputs' requires_grad of compile time)")  # fmt: skip


def check_unpacked_inputs(pipeline: Pipeline) -> None:
    """Data sets stack one sample per row of each input's batch dimension, and the engine cuts
    micro-batches by slicing it: an input with several rows per sample (pipeline.packed_inputs)
    would meet a wrong batch size deep in the data set, or wrong offsets in a stage."""
    packed = pipeline.packed_inputs
    if packed:
        name, rows = next(iter(packed.items()))
        spec = pipeline.manifest["values"][name]
        shape, dim = list(spec["shape"]), spec["batch_dim"]
        raise FtcError(f"{pipeline.folder}: input {name!r} has {rows:g} rows per sample along its batch dimension "
                       f"(dim {dim} of its shape {shape} at batch size {pipeline.manifest['batch_size']}: "
                       "a packed input, such as EmbeddingBag's flat indices with offsets or a graph's edge list "
                       "[2, E]): training stacks one sample per row and cuts micro-batches by slicing rows, which "
                       "cannot split it",
                       "give the model one row per sample: e.g. indices [batch, bag_size] (EmbeddingBag takes 2-D "
                       "input; pad with padding_idx), tokens [batch, T] reshaped inside forward, or graphs of equal "
                       "size batched as nodes [batch, N, F] and edges [batch, 2, E]")  # fmt: skip
    for name in pipeline.inputs:
        spec = pipeline.manifest["values"].get(name, {})
        if spec.get("kind") == "tensor" and spec.get("other_batch_dims"):
            dims = [spec["batch_dim"], *spec["other_batch_dims"]]
            raise FtcError(f"{pipeline.folder}: input {name!r} grows with the batch in dimensions {dims} of its shape "
                           f"{spec['shape']} at batch size {pipeline.manifest['batch_size']} (a relation between "
                           "samples, such as a [B, B] mask): training stacks inputs from single samples and cuts "
                           "micro-batches by slicing one dimension, which cannot make it",
                           "compute it inside forward from per-sample inputs (e.g. the mask from per-sample ids)")  # fmt: skip


def check_micro_batch_size(config: Config, pipeline: Pipeline) -> None:
    """A forward bounded in batch size (pipeline.json's batch_range, from the compiler) would
    fail inside a stage, or the original model in mode single, with a shape error naming
    neither the bound nor the config keys that set the micro-batch."""
    if pipeline.batch_range is None:
        return
    low, high = pipeline.batch_range
    size = config.batch_size // config.micro_batches
    if low <= size <= high:
        return
    fits = [m for m in range(1, config.batch_size + 1) if config.batch_size % m == 0 and low <= config.batch_size // m <= high]
    hint = (f"set micro_batches to {', '.join(map(str, fits[:4]))}{' or more' if len(fits) > 4 else ''}"
            f" (keeping batch_size {config.batch_size}), or change batch_size" if fits
            else f"choose batch_size and micro_batches with batch_size / micro_batches from {low} to {high}")  # fmt: skip
    raise FtcError(f"config {config.source}: micro-batches of {size} samples (batch_size {config.batch_size} / "
                   f"micro_batches {config.micro_batches}) are outside the batch sizes {low} to {high} that the model's "
                   f"forward works for ({pipeline.folder}/pipeline.json: batch_range, found by the compiler: a size "
                   "computed from the batch meets a fixed-size tensor, such as a slice of a buffer)", hint)  # fmt: skip


def memory_plan_differences(config: Config, pipeline: Pipeline) -> list[str]:
    """Where the config trains with more memory per stage than a pipeline compiled under
    --memory-limit was planned for (pipeline.json's settings); one line each, empty when it fits
    the plan or no limit was set."""
    settings = pipeline.manifest.get("settings", {})
    if settings.get("memory_limit") is None:
        return []
    planned_sample_share = pipeline.manifest["batch_size"] / pipeline.planned_micro_batches
    optimizer = config.optimizer.name
    if optimizer == "sgd" and config.optimizer.momentum:
        optimizer = "momentum"
    # Copies of the parameters each keeps (the compiler's OPTIMIZER_STATES, which the runtime,
    # reading only generated folders, does not import).
    states = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}
    differences = []
    planned_schedule = settings.get("schedule", "1f1b")
    if config.schedule == "gpipe" and planned_schedule != "gpipe":
        differences.append(f"schedule gpipe (planned: {planned_schedule}; gpipe keeps every micro-batch's activations)")
    if config.schedule == "async" and planned_schedule != "async":
        differences.append(f"schedule async (planned: {planned_schedule}; async keeps more copies of each stage's "
                           "trainable parameters, the stashed weight versions: two when micro_batches * step_every "
                           "is at least the stage's depth, up to the depth when it is less, and the stage's depth "
                           "in micro-batches in flight; compile with --schedule async)")  # fmt: skip
    if config.batch_size / config.micro_batches > planned_sample_share:
        differences.append(
            f"micro-batches of {config.batch_size / config.micro_batches:g} samples (batch_size / micro_batches; "
            f"planned: {planned_sample_share:g})"
        )
    elif config.schedule == "gpipe" and config.batch_size > pipeline.manifest["batch_size"]:
        differences.append(f"batch_size {config.batch_size} under gpipe (planned: {pipeline.manifest['batch_size']})")
    planned_optimizer = settings.get("optimizer", "adam")
    if states.get(optimizer, 2) > states.get(planned_optimizer, 2):
        differences.append(f"optimizer {optimizer} (planned: {planned_optimizer}, which keeps less state)")
    planned_device = settings.get("device", "cpu")
    if config.device == "cuda" and planned_device != "cuda" and optimizer in ("adam", "adamw"):
        differences.append(f"device cuda (planned: {planned_device}; {optimizer}'s step on CUDA makes one copy of "
                           "all the parameters, on the CPU two of the largest)")  # fmt: skip
    if config.recompute == "never" and any(s.recompute for s in pipeline.stages):
        planned = [s.index for s in pipeline.stages if s.recompute]
        differences.append(f"recompute never (planned: stages {planned} recompute)")
    if not differences:
        return []
    return [
        f"{pipeline.folder} was partitioned to fit {settings['memory_limit'] / 1e6:.1f} MB per device (--memory-limit), "
        f"but config {config.source} trains with " + "; ".join(differences) + ": stages may need more memory "
        "than the limit\n  fix: recompile with these settings (ftc compile --schedule, --micro-batches, "
        "--batch-size, --optimizer, --device), or train with the planned ones (`ftc explain` shows the plan)"
    ]


def check_writable(config: Config) -> None:
    """The folders the run writes into (checkpoint.dir, and those of results and plot) exist or
    can be made, and take files: found before training, not at its first checkpoint or its end."""
    places = [("checkpoint.dir", Path(config.checkpoint.dir))] if config.checkpoint.dir else []
    places += [(key, Path(getattr(config, key)).parent) for key in ("results", "plot") if getattr(config, key)]
    for key, folder in places:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".ftc-write-test-"):
                pass
        except OSError as exc:
            raise FtcError(f"config {config.source}: key {key!r}: cannot write into {folder} "
                           f"({type(exc).__name__}: {exc.strerror or exc})",
                           f"set {key} to a path in a folder this user can write") from exc  # fmt: skip
    for key in ("results", "plot"):
        path = getattr(config, key)
        if path and Path(path).is_dir():
            raise FtcError(f"config {config.source}: key {key!r} is {path}, a folder", "give it a file path")


def check_sparse_gradients(config: Config, modules: list[torch.nn.Module]) -> None:
    """nn.Embedding(sparse=True) and nn.EmbeddingBag(sparse=True) make sparse gradients, which
    Adam and AdamW refuse, SGD cannot combine with weight decay, and clipping cannot take the
    norm of: say so before training."""
    sparse = sorted({
        f"{name}.weight" if name else "weight"
        for module in modules
        for name, layer in module.named_modules()
        if isinstance(layer, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and layer.sparse and layer.weight.requires_grad
    })  # fmt: skip
    if not sparse:
        return
    if config.schedule == "async" and config.mode != "single" and config.staleness.gap_aware:
        raise FtcError(f"config {config.source}: staleness.gap_aware cannot scale the sparse gradients of "
                       f"{', '.join(sparse)}", "set staleness.gap_aware=false, or build the embedding with "
                       "sparse=False")  # fmt: skip
    if config.optimizer.name in ("adam", "adamw"):
        raise FtcError(f"config {config.source}: optimizer.name {config.optimizer.name} cannot update the sparse "
                       f"gradients of {', '.join(sparse)} (an embedding built with sparse=True)",
                       "set optimizer.name to sgd, or build the embedding with sparse=False")  # fmt: skip
    if config.optimizer.clip_grad_norm is not None:
        raise FtcError(f"config {config.source}: optimizer.clip_grad_norm cannot take the norm of the sparse "
                       f"gradients of {', '.join(sparse)} (an embedding built with sparse=True; torch's "
                       "clip_grad_norm_ cannot either)",
                       "leave optimizer.clip_grad_norm out, or build the embedding with sparse=False")  # fmt: skip
    if config.optimizer.weight_decay:
        raise FtcError(f"config {config.source}: optimizer.weight_decay {config.optimizer.weight_decay:g} cannot apply "
                       f"to the sparse gradients of {', '.join(sparse)} (an embedding built with sparse=True)",
                       "set optimizer.weight_decay to 0, or build the embedding with sparse=False")  # fmt: skip


def small_split_warnings(config: Config, size: int, trained: int) -> list[str]:
    """Warnings for a training or held-out share of the data set's `size` samples smaller than one
    batch: the sampler (or held_out_indices) then repeats samples within every batch, so a batch's
    mean counts some samples twice or more. Legitimate (overfitting a handful of samples) but
    rarely meant (eval.fraction 0.999 leaves one sample to train on), so said, not refused."""
    lines, batch, data = [], config.batch_size, config.data
    sized = " (data.size)" if data.get("name") == "synthetic" else ""
    held = size - trained
    if trained < batch:
        held_out = f" ({held} more held out for eval)" if held else ""
        lines.append(f"config {config.source}: data set {data['name']!r} has {trained} samples{held_out} to train on, "
                     f"fewer than batch_size ({batch}): every batch repeats samples\n"
                     f"  fix: a larger data set{sized}{', a lower eval.fraction' if held else ''} or a smaller batch_size")  # fmt: skip
    if held and held < batch:
        raise_to = f"an eval.fraction of at least {batch / size:.3g}, " if batch < size / 2 else ""
        lines.append(f"config {config.source}: eval.fraction ({config.eval.fraction:g}) holds out {held} of the {size} "
                     f"samples of data set {data['name']!r}, fewer than batch_size ({batch}): every held-out batch repeats "
                     f"samples, so the held-out loss is a mean over {held}, some counted more often than others\n"
                     f"  fix: {raise_to}a larger data set{sized} or a smaller batch_size")  # fmt: skip
    return lines


def check_inputs(inputs: tuple | dict, pipeline: Pipeline, config: Config) -> None:
    """The data set's inputs must be what the pipeline was compiled for, but for the batch size:
    a stage meets another size as a wrong shape somewhere inside, far from its cause."""
    values = pipeline.manifest["values"]
    given = list(inputs) if isinstance(inputs, dict) else pipeline.inputs[: len(inputs)] + [
        f"#{k}" for k in range(len(pipeline.inputs), len(inputs))]  # fmt: skip
    if given != pipeline.inputs and sorted(given) != sorted(pipeline.inputs):
        # An input the pipeline does not take would be dropped by the pipeline modes while mode
        # single passes it to forward (an optional mask, say): the modes would train apart.
        shown = (f"{{{', '.join(repr(k) for k in inputs)}}}" if isinstance(inputs, dict)
                 else f"a tuple of {len(inputs)}")  # fmt: skip
        raise FtcError(f"data set {config.data['name']!r} gives inputs {shown}, but {pipeline.folder} was compiled "
                       f"for the inputs {pipeline.inputs} (the model file's example_inputs)",
                       "make the data set give the inputs example_inputs gives, or change example_inputs and "
                       "recompile")  # fmt: skip
    named = inputs.items() if isinstance(inputs, dict) else zip(pipeline.inputs, inputs)
    for name, value in named:
        spec = values.get(name, {})
        if spec.get("kind") != "tensor":
            continue
        dim, shape = spec.get("batch_dim"), list(spec["shape"])
        compiled = f"{spec['dtype']}[{', '.join('B' if d == dim else str(n) for d, n in enumerate(shape))}]"
        if not isinstance(value, torch.Tensor):
            # A container inside the inputs (a sample's ((x,),)): mode single failed with a raw
            # AttributeError cutting micro-batches, the stages deep inside their first op.
            raise FtcError(f"input {name!r} from data set {config.data['name']!r} is a {type(value).__name__}, but "
                           f"{pipeline.folder} was compiled for a tensor, {compiled}",
                           "give each sample's inputs as a tuple or dict of tensors, one per input of the model, not "
                           "nested in another tuple, list or dict")  # fmt: skip
        got = list(value.shape)
        same_shape = len(got) == len(shape) and all(a == b for d, (a, b) in enumerate(zip(got, shape)) if d != dim)
        if not same_shape or str(value.dtype).removeprefix("torch.") != spec["dtype"]:
            raise FtcError(
                f"input {name!r} from data set {config.data['name']!r} is {str(value.dtype).removeprefix('torch.')}"
                f"{got}, but {pipeline.folder} was compiled for {compiled}",
                "make the data set give what the model file's example_inputs gives (data options such as "
                "data.image), or change example_inputs and recompile",
            )
