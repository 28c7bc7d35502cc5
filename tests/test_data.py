"""Data sets and the seeded sampler, against independent computations of what they should be."""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

import pytest
import torch

from ftc.ir import FtcError
from ftc.runtime.data import Sampler, collate, load_batch
from ftc.runtime.datasets import build_dataset
from ftc.runtime.model_file import load_model_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def test_sampler_walks_one_permutation_per_epoch_and_is_a_function_of_seed_and_batch():
    sampler = Sampler(10, 4, seed=5)
    stream = [i for b in range(5) for i in sampler.indices(b)]  # 20 positions: exactly 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]
    fresh = Sampler(10, 4, seed=5)
    assert fresh.indices(3) == sampler.indices(3)  # no hidden state: any batch, any order
    assert Sampler(10, 4, seed=6).indices(0) != sampler.indices(0)


def test_collate_stacks_tuples_and_dicts():
    samples = [({"a": torch.tensor([i, i])}, torch.tensor(i)) for i in range(3)]
    inputs, targets = load_batch(samples, [2, 0], inputs=True, targets=True)
    assert torch.equal(inputs["a"], torch.tensor([[2, 2], [0, 0]])) and torch.equal(targets, torch.tensor([2, 0]))
    assert load_batch(samples, [1], inputs=False, targets=True)[0] is None
    assert collate([(torch.zeros(2), torch.ones(1))] * 2)[1].shape == (2, 1)


def test_bytes_are_the_sorted_stdlib_sources_in_next_byte_windows():
    dataset = build_dataset({"name": "bytes", "max_bytes": 5000}, load_model_file(EXAMPLES / "gpt.py"))
    root = Path(sysconfig.get_paths()["stdlib"])
    first = min(p for p in root.glob("*.py"))  # __future__.py, before any folder
    expected = first.read_bytes()
    (x,), y = dataset[0]
    assert x.shape == (64,) and x.dtype == torch.int64
    assert bytes(x.tolist()) == expected[:64] and bytes(y.tolist()) == expected[1:65]
    (x1,), _ = dataset[1]
    assert x1[0] == y[-1]
    assert len(dataset) == (5000 - 1) // 64


def test_bytes_feed_a_model_that_takes_its_token_ids_by_keyword(tmp_path):
    """A Hugging Face language model takes input_ids as a keyword input: it was refused as not
    taking "one integer tensor"."""
    path = tmp_path / "keyword_lm.py"
    path.write_text("import torch\n\ndef build_model():\n    return torch.nn.Embedding(256, 4)\n\n"
                    "def example_inputs(batch_size):\n    return {'input_ids': torch.zeros(batch_size, 16, dtype=torch.long)}\n")  # fmt: skip
    dataset = build_dataset({"name": "bytes", "max_bytes": 1000}, load_model_file(path))
    inputs, target = dataset[0]
    assert list(inputs) == ["input_ids"] and inputs["input_ids"].shape == (16,) and target.shape == (16,)
    assert torch.equal(inputs["input_ids"][1:], target[:-1])


def test_digits_labels_images_and_masks():
    from sklearn.datasets import load_digits

    model_file = load_model_file(EXAMPLES / "mlp.py")
    reference = load_digits()
    flat = build_dataset({"name": "digits"}, model_file)
    (x,), y = flat[7]
    assert torch.allclose(x, torch.tensor(reference.data[7], dtype=torch.float32) / 16) and y == reference.target[7]
    (image,), label = build_dataset({"name": "digits", "image": [3, 32, 32]}, model_file)[7]
    assert image.shape == (3, 32, 32) and torch.equal(image[0], image[2]) and label == reference.target[7]
    (image,), mask = build_dataset({"name": "digits", "image": [1, 16, 16], "target": "mask"}, model_file)[7]
    assert torch.equal(mask, (image > 0.5).float())


def test_synthetic_uses_example_targets_or_output_shaped_noise(tmp_path):
    model_path = tmp_path / "tiny.py"
    model_path.write_text(
        "import torch\n"
        "def build_model(): return torch.nn.Linear(3, 2)\n"
        "def example_inputs(batch_size): return (torch.randn(batch_size, 3),)\n"
    )
    plain = build_dataset({"name": "synthetic", "size": 6, "seed": 1}, load_model_file(model_path))
    torch.manual_seed(1)
    expected_inputs = torch.randn(6, 3)
    expected_targets = torch.rand(6, 2)
    (x,), y = plain[4]
    assert torch.equal(x, expected_inputs[4]) and torch.equal(y, expected_targets[4])
    model_path.write_text(model_path.read_text() + "def example_targets(batch_size): return torch.arange(batch_size)\n")
    (x,), y = build_dataset({"name": "synthetic", "size": 6, "seed": 1}, load_model_file(model_path))[4]
    assert torch.equal(x, expected_inputs[4]) and y == 4


def test_synthetic_inputs_made_by_a_data_dependent_op_are_the_examples(tmp_path):
    """Packed sequences' segment ids repeat each id a drawn number of times, which the meta device
    cannot do: the data set stopped every mode with an error that blamed example_inputs' sizes."""
    model_path = tmp_path / "packed.py"
    model_path.write_text(
        "import torch\n"
        "def build_model(): return torch.nn.Embedding(8, 2)\n"
        "def example_inputs(batch_size):\n"
        "    lengths = torch.randint(1, 4, (batch_size, 8))\n"
        "    return (torch.stack([torch.repeat_interleave(torch.arange(8), n)[:8] for n in lengths]),)\n"
        "def example_targets(batch_size): return torch.randn(batch_size, 8, 2)\n"
    )
    model_file = load_model_file(model_path)
    dataset = build_dataset({"name": "synthetic", "size": 6, "seed": 1}, model_file)
    torch.manual_seed(1)
    (expected_ids,), expected_targets = model_file.inputs(6), model_file.module.example_targets(6)
    (ids,), targets = dataset[4]
    assert torch.equal(ids, expected_ids[4]) and torch.equal(targets, expected_targets[4])


def test_module_data_sets_from_a_file_or_the_model_file(tmp_path):
    data_path = tmp_path / "squares.py"
    data_path.write_text(
        "import torch\n"
        "def squares(count, scale=1.0):\n"
        "    return [((torch.tensor([float(i)]),), torch.tensor([scale * i * i])) for i in range(count)]\n"
    )
    model_file = load_model_file(EXAMPLES / "mlp.py")
    dataset = build_dataset({"name": "module", "module": f"{data_path}:squares", "count": 5, "scale": 2.0}, model_file)
    assert len(dataset) == 5 and dataset[3][1].item() == 18.0
    with pytest.raises(FtcError, match=re.escape("config key 'data.size': " + f"{data_path}:squares takes no option 'size' (its options: count, scale)")):
        build_dataset({"name": "module", "module": f"{data_path}:squares", "size": 5}, model_file)
    # A required option left out: the hint said to leave options out.
    with pytest.raises(FtcError, match=re.escape(f"config key 'data.count' is missing: {data_path}:squares requires it")) as error:
        build_dataset({"name": "module", "module": f"{data_path}:squares", "scale": 2.0}, model_file)
    assert "--set data.count=" in error.value.hint
    with pytest.raises(FtcError, match=re.escape(f"the data set {data_path}:squares(count='x') raised TypeError")) as error:
        build_dataset({"name": "module", "module": f"{data_path}:squares", "count": "x"}, model_file)
    assert "squares.py:3" in error.value.message  # the line of the user's function that raised
    with pytest.raises(FtcError, match="needs a function dataset"):
        build_dataset({"name": "module"}, model_file)
    with pytest.raises(FtcError, match=re.escape("config key 'data.colour': the 'digits' data set takes no option 'colour' (its options: image, target)")):
        build_dataset({"name": "digits", "colour": True}, model_file)
    for module, error in [
        ("squares", "config key 'data.module' is 'squares'"),
        (f"{tmp_path / 'nowhere.py'}:squares", "nowhere.py does not exist"),
        (f"{data_path}:cubes", "squares.py defines no function cubes()"),
    ]:
        with pytest.raises(FtcError, match=re.escape(error)):
            build_dataset({"name": "module", "module": module}, model_file)
    data_path.write_text(data_path.read_text() + "def count(count):\n    return count\n")
    with pytest.raises(FtcError, match=re.escape(f"data set 'module' (what {data_path}:count returns) is of type int")):
        build_dataset({"name": "module", "module": f"{data_path}:count", "count": 3}, model_file)


def test_a_data_set_file_imports_modules_beside_it(tmp_path):
    """A "module" data set's file could not import a helper beside it (a model file can):
    "No module named 'square_helpers'"."""
    (tmp_path / "square_helpers.py").write_text("def square(i):\n    return i * i\n")
    data_path = tmp_path / "squares_beside.py"
    data_path.write_text(
        "import torch\n"
        "from square_helpers import square\n"
        "def squares(count):\n"
        "    return [((torch.tensor([float(i)]),), torch.tensor([float(square(i))])) for i in range(count)]\n"
    )
    dataset = build_dataset({"name": "module", "module": f"{data_path}:squares", "count": 4}, load_model_file(EXAMPLES / "mlp.py"))
    assert dataset[3][1].item() == 9.0


def test_the_two_tower_click_log_plugs_in_as_a_module():
    dataset = build_dataset({"name": "module", "module": f"{ROOT / 'configs' / 'two_tower_clicks.py'}:clicks", "size": 64},
                            load_model_file(EXAMPLES / "two_tower.py"))  # fmt: skip
    inputs, target = dataset[0]
    assert set(inputs) == {"query", "item"} and inputs["query"].shape == (16,) and target.dtype == torch.float32
    clicked = torch.stack([dataset[i][1] for i in range(64)])
    assert 0 < clicked.sum() < 64


def test_synthetic_targets_for_a_folded_output_ask_for_example_targets(tmp_path):
    """An output [B*T, D] has no per-sample shape to draw targets from: the error says so."""
    model_path = tmp_path / "folded.py"
    model_path.write_text(
        "import torch\n"
        "def build_model(): return torch.nn.Flatten(0, 1)\n"
        "def example_inputs(batch_size): return (torch.randn(batch_size, 4, 3),)\n"
    )
    with pytest.raises(FtcError, match="has the batch folded into a dimension"):
        build_dataset({"name": "synthetic", "size": 6}, load_model_file(model_path))


def test_synthetic_targets_for_a_dict_output_are_one_tensor_the_loss_takes():
    """A model returning {"logits": [B, T, V]} (as Hugging Face models do) with a language
    model's cross-entropy on output["logits"]: the targets are class indices [B, T] in [0, V),
    not a dict shaped like the output."""
    from ftc.runtime.data import OutputSpec, synthetic_targets

    def lm_loss(output, target):
        logits = output["logits"]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    outputs = {"logits": OutputSpec((4, 8, 32), "float32", 0), "hidden": OutputSpec((4, 8, 16), "float32", 0)}
    assert synthetic_targets(outputs, lm_loss) == OutputSpec((4, 8), "int64", 0, classes=32)
    # a loss that takes targets shaped like the whole output still gets them
    both = lambda output, target: sum((output[k] - target[k]).pow(2).mean() for k in output)  # noqa: E731
    assert synthetic_targets(outputs, both) == outputs


def test_a_classifier_gets_class_indices_and_a_regression_numbers():
    """cross_entropy also takes uniform numbers shaped like the logits (as class probabilities,
    which then sum to no distribution): a classifier's synthetic targets are class indices, so its
    loss starts near log(classes). mse_loss takes both too (a [B] target broadcasts against a
    [B, 1] output), and keeps numbers shaped like the output; so do losses on several classes'
    probabilities, which refuse indices."""
    from ftc.runtime.data import OutputSpec, synthetic_targets

    F = torch.nn.functional
    logits = OutputSpec((1, 10), "float32", 0)
    assert synthetic_targets(logits, F.cross_entropy) == OutputSpec((1,), "int64", 0, classes=10)
    assert synthetic_targets(logits, F.nll_loss) == OutputSpec((1,), "int64", 0, classes=10)
    for regression in (F.mse_loss, F.l1_loss, F.binary_cross_entropy_with_logits):
        for shape in ((1, 1), (1, 2), (1, 10)):
            assert synthetic_targets(OutputSpec(shape, "float32", 0), regression) == OutputSpec(shape, "float32", 0)


def test_a_classifier_trained_on_synthetic_data_starts_at_chance(tmp_path):
    """The independent truth: a freshly initialized classifier's cross-entropy on random labels is
    about log(classes); on uniform numbers as class probabilities it would be about 5 times that."""
    import math

    model_path = tmp_path / "classifier.py"
    model_path.write_text(
        "import torch\n"
        "def build_model(): return torch.nn.Linear(16, 10)\n"
        "def example_inputs(batch_size): return (torch.randn(batch_size, 16) * 0.01,)\n"
        "def loss_fn(output, target): return torch.nn.functional.cross_entropy(output, target)\n"
    )
    from ftc.runtime.data import OutputSpec, synthetic_targets

    model_file = load_model_file(model_path)
    outputs = synthetic_targets(OutputSpec((1, 10), "float32", 0), model_file.loss_fn)
    dataset = build_dataset({"name": "synthetic", "size": 64}, model_file, outputs=outputs)
    inputs, targets = load_batch(dataset, list(range(64)), inputs=True, targets=True)
    assert targets.dtype == torch.int64 and 0 <= int(targets.min()) and int(targets.max()) < 10
    torch.manual_seed(0)
    loss = model_file.loss_fn(model_file.module.build_model()(*inputs), targets)
    assert abs(loss.item() - math.log(10)) < 0.3


def test_an_integer_output_beside_the_logits_gets_targets_and_trains(tmp_path):
    """A model that also returns its argmax: synthetic targets are drawn for the logits the loss
    reads (an integer output's uniform [0, 1) numbers are 0), with and without example_targets,
    and mode local trains like mode single."""
    from ftc.compiler import CompileOptions, compile_model
    from ftc.runtime.config import load_config
    from ftc.runtime.data import OutputSpec, drawn
    from ftc.runtime.train import train

    assert torch.equal(drawn(OutputSpec((2, 3), "int64", 0), [2, 3]), torch.zeros(2, 3, dtype=torch.long))
    text = (
        "import torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.l1, self.l2 = nn.Linear(16, 32), nn.Linear(32, 4)\n"
        "    def forward(self, x):\n"
        "        logits = self.l2(F.relu(self.l1(x)))\n"
        "        return logits, logits.argmax(-1)\n"
        "def build_model(): return Net()\n"
        "def example_inputs(batch_size): return (torch.randn(batch_size, 16),)\n"
        "def loss_fn(output, target): return F.cross_entropy(output[0], target)\n"
    )
    labelled = text + "def example_targets(batch_size): return torch.randint(0, 4, (batch_size,))\n"
    for name, source in (("unlabelled", text), ("labelled", labelled)):
        (tmp_path / f"{name}.py").write_text(source)
        folder = compile_model(tmp_path / f"{name}.py", tmp_path / "out", CompileOptions(stages=2)).folder
        losses = {}
        for mode in ("single", "local"):
            data = {"pipeline": str(folder), "mode": mode, "steps": 3, "batch_size": 8, "micro_batches": 2,
                    "data": {"name": "synthetic", "size": 32}, "log_every": 10}  # fmt: skip
            losses[mode] = train(load_config(data=data)).loss
        assert len(losses["local"]) == 3 and all(torch.isfinite(torch.tensor(losses["local"])))
        torch.testing.assert_close(torch.tensor(losses["local"]), torch.tensor(losses["single"]), rtol=1e-5, atol=0)


def test_samples_that_do_not_stack_are_named_by_index_and_shape():
    from ftc.runtime.data import load_batch

    class Ragged:
        def __getitem__(self, i):
            return (torch.zeros(65 if i == 3 else 64),), torch.tensor(1)

        def __len__(self):
            return 8

    with pytest.raises(FtcError) as info:
        load_batch(Ragged(), [5, 1, 3, 2], inputs=True, targets=True)
    assert "the data set (Ragged) gave samples that do not stack into one batch" in info.value.message
    assert "inputs[0] is [64] in sample 5, [65] in sample 3" in info.value.message


def test_a_plain_number_or_array_in_a_sample_and_a_failing_len_are_named(tmp_path):
    """A label given as a Python int (as torchvision data sets give them) or inputs given as a
    NumPy array are named with the sample and where in it, with the conversion to use; a
    __len__ that fails (returns a float) is the data set's error, not a traceback from len()."""
    import numpy

    samples = [((torch.zeros(2),), 3), ((numpy.zeros(2, dtype=numpy.float32),), torch.tensor(1))]
    with pytest.raises(FtcError) as info:
        load_batch(samples, [0], inputs=True, targets=True)
    assert "the data set (list)[0]'s target is of type int, not a tensor" in info.value.message
    assert "torch.tensor(label)" in info.value.hint
    with pytest.raises(FtcError, match=re.escape("the data set (list)[1]'s inputs[0] is of type ndarray")):
        load_batch(samples, [1], inputs=True, targets=False)

    (tmp_path / "sized.py").write_text(
        "class Sized:\n"
        "    def __len__(self):\n"
        "        return 8.0\n"
        "    def __getitem__(self, i):\n"
        "        raise IndexError(i)\n"
        "def sized():\n"
        "    return Sized()\n"
    )
    with pytest.raises(FtcError) as info:
        build_dataset({"name": "module", "module": f"{tmp_path / 'sized.py'}:sized"}, load_model_file(EXAMPLES / "mlp.py"))
    assert "len() of data set 'module' (Sized) raised TypeError" in info.value.message


def test_samples_of_different_structures_are_named_not_dropped_or_raw():
    """Stacking follows the first sample: a later one with an extra input was cut to the first's
    inputs without a word, and one lacking a dict key or a tuple item failed as a bare KeyError
    or IndexError. Dict keys in another order are the same structure."""
    x, label = torch.zeros(2), torch.tensor(1)
    cases = [
        ([((x,), label), ((x, x), label)], "inputs[1] is in sample 1, not in sample 0"),
        ([((x, x), label), ((x,), label)], "inputs[1] is in sample 0, not in sample 1"),
        ([((x,), {"a": label}), ((x,), {"b": label})], "target['a'] is in sample 0, not in sample 1"),
    ]
    for samples, where in cases:
        with pytest.raises(FtcError) as info:
            load_batch(samples, [0, 1], inputs=True, targets=True)
        assert f"the data set (list) gave samples that do not stack into one batch: {where}" in info.value.message
    reordered = [({"x": x, "y": label}, label), ({"y": label, "x": x}, label)]
    assert load_batch(reordered, [0, 1], inputs=True, targets=True)[0]["y"].shape == (2,)


def test_built_in_data_set_options_of_a_wrong_type_are_named_as_config_keys():
    """A size of "100" or 2.5 was blamed on the model file's example_inputs, an image of "abc"
    and a seed of "a" ended as internal errors."""
    model_file = load_model_file(EXAMPLES / "mlp.py")
    for options, error in [
        ({"name": "synthetic", "size": "100"}, "config key 'data.size' must be an integer, not \"100\""),
        ({"name": "synthetic", "size": 2.5}, "config key 'data.size' must be an integer, not 2.5"),
        ({"name": "synthetic", "size": 0}, "config key 'data.size' is 0; it must be at least 1"),
        ({"name": "synthetic", "seed": "a"}, "config key 'data.seed' must be an integer"),
        ({"name": "synthetic", "outputs": 1}, "config key 'data.outputs' is not an option of this data set"),
        ({"name": "digits", "image": "abc"}, "config key 'data.image' must be a list of integers above 0"),
        ({"name": "digits", "image": [1, 0, 8]}, "config key 'data.image' must be a list of integers above 0"),
        ({"name": "digits", "target": 3}, "config key 'data.target' must be a string, not 3"),
        ({"name": "bytes", "max_bytes": "x"}, "config key 'data.max_bytes' must be an integer"),
    ]:
        with pytest.raises(FtcError, match=re.escape(error)):
            build_dataset(options, model_file)
    assert len(build_dataset({"name": "digits", "image": None}, model_file)) == 1797


def test_a_data_set_files_top_level_draw_is_the_same_wherever_it_is_imported(tmp_path):
    """Every rank imports the config's data-set file itself: a split drawn at its top level must
    not depend on what the process drew before (ranks whose data differ refuse to train)."""
    data_path = tmp_path / "shuffled.py"
    data_path.write_text(
        "import torch\n"
        "ORDER = torch.randperm(6)\n"
        "def shuffled():\n"
        "    return [((torch.tensor([float(i)]),), torch.tensor([float(i)])) for i in ORDER.tolist()]\n"
    )
    model_file = load_model_file(EXAMPLES / "mlp.py")
    orders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        dataset = build_dataset({"name": "module", "module": f"{data_path}:shuffled"}, model_file)
        orders.append([dataset[k][1].item() for k in range(6)])
    assert orders[0] == orders[1]
