"""The seeded sampler and batching, and the synthetic targets drawn for a model's outputs.

A data set is anything with `len()` and `[i]` that gives one sample `(inputs, target)`: inputs a
tuple of tensors (the model's positional inputs) or a dict of tensors (keyword inputs), target a
tensor (or a tuple/dict of tensors), all without a batch dimension. `collate` stacks samples
into a batch.

The sampler is a pure function of (seed, batch number): sample positions run through one
seeded permutation per epoch, so every rank, every mode and every resumed run draws the same
batches without talking to each other. That is how the ranks that need inputs (the first
stages) and the rank that computes the loss (which needs targets) read their own halves of
the same batch: targets never travel through the pipe.

The data sets themselves (built-in ones and a user's own) are datasets.py's; TensorDataset, the
container a user's data set function may return (configs/two_tower_clicks.py), is here.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils._pytree import keystr, tree_flatten_with_path

from ftc.ir import FtcError

from .model_file import ModelFile, user_error


class Whole:
    """A sample's share of a tensor that every sample shares (position ids [1, T], a 0-dim
    temperature): a batch takes the tensor as it is instead of stacking copies."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class TensorDataset:
    """Samples cut from batched tensors: inputs (a tuple or dict of tensors) and targets (a tensor,
    tuple or dict), with the sample index first. A tensor whose first dimension is not the
    number of samples (`size`; default: the first input's) is shared by every sample."""

    def __init__(self, inputs: tuple | dict, targets: Any, size: int | None = None):
        self.inputs = inputs
        self.targets = targets
        first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs[0]
        self.size = first.shape[0] if size is None else size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        def cut(tensor: torch.Tensor) -> torch.Tensor | Whole:
            return tensor[i] if tensor.dim() > 0 and tensor.shape[0] == self.size else Whole(tensor)

        return tree_map(cut, self.inputs), tree_map(cut, self.targets)


class Sampler:
    """Batch b is sample positions b*batch_size ... (b+1)*batch_size - 1 of an endless stream that
    walks a fresh permutation of the data set every epoch; epoch e's permutation comes from
    seed and e alone."""

    def __init__(self, size: int, batch_size: int, seed: int):
        if size < 1:
            raise FtcError("the data set is empty")
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self._epoch = -1
        self._permutation = torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutation = torch.randperm(self.size, generator=generator)
            self._epoch = epoch
        return self._permutation

    def indices(self, batch: int) -> list[int]:
        positions = range(batch * self.batch_size, (batch + 1) * self.batch_size)
        return [int(self.permutation(p // self.size)[p % self.size]) for p in positions]


def split_held_out(size: int, fraction: float, source: str) -> int:
    """How many of a data set's `size` samples training draws from (the first ones); the rest,
    `fraction` of them (at least one), are held out for evaluation."""
    held = max(1, round(size * fraction))
    if held >= size:
        raise FtcError(f"config {source}: key 'eval.fraction' ({fraction:g}) holds out all {size} samples of the "
                       "data set", "lower eval.fraction, or use a larger data set")  # fmt: skip
    return size - held


def held_out_indices(train_size: int, size: int, batch: int, batch_size: int) -> list[int]:
    """Held-out batch `batch`: the held-out samples in order, from where the previous batch
    ended, wrapping around."""
    held = size - train_size
    return [train_size + (batch * batch_size + k) % held for k in range(batch_size)]


def epoch_steps(epochs: float, size: int, samples_per_step: int) -> int:
    """The steps that draw `epochs` passes over a data set of `size` samples: the sampler's stream
    runs on across epochs, so the last step may take its tail from the next epoch's permutation."""
    return max(1, math.ceil(epochs * size / samples_per_step))


def tree_map(fn: Callable[[torch.Tensor], Any], tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, Whole):  # already every sample's share
        return tree
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return tuple(tree_map(fn, v) for v in tree)
    raise FtcError(f"a sample holds a {type(tree).__name__}; samples hold tensors (in tuples or dicts)")


def dim_of(dims: Any, key: str | int) -> Any:
    """The batch dimension(s) of a tree's item `key`: `dims` is a tree of the same structure, or
    one dimension (an int, or None) for every tensor in it."""
    if isinstance(dims, dict):
        return dims.get(key, 0)
    if isinstance(dims, (tuple, list)):
        return dims[key] if isinstance(key, int) and key < len(dims) else 0
    return dims


@dataclass(frozen=True)
class OutputSpec:
    """One model output as pipeline.json describes it: what a synthetic target is shaped like."""

    shape: tuple[int, ...]  # with size 1 in the batch dimension
    dtype: str
    batch_dim: int | None
    classes: int | None = None  # a synthetic target of class indices in [0, classes), not uniform numbers


def map_with_dims(fn: Callable[[Any, int | None], Any], tree: Any, dims: Any) -> Any:
    """fn(leaf, its batch dimension) over a tree of tensors (or OutputSpecs) and its batch
    dimensions (dim_of)."""
    if isinstance(tree, dict):
        return {k: map_with_dims(fn, v, dim_of(dims, k)) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return tuple(map_with_dims(fn, v, dim_of(dims, i)) for i, v in enumerate(tree))
    if isinstance(tree, (torch.Tensor, OutputSpec)):
        return fn(tree, dims if isinstance(dims, int) or dims is None else 0)
    return tree


def collate(samples: Sequence[Any], dims: Any = 0) -> Any:
    """Stack samples (tensors, or tuples/dicts of tensors of the same structure) into a batch,
    each tensor along its batch dimension (`dims`, see dim_of; None stacks along 0); a tensor all
    samples share (Whole) is taken as it is."""
    first = samples[0]
    if isinstance(first, Whole):
        return first.tensor
    if isinstance(first, torch.Tensor):
        dim = dims if isinstance(dims, int) else 0
        return torch.stack(list(samples), dim=dim)
    if isinstance(first, dict):
        return {k: collate([s[k] for s in samples], dim_of(dims, k)) for k in first}
    if isinstance(first, (tuple, list)):
        return tuple(collate([s[i] for s in samples], dim_of(dims, i)) for i in range(len(first)))
    raise FtcError(f"a sample holds a {type(first).__name__}; samples hold tensors (in tuples or dicts)")


def collate_inputs(samples: Sequence[Any], batch_dims: dict[str, int | None]) -> Any:
    """Stack the samples' model inputs, each along its batch dimension (`batch_dims`, by input
    name in forward's order: 0 for most, 1 for a sequence-first [T, B, D] input)."""
    first, names = samples[0], list(batch_dims)

    def dim(key: str | int) -> int:
        name = names[key] if isinstance(key, int) and key < len(names) else key
        return batch_dims.get(name) or 0

    if isinstance(first, dict):
        return {k: collate([s[k] for s in samples], dim(k)) for k in first}
    if isinstance(first, (tuple, list)):
        return tuple(collate([s[i] for s in samples], dim(i)) for i in range(len(first)))
    return (collate(samples, dim(0)),)  # a bare tensor: the one positional input


def load_batch(
    dataset: Any, indices: list[int], inputs: bool, targets: bool, batch_dims: dict[str, int | None] | None = None,
    target_dims: Any = 0,
) -> tuple[Any, Any]:
    """The batch of `indices`: (inputs or None, targets or None), only the halves asked for;
    inputs stacked along their `batch_dims` (by input name; default: dimension 0), targets along
    `target_dims` (datasets.target_batch_dims)."""
    samples = []
    for i in indices:
        try:
            sample = dataset[i]
        except Exception as exc:
            raise user_error(exc, f"the data set ({type(dataset).__name__})[{i}]",
                             [inspect.getsourcefile(type(dataset)) or ""], "fix the data set's __getitem__") from exc  # fmt: skip
        if not isinstance(sample, (tuple, list)) or len(sample) != 2:
            raise FtcError(f"the data set ({type(dataset).__name__})[{i}] is a {type(sample).__name__}"
                           f"{f' of {len(sample)}' if isinstance(sample, (tuple, list)) else ''}, not a pair (inputs, target)",
                           "return (inputs, target): inputs a tuple or dict of tensors, target a tensor (or a "
                           "tuple or dict of them)")  # fmt: skip
        samples.append(sample)
    _check_structures(dataset, indices, samples)
    try:
        return (
            collate_inputs([s[0] for s in samples], batch_dims or {}) if inputs else None,
            collate([s[1] for s in samples], target_dims) if targets else None,
        )
    except RuntimeError as exc:  # torch.stack: samples of different shapes
        raise FtcError(f"the data set ({type(dataset).__name__}) gave samples that do not stack into one batch: "
                       f"{_unlike_samples(samples, indices)}",
                       "make every sample's inputs and target the same shapes (pad or crop them in the data "
                       "set)") from exc  # fmt: skip


def _check_structures(dataset: Any, indices: list[int], samples: list) -> None:
    """Every sample holds only tensors, in the first sample's structure (dict keys in any order):
    stacking goes by the first sample's, so another's extra tensors would be dropped, and a
    missing one would fail as a bare KeyError or IndexError."""
    first_structure, first_paths = None, None
    for i, sample in zip(indices, samples):
        structure = _structure(sample)
        if first_paths is not None and structure == first_structure:
            continue  # the common case: the paths are spelled out only for the first and an odd one
        paths = []
        for half, tree in zip(("inputs", "target"), sample):
            for path, leaf in tree_flatten_with_path(tree)[0]:
                if not isinstance(leaf, (torch.Tensor, Whole)):
                    raise FtcError(f"the data set ({type(dataset).__name__})[{i}]'s {half}{keystr(path)} is of type "
                                   f"{type(leaf).__name__}, not a tensor",
                                   "return tensors: e.g. torch.tensor(label) for a number, torch.as_tensor(array) "
                                   "for a NumPy array")  # fmt: skip
                paths.append(f"{half}{keystr(path)}")
        paths.sort()  # dict keys in any order
        if first_paths is None:
            first_structure, first_paths = structure, paths
        elif paths != first_paths:
            raise FtcError(f"the data set ({type(dataset).__name__}) gave samples that do not stack into one batch: "
                           f"{_unlike_samples(samples, indices)}",
                           "give every sample the same inputs and target (the same tuple lengths and dict "
                           "keys)")  # fmt: skip


def _structure(tree: Any) -> Any:
    """A comparable outline of a sample: equal for samples whose tensors sit at the same places
    (dict keys in any order); a non-tensor leaf stands as its type. Hand-written rather than
    pytree's TreeSpec, whose flattening cost ~7 µs a sample on every batch, and whose dicts
    compare in key order."""
    if isinstance(tree, (torch.Tensor, Whole)):
        return None
    if isinstance(tree, dict):
        return {key: _structure(value) for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        return [_structure(value) for value in tree]
    return type(tree)


def _unlike_samples(samples: list, indices: list[int]) -> str:
    """Where the batch's first sample and another differ: 'inputs[0] is [64] in sample 5, [65]
    in sample 3' (the data set's indices)."""

    def shapes(sample: tuple) -> dict[str, list[int]]:
        return {f"{half}{keystr(path)}": list((leaf.tensor if isinstance(leaf, Whole) else leaf).shape)
                for half, tree in zip(("inputs", "target"), sample)
                for path, leaf in tree_flatten_with_path(tree)[0] if isinstance(leaf, (torch.Tensor, Whole))}  # fmt: skip

    first = shapes(samples[0])
    for sample, index in zip(samples[1:], indices[1:]):
        other = shapes(sample)
        for path, shape in first.items():
            if path not in other:
                return f"{path} is in sample {indices[0]}, not in sample {index}"
            if other[path] != shape:
                return f"{path} is {shape} in sample {indices[0]}, {other[path]} in sample {index}"
        for path in other.keys() - first.keys():
            return f"{path} is in sample {index}, not in sample {indices[0]}"
    return "their structures differ"


def fingerprint(dataset: Any, indices: list[int]) -> str:
    """A digest of the samples at `indices` (inputs and targets, values and shapes)."""
    digest = hashlib.sha256()
    inputs, targets = load_batch(dataset, indices, True, True)

    def add(tensor: torch.Tensor) -> torch.Tensor:
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return tensor

    tree_map(add, (inputs, targets))
    return digest.hexdigest()[:16]


def grown_dims(one: Any, two: Any) -> Any:
    if isinstance(one, torch.Tensor) and isinstance(two, torch.Tensor):
        grown = [d for d in range(min(one.dim(), two.dim())) if two.shape[d] == 2 * one.shape[d] > 0]
        return grown[0] if grown else None
    if isinstance(one, dict) and isinstance(two, dict):
        return {key: grown_dims(value, two.get(key)) for key, value in one.items()}
    if isinstance(one, (tuple, list)) and isinstance(two, (tuple, list)):
        return tuple(grown_dims(a, b) for a, b in zip(one, two))
    return 0


def output_specs(pipeline: Any, micro_batch_size: int) -> Any:
    """The model's outputs as pipeline.json describes them, in the output's structure (None when
    one is not a tensor, or has its batch folded into a dimension, [B*T, V]). A dimension that
    also grows with the batch (`other_batch_dims`: contrastive logits [B, B], one column per
    sample of the micro-batch) is sized for micro-batches of `micro_batch_size`, the size every
    forward of the run sees, so that a target row fits it (a class index below B)."""
    values, compiled = pipeline.manifest["values"], pipeline.manifest["batch_size"]
    specs = {}
    for name in pipeline.outputs:
        spec = values.get(name)
        if spec is None or spec.get("kind") != "tensor":
            return None
        dim, shape = spec.get("batch_dim"), list(spec["shape"])
        if dim is not None:
            if shape[dim] != compiled:
                return None
            shape[dim] = 1
        for other in spec.get("other_batch_dims", []):
            shape[other] = shape[other] // compiled * micro_batch_size
        specs[name] = OutputSpec(tuple(shape), spec["dtype"], dim)
    return pipeline.assemble_output(specs)


def outputs_on_meta(model_file: ModelFile) -> Any:
    """Output specs like output_specs', for a caller without a pipeline: the model run on the
    meta device at batch sizes 1 and 2 (the batch dimension is the one that doubles)."""
    model = model_file.build("meta")
    runs = []
    try:
        for size in (1, 2):
            with torch.random.fork_rng(devices=[]):
                inputs = model_file.inputs(size, "meta")
            with torch.no_grad():
                runs.append(model(**inputs) if isinstance(inputs, dict) else model(*inputs))
    except Exception as exc:
        raise FtcError(f"{model_file.path}: synthetic targets are shaped like the model's outputs, but the model does "
                       f"not run on the meta device ({type(exc).__name__}: {exc})",
                       "define example_targets(batch_size) in the model file") from exc  # fmt: skip
    dims = grown_dims(*runs)

    def spec(t: torch.Tensor, dim: int | None) -> OutputSpec:
        if dim is not None and t.shape[dim] != 1:
            raise FtcError(f"{model_file.path}: synthetic targets are shaped like the model's outputs, but an output "
                           f"of shape {list(t.shape)} at batch size 1 has the batch folded into a dimension",
                           "define example_targets(batch_size) in the model file")  # fmt: skip
        return OutputSpec(tuple(t.shape), str(t.dtype).removeprefix("torch."), dim)

    return map_with_dims(spec, runs[0], dims)


def synthetic_targets(outputs: Any, loss_fn: Callable | None) -> Any:
    """What synthetic targets look like (OutputSpecs), for the model's outputs (`outputs`): the
    target_candidates entry that choose_target picks for loss_fn at batch size 2."""
    if outputs is None or loss_fn is None:
        return outputs
    with torch.random.fork_rng(devices=[]):
        fake = map_with_dims(lambda spec, _: torch.randn(sized(spec, 2)).requires_grad_()
                             if getattr(torch, spec.dtype).is_floating_point else drawn(spec, sized(spec, 2)), outputs, 0)  # fmt: skip

        def takes(candidate: Any) -> bool:
            try:
                loss = loss_fn(fake, map_with_dims(lambda spec, _: drawn(spec, sized(spec, 2)), candidate, 0))
            except Exception:  # a target of the wrong kind
                return False
            return isinstance(loss, torch.Tensor) and loss.numel() == 1

        chosen = choose_target(target_candidates(outputs), takes)
    return outputs if chosen is None else chosen


def choose_target(candidates: list[Any], takes: Callable[[Any], bool]) -> Any | None:
    """The candidate a loss is given: class indices where the loss takes them and refuses
    numbers of the same shape (cross_entropy, nll_loss: a classifier's loss, which would also
    take the uniform numbers shaped like its logits, as class probabilities that sum to no
    distribution, and train the model towards nothing), else the first candidate it takes; None
    when it takes none. The same rule picks the synthetic data set's targets and the loss the
    compiler's profile prices (ftc/profiling/loss.py). The warnings of the losses a candidate does
    not fit (mse_loss on a broadcast target) are the probe's, not the user's: they stay quiet."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for candidate in candidates:
            if isinstance(candidate, OutputSpec) and candidate.classes is not None and takes(candidate):
                if not takes(OutputSpec(candidate.shape, "float32", candidate.batch_dim)):
                    return candidate
        return next((candidate for candidate in candidates if takes(candidate)), None)


def target_candidates(outputs: Any) -> list[Any]:
    """The targets a loss_fn may want for outputs described by `outputs` (a tree of OutputSpecs),
    in the order they are tried: uniform numbers in [0, 1) shaped like all the outputs (mse,
    binary cross-entropy, cross-entropy on class probabilities); then, for each output tensor in
    order (a dict output, as Hugging Face models return, has several), one tensor shaped like it
    and its class indices (class_index_targets); choose_target picks one. The synthetic data set and the compiler's loss
    profile (ftc/profiling/loss.py) both follow this rule, so the loss the profile prices is the
    loss training computes."""
    leaves = _output_leaves(outputs)
    return [outputs] + [c for leaf in leaves for c in (leaf, *class_index_targets(leaf)) if c is not outputs]


def _output_leaves(outputs: Any) -> list[OutputSpec]:
    if isinstance(outputs, OutputSpec):
        return [outputs]
    items = outputs.values() if isinstance(outputs, dict) else outputs if isinstance(outputs, (tuple, list)) else []
    return [leaf for item in items for leaf in _output_leaves(item)]


def class_index_targets(output: OutputSpec) -> list[OutputSpec]:
    """Targets of class indices for one output tensor: without its class dimension, dim 1
    (torch's losses) or the last (a language model's logits), never the batch dimension."""
    if len(output.shape) < 2:
        return []
    targets = []
    for dim in dict.fromkeys((1, len(output.shape) - 1)):
        if dim == output.batch_dim:
            continue
        batch_dim = output.batch_dim if output.batch_dim is None or output.batch_dim < dim else output.batch_dim - 1
        shape = tuple(n for d, n in enumerate(output.shape) if d != dim)
        targets.append(OutputSpec(shape, "int64", batch_dim, classes=output.shape[dim]))
    return targets


def drawn(spec: OutputSpec, shape: list[int], device: str | torch.device = "cpu") -> torch.Tensor:
    """A synthetic target of `shape` as the spec says: class indices or uniform [0, 1) numbers
    (for an integer or bool output, such as an argmax the model also returns, those are 0),
    made on `device` (the compiler's loss profile draws a language model's on the meta device)."""
    if spec.classes is not None:
        return torch.randint(0, spec.classes, shape, device=device)
    dtype = getattr(torch, spec.dtype)
    if not (dtype.is_floating_point or dtype.is_complex):
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.rand(shape, dtype=dtype, device=device)


def sized(spec: OutputSpec, size: int) -> list[int]:
    shape = list(spec.shape)
    if spec.batch_dim is not None:
        shape[spec.batch_dim] = size
    return shape


