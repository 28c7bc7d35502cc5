"""Data sets: the built-in ones and a user's own. A data set is what data.py's docstring
describes: `len()` and `[i]` giving one sample `(inputs, target)`.

Built-in data sets (the config's `data.name`; the other `data` keys are its options):
- "synthetic": `size` samples (default 1024): inputs from the model file's example_inputs(size)
  (cut along the dimension that example_inputs(1) has at 1; inputs without one are shared),
  targets from its `example_targets(size)` when it defines one, else uniform random numbers in
  [0, 1) shaped like the model's output (which suits mse, bce-with-logits and cross-entropy with
  class probabilities); both drawn under torch.manual_seed(`seed`, default 0).
- "bytes": a byte-level language-modelling corpus from text already on disk: the Python
  standard library's .py files (sorted by path, test folders left out, concatenated up to
  `max_bytes`, default 4 MB). Sample i is the window of context+1 bytes at i*context: input
  [:-1], target [1:]; the context is the sequence length of the model's example_inputs, whose
  one integer tensor may be positional or a keyword input (Hugging Face's input_ids).
- "digits": scikit-learn's 8x8 handwritten digits (1797 images shipped inside the package): 64
  features in [0, 1] and the class label. `image: [C, H, W]` resizes the image (bilinear) and
  repeats it over C channels for image models; `target: "mask"` gives the segmentation mask
  (pixels above 0.5) of the resized image instead of the label.
- "module": `module: "path/to/file.py:function"` (or, without `module`, a function named
  `dataset` in the model file) called with the other `data` options as keyword arguments; it
  returns a data set as above.

Every rank that reads data builds the data set itself, under `seeding.seeded(config seed)`:
Python's, NumPy's and torch's generators seeded alike, so a data set drawn from global randomness
comes out the same everywhere; `fingerprint` lets the ranks check that they agree.
"""

from __future__ import annotations

import inspect
import json
import os
import sysconfig
import typing
from pathlib import Path
from typing import Any, Callable

import torch

from ftc.ir import FtcError

from .data import TensorDataset, Whole, drawn, grown_dims, map_with_dims, outputs_on_meta, sized
from .model_file import ModelFile, function_from_file, user_error, user_frame


SKIPPED_FOLDERS = {"test", "tests", "site-packages", "idlelib", "__pycache__"}


class ByteWindows:
    """Next-byte prediction windows over a byte string; the input is positional, or the keyword
    input `key` (a Hugging Face model's input_ids)."""

    def __init__(self, corpus: torch.Tensor, context: int, key: str | None = None):
        self.corpus = corpus
        self.context = context
        self.key = key

    def __len__(self) -> int:
        return (len(self.corpus) - 1) // self.context

    def __getitem__(self, i: int) -> tuple[tuple[torch.Tensor] | dict[str, torch.Tensor], torch.Tensor]:
        window = self.corpus[i * self.context : (i + 1) * self.context + 1].long()
        return ({self.key: window[:-1]} if self.key is not None else (window[:-1],)), window[1:]


def build_dataset(options: dict, model_file: ModelFile, outputs: Any = None) -> Any:
    """The config's data set. `outputs`: what synthetic targets look like without example_targets
    (synthetic_targets of the output specs pipeline.json gives, output_specs)."""
    options = dict(options)
    name = options.pop("name")
    builder = {"synthetic": synthetic, "bytes": byte_corpus, "digits": digits, "module": from_module}[name]
    _check_options(builder, (model_file,), options, f"the {name!r} data set")
    if builder is not from_module:
        _check_option_values(builder, options)
    dataset = synthetic(model_file, **options, outputs=outputs) if name == "synthetic" else builder(model_file, **options)
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        made_by = f" (what {options.get('module') or f'{model_file.path}: dataset()'} returns)" if name == "module" else ""
        raise FtcError(f"data set {name!r}{made_by} is of type {type(dataset).__name__}, which has no len() and [i]",
                       "return a sequence of samples: a torch Dataset, or a list of (inputs, target) pairs")  # fmt: skip
    try:
        size = len(dataset)
    except Exception as exc:  # a __len__ that raises, or returns no integer (len() refuses a float)
        raise user_error(exc, f"len() of data set {name!r} ({type(dataset).__name__})",
                         [inspect.getsourcefile(type(dataset)) or ""], "make __len__ return the number of "
                         "samples, an int") from exc  # fmt: skip
    if size < 1:
        raise FtcError(f"data set {name!r} is empty")
    return dataset


def synthetic(model_file: ModelFile, size: int = 1024, seed: int = 0, *, outputs: Any = None) -> TensorDataset:
    """`size` samples of example_inputs, with example_targets or, without it, targets drawn as
    `outputs` says (synthetic_targets; without them, uniform [0, 1) shaped like the outputs of
    the model run on the meta device)."""
    example_targets = getattr(model_file.module, "example_targets", None)
    if example_targets is None and outputs is None:
        outputs = outputs_on_meta(model_file)
    dims = target_batch_dims(model_file, outputs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inputs = model_file.inputs(size)
        if example_targets is not None:
            targets = _example_targets(model_file, size)
        else:
            targets = map_with_dims(lambda spec, _: drawn(spec, sized(spec, size)), outputs, 0)
    # Each target's batch dimension first, so that TensorDataset cuts samples from it; a target
    # without one is given whole to every batch.
    targets = map_with_dims(lambda t, dim: Whole(t) if dim is None else t.movedim(dim, 0), targets, dims)
    return TensorDataset(_samples_first(inputs, model_file, size), targets, size)


def target_batch_dims(model_file: ModelFile, outputs: Any = None) -> Any:
    """How targets are batched, as a tree of dimensions (see dim_of): as example_targets batches
    them (the dimension that doubles from example_targets(1) to example_targets(2), None where
    none does); without it, as the model's outputs that synthetic targets are shaped like
    (`outputs`: their specs); otherwise along dimension 0."""
    if getattr(model_file.module, "example_targets", None) is not None:
        with torch.random.fork_rng(devices=[]):
            one, two = _example_targets(model_file, 1), _example_targets(model_file, 2)
        return grown_dims(one, two)
    if outputs is not None:
        return map_with_dims(lambda spec, _: spec.batch_dim, outputs, 0)
    return 0


def _example_targets(model_file: ModelFile, size: int) -> Any:
    try:
        return model_file.module.example_targets(size)
    except Exception as exc:
        raise FtcError(f"{model_file.path}: example_targets({size}) raised {type(exc).__name__}: {exc}"
                       f"{user_frame(exc, model_file.path)}") from exc  # fmt: skip


def _samples_first(inputs: tuple | dict, model_file: ModelFile, size: int) -> tuple | dict:
    """`inputs` with each tensor's batch dimension moved first (a sequence-first [T, B, D] input
    becomes [B, T, D]); the batch dimension is the one example_inputs(1) has at 1."""
    # Made where example_inputs makes them and then moved: under torch.device("meta"), an input
    # built by a data-dependent op (repeat_interleave by drawn lengths) cannot be made at all.
    with torch.random.fork_rng(devices=[]):
        one = model_file.inputs(1, "meta")

    def first(value: torch.Tensor, single: Any) -> torch.Tensor:
        if not isinstance(single, torch.Tensor) or single.dim() != value.dim():
            return value
        dims = [d for d in range(value.dim()) if value.shape[d] == size and single.shape[d] == 1]
        return value.movedim(dims[0], 0) if dims else value

    if isinstance(inputs, dict):
        return {key: first(value, one.get(key) if isinstance(one, dict) else None) for key, value in inputs.items()}
    return tuple(first(value, single) for value, single in zip(inputs, one))


def byte_corpus(model_file: ModelFile, max_bytes: int = 4_000_000) -> ByteWindows:
    inputs = model_file.inputs(1)
    tokens = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    if len(tokens) != 1 or tokens[0].dim() != 2 or tokens[0].is_floating_point():
        raise FtcError(f"{model_file.path}: the bytes data set needs a model that takes one integer tensor "
                       "[batch, context] of token ids (positional, or one keyword input such as input_ids)",
                       "use another data set (see ftc.runtime.data)")  # fmt: skip
    context = tokens[0].shape[1]
    key = next(iter(inputs)) if isinstance(inputs, dict) else None
    files = stdlib_sources()
    chunks, total = [], 0
    for path in files:
        data = path.read_bytes()
        chunks.append(data[: max_bytes - total])
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    corpus = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    if len(corpus) < context + 1:
        raise FtcError(f"the bytes corpus ({len(corpus)} bytes) is shorter than one window of {context + 1}")
    return ByteWindows(corpus, context, key)


def stdlib_sources() -> list[Path]:
    """The standard library's .py files, sorted by path, without test suites, IDLE and
    installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in SKIPPED_FOLDERS]
        files.extend(Path(folder) / name for name in names if name.endswith(".py"))
    return sorted(files)


def digits(model_file: ModelFile, image: list[int] | None = None, target: str = "label") -> TensorDataset:
    from sklearn.datasets import load_digits

    loaded = load_digits()
    pixels = torch.tensor(loaded.data, dtype=torch.float32) / 16.0
    if target not in ("label", "mask"):
        raise FtcError(f'config key \'data.target\' is {target!r}; choose "label" or "mask"')
    if image is None:
        if target == "mask":
            raise FtcError("config key 'data.target' is \"mask\", which needs data.image [C, H, W]")
        return TensorDataset((pixels,), torch.tensor(loaded.target, dtype=torch.long))
    if len(image) != 3:
        raise FtcError(f"config key 'data.image' is {image}; give [channels, height, width]")
    channels, height, width = image
    resized = torch.nn.functional.interpolate(pixels.view(-1, 1, 8, 8), size=(height, width), mode="bilinear")
    if target == "mask":
        return TensorDataset((resized.expand(-1, channels, -1, -1).contiguous(),), (resized > 0.5).float())
    return TensorDataset((resized.expand(-1, channels, -1, -1).contiguous(),), torch.tensor(loaded.target))


def from_module(model_file: ModelFile, module: str | None = None, **options: Any) -> Any:
    if module is None:
        function = getattr(model_file.module, "dataset", None)
        where = f"{model_file.path}: dataset"
        if not callable(function):
            raise FtcError(f"data set 'module' without data.module needs a function dataset() in {model_file.path}",
                           "add `def dataset(**options)` to the model file or set data.module to \"file.py:function\"")  # fmt: skip
    else:
        where = module
        function = function_from_file(module, "data.module", "ftc_data_module")
    _check_options(function, (), options, where)
    try:
        return function(**options)
    except Exception as exc:
        raise user_error(exc, f"the data set {where}({', '.join(f'{k}={v!r}' for k, v in options.items())})",
                         [inspect.getsourcefile(function) or ""], "check the data options (config key 'data') "
                         "against the function's parameters") from exc  # fmt: skip


# The built-in data sets' options: what each must be (their signatures' annotations), and the
# least a count may be. A wrong one failed far from the config: a size of "100" in the model
# file's example_inputs, an image of "abc" as an internal error.
_OPTION_KINDS = {int: "an integer", str: "a string", list[int]: "a list of integers"}
_OPTION_MINIMUM = {"size": 1, "max_bytes": 1}


def _check_option_values(builder: Callable, options: dict) -> None:
    hints = typing.get_type_hints(builder)
    for key, value in options.items():
        hint = hints.get(key)
        if value is None and type(None) in typing.get_args(hint):
            continue
        kind = next((arg for arg in (hint, *typing.get_args(hint)) if arg in _OPTION_KINDS), None)
        if kind is None:  # synthetic's outputs: the runtime's, not an option
            raise FtcError(f"config key 'data.{key}' is not an option of this data set",
                           "see the data-set options in ftc.runtime.data's docstring")  # fmt: skip
        if kind is int:
            fits = isinstance(value, int) and not isinstance(value, bool)
        elif kind is str:
            fits = isinstance(value, str)
        else:
            fits = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        if not fits:
            raise FtcError(f"config key 'data.{key}' must be {_OPTION_KINDS[kind]}"
                           f"{' above 0' if kind == list[int] else ''}, not {json.dumps(value)}")  # fmt: skip
        if kind is int and value < _OPTION_MINIMUM.get(key, value):
            raise FtcError(f"config key 'data.{key}' is {value}; it must be at least {_OPTION_MINIMUM[key]}")


def _check_options(function: Callable, positional: tuple, options: dict, what: str) -> None:
    signature = inspect.signature(function)
    try:
        signature.bind(*positional, **options)
    except TypeError as exc:
        parameters = list(signature.parameters.values())[len(positional) :]
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        takes = [p.name for p in parameters if p.kind in named and p.name != "outputs"]  # outputs: synthetic's own
        open_ended = any(p.kind is p.VAR_KEYWORD for p in parameters)
        unknown = [] if open_ended else [key for key in options if key not in takes]
        required = [p.name for p in parameters if p.kind in named and p.default is p.empty and p.name not in options]
        if not unknown and required:
            raise FtcError(f"config key 'data.{required[0]}' is missing: {what} requires it (its options: "
                           f"{', '.join(takes)})",
                           f"set data.{required[0]} in the config's \"data\" object, or --set data.{required[0]}=VALUE")  # fmt: skip
        # "data" merges with a base config's key by key, so an option of the base's data set
        # comes along when a config names another one.
        wrong = (f"config key 'data.{unknown[0]}': {what} takes no option {unknown[0]!r}" if unknown
                 else f"config key 'data': {what} cannot take the options {sorted(options)}: {exc}")  # fmt: skip
        raise FtcError(f"{wrong} (its options: {', '.join(takes) or 'none'})",
                       "leave out the options it does not take; a \"data\" object merges with its base config's "
                       "key by key: give it whole to replace it (--set 'data={\"name\": ...}')") from exc  # fmt: skip
