"""`ftc check`: does a generated (and perhaps hand-edited) pipeline still compute exactly what
the model computes?

Four copies of the model start from the same seed and weights:

1. the original model runs forward and backward on one batch: the truth;
2. the IR (ir.json) is interpreted on the same batch, with the gradient of every value that
   crosses a stage boundary kept, and the random-number state at the start of every stage;
3. each stage runs alone on the reference values it should receive, from the random state the
   reference had there, and backward from the reference gradients of the values it sends: its
   sent values, the gradients it returns and its parameters' gradients are compared with the
   reference, and its state (every parameter and buffer it holds, after its forward and after
   its backward) with the original model's, so a wrong stage is pinned down even though later
   stages depend on it;
4. the whole pipeline runs end to end in the local executor: the model's outputs, every
   parameter gradient, and every parameter and buffer after the forward and after the backward
   are compared with the original's (a lost in-place write to model state, a BatchNorm's
   running statistics or an EMA teacher's weights, leaves this forward's outputs unchanged: only
   the state shows it);
5. the model and the stages run forward once more in eval mode (set by the model's own eval(), an
   override of train() included, on the modules the stages adopt), from the weights and buffers
   they started with, and their outputs are compared: a stage that keeps what the training-mode
   trace saw (dropout on, batch norm on batch statistics) shows here. A model whose forward
   branches on self.training (ir.json's training_branches, named when compiling) is told, not
   failed: its stages keep the training branch by design.

The loss is a fixed random projection of every floating output, so every output gets a
gradient. Relative difference: max |a - b| / max(max |b|, 1e-6), per tensor.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from ftc.interpreter import Interpreter
from ftc.ir import FtcError, Graph, Node, load
from ftc.passes.partition.problem import may_draw_random
from ftc.runtime import LocalExecutor, comm, load_model_file, load_pipeline
from ftc.runtime.materialize import blamed_on_a_changed_model_file, model_file_changed, recompile_hint
from ftc.runtime.mode import set_mode
from ftc.runtime.pipeline import Pipeline
from ftc.runtime.seeding import seed_generators

DEFAULT_TOLERANCE = 1e-5


class ModelFails(FtcError):
    """The original model cannot run the check's batch (a BatchNorm1d on one sample, say)."""


# A parameter gradient that is zero in exact arithmetic (a key projection's bias: softmax ignores
# a constant added to every score; a bias before a train-mode BatchNorm) is float32 rounding
# noise, about 1e-7 of the terms summed, which the order of accumulation changes. Gradients are
# therefore compared relative to at least this fraction of the model's largest gradient element,
# which keeps such noise below 1e-5 and still flags a wrong gradient of any tensor not many
# orders of magnitude below the rest.
GRADIENT_FLOOR = 1e-2


def gradient_floor(model: torch.nn.Module) -> float:
    grads = [_dense(p.grad).abs().max().item() for p in model.parameters() if p.grad is not None and p.grad.numel()]
    return GRADIENT_FLOOR * max(grads, default=0.0)


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """A sparse gradient (nn.Embedding(sparse=True)) as the dense tensor it stands for."""
    return tensor.to_dense() if tensor.is_sparse else tensor


def relative_difference(actual: Any, expected: Any, floor: float = 1e-6) -> float:
    """The largest elementwise difference over the expected tensor's largest element (at least
    `floor`); tuples and lists element by element; other values must be equal."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
            return float("inf")
        actual, expected = _dense(actual), _dense(expected)
        if not expected.is_floating_point():
            return 0.0 if torch.equal(actual, expected) else float("inf")
        actual, expected = actual.detach(), expected.detach()
        finite = torch.isfinite(expected)
        # inf, -inf and nan (masked attention scores, say) must match exactly, where they are
        if not torch.equal(finite, torch.isfinite(actual)):
            return float("inf")
        if not torch.equal(actual[~finite].nan_to_num(), expected[~finite].nan_to_num()):
            return float("inf")
        if not finite.any():
            return 0.0
        diff = (actual[finite] - expected[finite]).abs().max().item()
        return diff / max(expected[finite].abs().max().item(), floor, 1e-6)
    if isinstance(expected, (tuple, list)):
        if not isinstance(actual, (tuple, list)) or len(actual) != len(expected):
            return float("inf")
        return max((relative_difference(a, e, floor) for a, e in zip(actual, expected)), default=0.0)
    return 0.0 if actual == expected else float("inf")


@dataclass
class StageReport:
    index: int
    file: str
    outputs: float = 0.0  # values it sends
    input_grads: float = 0.0  # gradients it returns for the values it receives
    gradients: float = 0.0  # its parameters' gradients
    state: float = 0.0  # its parameters' and buffers' values after its forward and its backward
    problems: list[str] = field(default_factory=list)
    compared: bool = True  # False where hand-moved boundaries leave no reference values for it

    @property
    def worst(self) -> float:
        return max(self.outputs, self.input_grads, self.gradients, self.state)


@dataclass
class CheckReport:
    folder: Path
    batch_size: int
    tolerance: float
    stages: list[StageReport]
    model_outputs: float  # end to end, against the original model
    model_gradients: float
    problems: list[str]
    model_state: float = 0.0  # end to end: parameters and buffers after the forward and the backward
    eval_outputs: float = 0.0  # end to end in eval mode
    eval_expected: bool = True  # whether eval mode must match (no branch on self.training)
    notes: list[str] = field(default_factory=list)  # what was not compared, and why

    def stage_ok(self, stage: StageReport) -> bool:
        return stage.worst <= self.tolerance and not stage.problems

    @property
    def ok(self) -> bool:
        return (
            not self.problems
            and self.model_outputs <= self.tolerance
            and self.model_gradients <= self.tolerance
            and self.model_state <= self.tolerance
            and (self.eval_outputs <= self.tolerance or not self.eval_expected)
            and all(self.stage_ok(s) for s in self.stages)
        )


def _flat(value: Any) -> list:
    if isinstance(value, dict):
        return [v for item in value.values() for v in _flat(item)]
    if isinstance(value, (tuple, list)):
        return [v for item in value for v in _flat(item)]
    return [value]


def _loss(output: Any, seed: int) -> torch.Tensor:
    """A fixed random projection of every floating tensor in the output, to a scalar."""
    tensors = [t for t in _flat(output) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    if not tensors:
        raise FtcError(
            "the model's outputs hold no floating tensor that requires grad: no trainable parameter reaches them, "
            "so there are no gradients to check and nothing to train",
            "give forward a parameter that requires grad (a frozen model has nothing for a training pipeline to do)",
        )
    generator = torch.Generator().manual_seed(seed)
    return sum((t * torch.randn(t.shape, generator=generator, dtype=t.dtype)).sum() for t in tensors)


def _leaf(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        leaf = value.detach().clone()
        return leaf.requires_grad_() if value.requires_grad else leaf
    return value


def _shared_parameters(pipeline: Pipeline) -> set[str]:
    """The state keys of tensors that several stages hold (a weight read in two stages, or tied
    under two names): their gradients sum every holder's part, so no stage alone owns them."""
    tied = pipeline.tied
    holders: dict[str, set[int]] = {}
    for spec in pipeline.stages:
        for key in spec.state:
            holders.setdefault(tied.get(key, key), set()).add(spec.index)
    return {key for spec in pipeline.stages for key in spec.state if len(holders[tied.get(key, key)]) > 1}


def _gradients_added(
    params: dict[str, torch.nn.Parameter], names: set[str], pairs: list[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Backpropagate `pairs`; return what that added to the gradient of each parameter in `names`."""
    before = {name: params[name].grad.clone() for name in names if name in params and params[name].grad is not None}
    if pairs:
        _backward(pairs)
    added = {}
    for name in names:
        grad = params[name].grad if name in params else None
        if grad is not None:
            added[name] = grad - before[name] if name in before else grad.clone()
    return added


def _backward(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Backpropagate each gradient from its value, giving autograd copies: it may adopt a
    gradient tensor itself as a parameter's .grad (for a value that is a view of a parameter,
    `self.proj.t()`) and add later gradients into it, which would change the check's records."""
    torch.autograd.backward([value for value, _ in pairs], [grad.clone() for _, grad in pairs])


class _Reference(Interpreter):
    """Interprets the IR as a pipeline: a value read by another stage reaches it as a fresh leaf
    (as the executor does), so that after `backward` the reference knows, per stage, the
    gradients it should receive for the values it sends and return for the values it reads.
    It also remembers the random-number state as each stage begins."""

    def __init__(self, graph: Graph, model: torch.nn.Module, pipeline: Pipeline):
        super().__init__(graph, model)
        self.pipeline = pipeline
        self.stage_of = {node.name: node.stage for node in graph.nodes if node.op != "get_attr"}
        self.model_inputs = set(graph.inputs)
        self.rng_at_stage: dict[int, torch.Tensor] = {}
        self.drawn: set[int] = set()  # stages whose first op that may draw random numbers has run
        self.leaves: dict[tuple[str, int], Any] = {}  # (value, reading stage) -> leaf
        self.to_send: list[dict[str, torch.Tensor]] = []  # per stage: gradient of each value it sends
        self.to_return: list[dict[str, torch.Tensor]] = []  # per stage: gradient of each value it reads
        self.shared_grads: list[dict[str, torch.Tensor]] = []  # per stage: its part of each shared parameter's gradient

    def run_node(self, node: Node, args: tuple, kwargs: dict) -> Any:
        # A stage that is not a contiguous run of the program order (metis) may start before
        # an earlier stage's last random draw: its random state is the one at its first draw.
        draws = node.is_compute and may_draw_random(node, self.graph.modules)
        if node.is_compute and (node.stage not in self.rng_at_stage or (draws and node.stage not in self.drawn)):
            self.rng_at_stage[node.stage] = torch.get_rng_state()
        if draws:
            self.drawn.add(node.stage)
        return super().run_node(node, args, kwargs)

    def lookup(self, ref, reader: Node) -> Any:
        value = self.env[ref.name]
        stage = self.stage_of.get(ref.name)
        if stage is None or not reader.is_compute or (stage == reader.stage and ref.name not in self.model_inputs):
            return value
        key = (ref.name, reader.stage)
        if key not in self.leaves:
            self.leaves[key] = _leaf(value)
        return self.leaves[key]

    def forward_backward(self, batch: tuple | dict, seed: int) -> Any:
        """Run forward, backpropagate the check's loss stage by stage; return the output."""
        self.run(batch)
        outputs = {name: _leaf(self.env[name]) for name in self.pipeline.outputs}
        output = self.pipeline.assemble_output(outputs)
        _loss(output, seed).backward()
        specs = self.pipeline.stages
        self.to_send = [{} for _ in specs]
        self.to_return = [{} for _ in specs]
        self.shared_grads = [{} for _ in specs]
        params = dict(self.model.named_parameters(remove_duplicate=False))
        shared = _shared_parameters(self.pipeline)
        for spec in reversed(specs):
            grads = {}
            for name in spec.outputs:
                readers = [outputs.get(name)] + [self.leaves.get((name, s.index)) for s in specs if s.index != spec.index]
                found = [leaf.grad for leaf in readers if isinstance(leaf, torch.Tensor) and leaf.grad is not None]
                if found:
                    grads[name] = sum(found[1:], found[0])
            self.to_send[spec.index] = grads
            pairs = [(self.env[name], grad) for name, grad in grads.items() if self.env[name].requires_grad]
            self.shared_grads[spec.index] = _gradients_added(params, shared, pairs)
            for name in spec.inputs:
                leaf = self.leaves.get((name, spec.index))
                if isinstance(leaf, torch.Tensor) and leaf.grad is not None:
                    self.to_return[spec.index][name] = leaf.grad
        return output


def check_pipeline(
    folder: str | Path,
    model_path: str | Path | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    tolerance: float = DEFAULT_TOLERANCE,
) -> CheckReport:
    pipeline = load_pipeline(folder)
    model_file = load_model_file(pipeline.model_file_or(model_path))
    batch_size = batch_size or pipeline.manifest["batch_size"]
    graph = load(Path(folder) / "ir.json")

    seed_generators(seed)
    original = model_file.build()
    original.train()
    _require_same_structure(graph, original, model_file.path, Path(folder))
    interpreted, isolated, end_to_end, evaluated, evaluated_stages = (
        _copy_of(original, model_file, seed) for _ in range(5)
    )
    torch.manual_seed(seed + 1)
    batch = model_file.inputs(batch_size)

    # Each run gets its own copy of the batch: forward may change its inputs in place.
    torch.manual_seed(seed + 2)
    try:
        expected = original(**copy.deepcopy(batch)) if isinstance(batch, dict) else original(*copy.deepcopy(batch))
    except Exception as exc:
        raise ModelFails(f"the model itself fails at batch size {batch_size} ({type(exc).__name__}: {exc})",
                         "check at a batch size the model runs at (--batch-size)") from exc  # fmt: skip
    # Copied: the backward may change state too (a hook), and the stages' state after their
    # forward is compared with this.
    state_after_forward = {name: tensor.detach().clone() for name, tensor in _named_state(original)}
    _loss(expected, seed).backward()
    state_after_backward = dict(_named_state(original))

    torch.manual_seed(seed + 2)
    reference = _Reference(graph, interpreted, pipeline)
    reference_output = reference.forward_backward(copy.deepcopy(batch), seed)
    problems = _output_problems(graph, pipeline)
    notes: list[str] = []
    if not problems and relative_difference(_flat(reference_output), _flat(expected)) > tolerance:
        if model_file_changed(model_file, pipeline):
            problems.append(f"{model_file.path} is not the model file {pipeline.folder} was compiled from (it changed "
                            "since, or is another file: its sha256 is not pipeline.json's model_file_sha256), and "
                            "the model it builds computes other outputs than ir.json, which the stages came from"
                            f"\n  fix: {recompile_hint(model_file, pipeline)}")  # fmt: skip
        else:
            problems.append("ir.json itself does not compute the model's outputs; recompile the pipeline")

    floor = gradient_floor(original)
    moved = _moved_boundaries(graph, pipeline)
    if moved:
        # The reference cuts ir.json at its own boundaries, so it has no values to give these
        # stages alone; end to end still compares every output and parameter gradient.
        stages = [StageReport(s.index, s.file, compared=False) for s in pipeline.stages]
        notes.append(f"stages {moved} read other values than ir.json's split gives them (ops moved between stages "
                     "by hand?): each stage alone is not compared, the whole pipeline end to end is")  # fmt: skip
    else:
        with blamed_on_a_changed_model_file(model_file, pipeline):
            stages = _check_stages_alone(pipeline, isolated, reference, original, floor, batch_size,
                                         (state_after_forward, state_after_backward), tolerance)  # fmt: skip

    with blamed_on_a_changed_model_file(model_file, pipeline):
        executor = LocalExecutor(pipeline, end_to_end)
    set_mode(end_to_end, executor.stages, True)
    problems += _state_dict_problems(pipeline, executor, original)
    torch.manual_seed(seed + 2)
    try:
        actual = executor.forward(copy.deepcopy(batch))
        stages_by_index = {spec.index: stage for spec, stage in zip(pipeline.stages, executor.stages)}
        model_state, after_forward = _state_differences(stages_by_index, state_after_forward, tolerance)
        executor.backward(_loss(actual, seed))
        worst, after_backward = _state_differences(stages_by_index, state_after_backward, tolerance)
    except Exception as exc:  # a hand-edited stage: what failed is the check's finding
        problems.append(f"the stages run end to end raised {type(exc).__name__}: {exc}")
        return CheckReport(Path(folder), batch_size, tolerance, stages, math.inf, math.inf, problems, notes=notes)
    model_outputs = relative_difference(_flat(actual), _flat(expected))
    model_state = max(model_state, worst)
    # A stage whose state differed alone has its line already; end to end names the others (all
    # of them where boundaries moved by hand left the stages alone uncompared).
    prefixes = {spec.index: f"end to end, stage {spec.index} ({spec.file}): "
                for spec, alone in zip(pipeline.stages, stages) if alone.state <= tolerance}  # fmt: skip
    problems += _state_problems(prefixes, after_forward, after_backward)
    grads = dict(original.named_parameters())
    unexpected = sorted(name for name, p in end_to_end.named_parameters() if p.grad is not None and grads[name].grad is None)
    if unexpected:
        problems.append(f"the pipeline gives gradients to {', '.join(unexpected[:5])}, which the model does not "
                        "(a no_grad or inference_mode block lost?)")  # fmt: skip
    model_gradients = max(
        (relative_difference(p.grad, grads[name].grad, floor) for name, p in end_to_end.named_parameters() if grads[name].grad is not None),
        default=0.0,
    )
    eval_expected = not graph.training_branches
    try:
        eval_outputs = _eval_difference(pipeline, evaluated, evaluated_stages, batch, seed)
    except ModelFails as exc:  # nothing to compare with
        notes.append(f"eval mode not compared: {exc.message}")
        eval_outputs, eval_expected = math.nan, False
    except Exception as exc:  # a stage that runs in training mode only
        problems.append(f"the stages run end to end in eval mode raised {type(exc).__name__}: {exc}")
        eval_outputs = math.inf
    return CheckReport(Path(folder), batch_size, tolerance, stages, model_outputs, model_gradients, problems,
                       model_state, eval_outputs, eval_expected=eval_expected, notes=notes)  # fmt: skip


def _named_state(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of `module` by qualified name, a tied one under each of its names."""
    return [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]


def _state_differences(
    stages: dict[int, torch.nn.Module], expected: dict[str, torch.Tensor], tolerance: float
) -> tuple[float, dict[int, dict[str, str]]]:
    """How far the stages' (by index) parameters and buffers are from the model's (`expected`, by
    key): the largest relative difference, and per stage index, each key beyond `tolerance` with
    how it differs. A key several stages hold (a tied weight) is compared in each."""
    worst = 0.0
    differing: dict[int, dict[str, str]] = {}
    for index, stage in stages.items():
        for name, tensor in _named_state(stage):
            if name not in expected:  # a hand-added tensor: _state_dict_problems names it
                continue
            difference = relative_difference(tensor, expected[name])
            worst = max(worst, difference)
            if difference > tolerance:
                differing.setdefault(index, {})[name] = _how_it_differs(name, tensor, expected[name], difference)
    return worst, differing


def _how_it_differs(name: str, actual: torch.Tensor, expected: torch.Tensor, difference: float) -> str:
    if actual.shape != expected.shape:
        return f"{name} (shape {list(actual.shape)}, the model's {list(expected.shape)})"
    if expected.numel() == 1:  # a counter: its two values say more than a ratio
        return f"{name} ({actual.item():g}, the model's {expected.item():g})"
    return f"{name} (relative difference {difference:.2e})"


def _state_problems(
    prefixes: dict[int, str], after_forward: dict[int, dict[str, str]], after_backward: dict[int, dict[str, str]]
) -> list[str]:
    """A line for each stage (by index, its line begun with its prefix) whose parameters or buffers
    differ from the model's, naming the keys at the first point they differ (a key wrong after
    the forward stays wrong after the backward)."""
    problems = []
    for index, where in prefixes.items():
        forward = after_forward.get(index, {})
        backward = {key: text for key, text in after_backward.get(index, {}).items() if key not in forward}
        for when, differing in (("forward", forward), ("backward", backward)):
            if differing:
                texts = list(differing.values())
                listed = ", ".join(texts[:4]) + (f" and {len(texts) - 4} more" if len(texts) > 4 else "")
                problems.append(f"{where}after the {when}, the stage's state differs from the model's at {listed}: "
                                "an in-place write to a parameter or buffer (running statistics, a counter, an EMA "
                                "update) was lost, repeated or changed")  # fmt: skip
    return problems


def _moved_boundaries(graph: Graph, pipeline: Pipeline) -> list[int]:
    """The stages whose inputs in pipeline.json are not those ir.json's stage assignment gives."""
    by_name = graph.by_name()
    stage_of = {node.name: node.stage for node in graph.nodes if node.is_compute}
    inputs: dict[int, set[str]] = {}
    for node in graph.nodes:
        if node.is_compute:
            for name in node.refs():
                if by_name[name].op == "input" or (by_name[name].op != "get_attr" and stage_of[name] != node.stage):
                    inputs.setdefault(node.stage, set()).add(name)
    return [spec.index for spec in pipeline.stages if set(spec.inputs) != inputs.get(spec.index, set())]


def _output_problems(graph: Graph, pipeline: Pipeline) -> list[str]:
    """pipeline.json's model outputs must be ir.json's: a hand edit that reorders them (or the
    keys of a dict output) hands the loss other tensors than the model's."""
    structure = pipeline.manifest["output_structure"]
    ours = (structure["kind"], list(pipeline.outputs), list(structure.get("keys", [])))
    traced = (graph.outputs.kind, [ref.name for ref in graph.outputs.values], list(graph.outputs.keys))
    if ours == traced:
        return []
    return [f"pipeline.json's outputs {ours[1]} (output_structure {ours[0]}{f' with keys {ours[2]}' if ours[2] else ''}) "
            f"are not the model's: ir.json has {traced[1]} ({traced[0]}{f' with keys {traced[2]}' if traced[2] else ''}); "
            "undo the hand edit of \"outputs\" or \"output_structure\""]  # fmt: skip


def _copy_of(original: torch.nn.Module, model_file, seed: int) -> torch.nn.Module:
    """A copy of the freshly built model. deepcopy refuses a model that holds a tensor computed
    from a parameter as a plain attribute (torch.nn.utils.prune's `weight`, weight_norm's), and
    gives a TorchScript module parameters that are not leaves (so they get no gradients): such a
    model is built again, as seeded, with the original's state loaded into it."""
    try:
        copied = copy.deepcopy(original)
        if all(param.is_leaf for param in copied.parameters()):
            return copied
    except RuntimeError:
        pass
    seed_generators(seed)
    model = model_file.build()
    model.load_state_dict(original.state_dict())
    model.train()
    return model


def _eval_difference(pipeline: Pipeline, model: torch.nn.Module, staged: torch.nn.Module, batch: Any, seed: int) -> float:
    """The stages' outputs against the model's, both in eval mode under no_grad; `staged` is a
    copy of `model` for the stages to adopt."""
    executor = LocalExecutor(pipeline, staged)
    model.eval()
    set_mode(staged, executor.stages, False)
    with torch.no_grad():
        torch.manual_seed(seed + 2)
        try:
            expected = model(**copy.deepcopy(batch)) if isinstance(batch, dict) else model(*copy.deepcopy(batch))
        except Exception as exc:
            raise ModelFails(f"the model itself fails in eval mode ({type(exc).__name__}: {exc})") from exc
        torch.manual_seed(seed + 2)
        actual = executor.forward(copy.deepcopy(batch))
    return relative_difference(_flat(actual), _flat(expected))


def _require_same_structure(graph: Graph, model: torch.nn.Module, model_path: Path, folder: Path) -> None:
    """The model must have the modules and tensors the pipeline was compiled against, or no
    comparison means anything."""
    modules = dict(model.named_modules(remove_duplicate=False))
    state = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    state |= {name for name, _ in model.named_buffers(remove_duplicate=False)}
    called = {node.target for node in graph.nodes if node.op == "call_module"}
    missing = sorted(called - set(modules)) + sorted(set(graph.state) - state)
    if missing:
        raise FtcError(
            f"{model_path} builds a model without {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}, "
            f"which {folder} was compiled against: it is another model",
            "pass the model file the pipeline was compiled from (--model), or recompile the pipeline",
        )


def _check_stages_alone(
    pipeline: Pipeline, model: torch.nn.Module, reference: _Reference, original: torch.nn.Module, floor: float,
    batch_size: int, state: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]], tolerance: float,
) -> list[StageReport]:  # fmt: skip
    """Each stage on the reference's values; parameter gradients compared with `floor`
    (gradient_floor of the original model); its parameters and buffers with the model's `state`
    after the forward and after the backward."""
    executor = LocalExecutor(pipeline, model)
    set_mode(model, executor.stages, True)
    values = reference.env
    reports = []
    shared = _shared_parameters(pipeline)
    stage_params = dict(model.named_parameters(remove_duplicate=False))
    shared_grads: dict[int, dict[str, torch.Tensor]] = {}
    after_forward: dict[int, dict[str, str]] = {}
    for spec, stage in zip(pipeline.stages, executor.stages):
        report = StageReport(spec.index, spec.file)
        reports.append(report)
        received = {name: _leaf(values[name]) for name in spec.inputs}
        if spec.index in reference.rng_at_stage:
            torch.set_rng_state(reference.rng_at_stage[spec.index])
        try:
            result = stage(*(received[name] for name in spec.inputs))
        except Exception as exc:
            report.problems.append(f"forward raised {type(exc).__name__}: {exc}")
            continue
        if not isinstance(result, tuple) or len(result) != len(spec.outputs):
            report.problems.append(f"forward must return a tuple of {len(spec.outputs)} values {spec.outputs}")
            continue
        report.state, differing = _state_differences({spec.index: stage}, state[0], tolerance)
        after_forward.update(differing)
        sent = dict(zip(spec.outputs, result))
        report.outputs = max((relative_difference(_as_shaped(sent[n], values[n]), values[n]) for n in spec.outputs),
                             default=0.0)  # fmt: skip
        scale = Fraction(batch_size, pipeline.manifest["batch_size"])
        report.problems += comm.unsendable(sent, pipeline.manifest["values"], scale)
        report.problems += comm.gradient_problems(sent, pipeline.manifest["values"])
        if report.problems:  # a value of another shape than pipeline.json's cannot take its gradient
            continue
        pairs = [
            (sent[name], _as_shaped(grad, sent[name]))
            for name, grad in reference.to_send[spec.index].items()
            if isinstance(sent[name], torch.Tensor) and sent[name].requires_grad
        ]
        shared_grads[spec.index] = _gradients_added(stage_params, shared, pairs)
        for name, expected in reference.to_return[spec.index].items():
            leaf = received[name]
            got = leaf.grad if leaf.grad is not None else torch.zeros_like(expected)
            report.input_grads = max(report.input_grads, relative_difference(got, expected))

    # Parameters shared by stages (tied weights) have summed their gradients by now: each stage is
    # judged on its own part of theirs, so a wrong stage does not fail the others that hold them.
    original_params = dict(original.named_parameters(remove_duplicate=False))
    for report, stage in zip(reports, executor.stages):
        if report.problems:  # its backward did not run: its missing gradients would only repeat that
            continue
        worst, after_backward = _state_differences({report.index: stage}, state[1], tolerance)
        report.state = max(report.state, worst)
        report.problems += _state_problems({report.index: ""}, after_forward, after_backward)
        for name, param in stage.named_parameters(remove_duplicate=False):
            if name in shared:
                got, expected = shared_grads[report.index].get(name), reference.shared_grads[report.index].get(name)
                if got is not None or expected is not None:
                    got = got if got is not None else torch.zeros_like(expected)
                    expected = expected if expected is not None else torch.zeros_like(got)
                    report.gradients = max(report.gradients, relative_difference(got, expected, floor))
                continue
            expected = original_params[name].grad if name in original_params else None
            if expected is None and param.grad is None:
                continue
            if expected is None or param.grad is None:
                report.problems.append(f"gradient of {name} is {'missing' if param.grad is None else 'unexpected'}")
                continue
            report.gradients = max(report.gradients, relative_difference(param.grad, expected, floor))
    return reports


def _as_shaped(value: Any, like: Any) -> Any:
    """`value` in the shape of `like` where a hand edit reshaped a value at a stage boundary (the
    next stage shapes it back) and the elements are as many; otherwise `value` as it is."""
    if (
        isinstance(value, torch.Tensor) and isinstance(like, torch.Tensor) and value.shape != like.shape
        and value.numel() == like.numel()
    ):  # fmt: skip
        return value.reshape(like.shape)
    return value


def _state_dict_problems(pipeline: Pipeline, executor: LocalExecutor, original: torch.nn.Module) -> list[str]:
    """The stages' state_dict keys must be exactly the model's."""
    problems = []
    expected = set(original.state_dict())
    held = set()
    for spec, stage in zip(pipeline.stages, executor.stages):
        keys = set(stage.state_dict())
        unknown = keys - expected
        if unknown:
            problems.append(f"{spec.file} holds keys the model does not have: {sorted(unknown)[:5]}")
        held |= keys
    missing = expected - held
    if missing:
        problems.append(f"no stage holds the model's keys {sorted(missing)[:5]}{' ...' if len(missing) > 5 else ''}")
    return problems
