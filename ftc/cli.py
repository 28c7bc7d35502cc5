"""The `ftc` command line: compile a model file into a pipeline, check it against its model,
explain its predicted costs, train it, and merge its checkpoints."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import traceback
from collections.abc import Callable

from ftc.ir import FtcError
from ftc.tables import figure, human, table

EXIT_USAGE = 2


def _number(convert: type, valid: Callable[[float], bool], requirement: str) -> Callable[[str], float]:
    """An argparse type: `convert(text)`, refused unless `valid`, naming the `requirement`."""
    noun = "an integer" if convert is int else "a number"

    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"{text} must be {requirement}")
        return value

    return parse


_positive_int = _number(int, lambda v: v >= 1, "at least 1")
_non_negative_int = _number(int, lambda v: v >= 0, "at least 0")
_positive_float = _number(float, lambda v: 0 < v < math.inf, "a positive number")
_non_negative_float = _number(float, lambda v: 0 <= v < math.inf, "0 or a positive number")


def _memory_size(text: str) -> int:
    from ftc.passes.partition.memory import parse_bytes

    try:
        return parse_bytes(text)
    except FtcError as exc:
        raise argparse.ArgumentTypeError(exc.message + (f"; {exc.hint}" if exc.hint else "")) from None


def _compile_arguments(parser: argparse.ArgumentParser) -> None:
    from ftc.frontends import FRONTENDS
    from ftc.passes.partition import METHODS
    from ftc.passes.partition.memory import OPTIMIZER_STATES
    from ftc.passes.recompute import POLICIES
    from ftc.profiling import DEVICES, PROFILES, DeviceModel
    from ftc.runtime.config import TRAINING_SCHEDULES

    parser.add_argument("model", help="model file (defines build_model() and example_inputs(batch_size))")
    parser.add_argument("--stages", type=_positive_int, required=True, help="number of pipeline stages (of devices, for --method mpipe, which may run several stages per device)")
    parser.add_argument("-o", "--output", required=True, help="folder to write <name>/ into")
    parser.add_argument("--name", help="pipeline name (default: the model file's stem)")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="batch size to trace and cost with (default 8)")
    parser.add_argument("--method", choices=sorted(METHODS), default="pipedream", help="partitioner (default pipedream)")
    parser.add_argument("--frontend", choices=FRONTENDS, default="auto", help="tracer: fx, export, or auto (fx, then export)")
    parser.add_argument("--bandwidth", type=_positive_float, default=1.0, metavar="GBPS", help="link bandwidth between stages, GB/s (default 1)")
    parser.add_argument("--tflops", type=_positive_float, default=DeviceModel.tflops, help=f"device peak TFLOP/s for predicted times (default {DeviceModel.tflops})")
    parser.add_argument("--memory-gbps", type=_positive_float, default=DeviceModel.memory_gbps, help=f"device memory bandwidth, GB/s (default {DeviceModel.memory_gbps})")
    parser.add_argument("--op-overhead-us", type=_non_negative_float, default=DeviceModel.op_overhead_us, metavar="US", help=f"fixed cost of each ATen op beyond its roofline, microseconds (default {DeviceModel.op_overhead_us}, one CPU core)")
    parser.add_argument("--stage-overhead-us", type=_non_negative_float, default=DeviceModel.stage_overhead_us, metavar="US", help=f"fixed cost of calling a stage forward and backward, microseconds (default {DeviceModel.stage_overhead_us})")
    parser.add_argument("--force", action="store_true", help="overwrite stage files and a pipeline.json edited by hand")
    parser.add_argument("--memory-limit", type=_memory_size, metavar="BYTES", help="memory per device (16GB, 512MiB, ...); stages must fit it (default: no limit)")
    parser.add_argument("--optimizer", choices=OPTIMIZER_STATES, default="adam", help="optimizer whose state counts toward memory (default adam)")
    parser.add_argument("--schedule", choices=TRAINING_SCHEDULES, default="1f1b", help="schedule whose in-flight activations (and, for async, stashed weights) count toward memory (default 1f1b)")
    parser.add_argument("--micro-batches", type=_positive_int, help="micro-batches per step, for memory (default: the smallest divisor of the batch size from the device count up)")
    parser.add_argument("--recompute", choices=POLICIES, default="auto", help="recompute activations in backward: auto (where memory requires it), always, never")
    parser.add_argument("--blocks", type=_positive_int, help="mpipe: blocks to pack onto devices (default: 2, 3 and 4 times --stages are tried)")
    parser.add_argument("--profile", choices=PROFILES, default="analytic", help="analytic: FLOPs and a roofline on meta tensors (default); measure: time every node on real tensors")
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="the training device: where --profile measure times the nodes and --refine the stages, and how the memory estimate counts the optimizer step (default cpu)")
    parser.add_argument("--threads", type=_positive_int, default=1, help="CPU threads while measuring (torch.set_num_threads; default 1, one stage per core)")
    parser.add_argument("--save-memory", action="store_true", help="measure one node at a time with only its parameters on the device (automatic for models large for the device)")
    parser.add_argument("--refine", type=_non_negative_int, default=0, metavar="ROUNDS", help="time the generated stages on --device and partition again with the profile corrected by the timings, up to ROUNDS splits; keeps the one that measured best (default 0: off)")
    parser.add_argument("--no-cache", action="store_true", help="measure afresh, neither reading nor writing the profile cache ($FTC_CACHE_DIR or ~/.cache/ftc/profiles)")


def _check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", help="generated pipeline folder (generated/<name>)")
    parser.add_argument("--model", help="model file (default: the one pipeline.json names)")
    parser.add_argument("--batch-size", type=_positive_int, help="batch size (default: the compile batch size, then the planned micro-batch size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=_positive_float, default=1e-5, help="largest relative difference allowed (default 1e-5)")


def _explain_arguments(parser: argparse.ArgumentParser) -> None:
    from ftc.runtime.config import StalenessConfig

    parser.add_argument("pipeline", help="generated pipeline folder (generated/<name>)")
    parser.add_argument("--micro-batches", type=_positive_int, metavar="M", help="micro-batches per batch to predict the schedules with (default: 4 and 8)")
    parser.add_argument("--flush-every", type=_positive_int, default=StalenessConfig.flush_every, metavar="N", help=f"steps between pipeline flushes for the async rows, the training config's staleness.flush_every (default {StalenessConfig.flush_every})")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the device loads and the 1F1B timeline into a PNG")


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config (JSON, e.g. configs/gpt.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (dotted for nested: optimizer.lr=0.01); repeatable")


def _merge_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="checkpoint folder (the config's checkpoint.dir; its latest step), or one step-* folder in it")
    parser.add_argument("-o", "--output", help="output file, .safetensors or .pt, or a folder (default "
                       "DIR/merged.safetensors; for a step folder DIR/step-N, DIR/merged-step-N.safetensors)")  # fmt: skip


# Each command's arguments, and the imports their choices need, are added only for the command
# that runs: the compiler's (torch.export, dynamo) take seconds to import, which `ftc train`,
# `ftc merge-checkpoint` and `ftc --help` need not pay.
COMMANDS = {
    "compile": (_compile_arguments, "compile a model file into per-stage modules"),
    "check": (_check_arguments, "check a generated pipeline against its model (outputs, buffers, gradients)"),
    "explain": (_explain_arguments, "predicted per-stage costs, memory, throughput and bubble of a generated pipeline"),
    "train": (_train_arguments, "train a generated pipeline per a training config (single, local or dist via torchrun)"),
    "merge-checkpoint": (_merge_checkpoint_arguments, "merge the latest complete checkpoint's shards into one state_dict"),
}


def _parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftc", description="A pipeline-parallel compiler for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text)
        if name == command:
            add_arguments(sub)
    return parser


# Rates past these are no device's or link's (an H200 moves 4.8 TB/s and does 2 PFLOP/s dense):
# such a value was given in another unit (bytes/s or FLOP/s for GB/s or TFLOP/s).
IMPLAUSIBLE_RATES = {"bandwidth": (1e5, "GB/s"), "memory_gbps": (1e5, "GB/s"), "tflops": (1e5, "TFLOP/s")}


def _implausible_rates(args: argparse.Namespace) -> list[str]:
    lines = []
    for key, (limit, unit) in IMPLAUSIBLE_RATES.items():
        value = getattr(args, key)
        if value > limit:
            flag = "--" + key.replace("_", "-")
            lines.append(f"ftc compile: warning: {flag} {value:g} means {value:g} {unit}, more than any device or link has: "
                         f"{flag} is in {unit} (for 16 {unit}, pass {flag} 16)")  # fmt: skip
    return lines


def run_compile(args: argparse.Namespace) -> int:
    from ftc.compiler import CompileOptions, compile_model

    for line in _implausible_rates(args):
        print(line, file=sys.stderr)

    options = CompileOptions(
        stages=args.stages, batch_size=args.batch_size, method=args.method, frontend=args.frontend,
        bandwidth=args.bandwidth, tflops=args.tflops, memory_gbps=args.memory_gbps,
        op_overhead_us=args.op_overhead_us, stage_overhead_us=args.stage_overhead_us, name=args.name,
        force=args.force, profile=args.profile, device=args.device, threads=args.threads,
        save_memory=args.save_memory or None, cache=not args.no_cache,
        memory_limit=args.memory_limit, optimizer=args.optimizer, schedule=args.schedule,
        micro_batches=args.micro_batches, recompute=args.recompute, blocks=args.blocks, refine=args.refine,
    )  # fmt: skip
    compiled = compile_model(args.model, args.output, options)
    rows = []
    for stage in compiled.stages:
        cost = stage["cost"]
        rows.append([
            stage["index"], stage["device"], cost["ops"], human(cost["parameters"]),
            human(cost["fwd_flops"]), figure(cost['predicted_time'] * 1e3), human(cost["bytes_out"], "B"),
            human(cost["memory"]["total"], "B"), "yes" if stage["recompute"] else "",
        ])  # fmt: skip
    print(f"{compiled.graph.name}: {len([n for n in compiled.graph.nodes if n.is_compute])} ops "
          f"({compiled.graph.frontend} frontend), {args.method} into {len(rows)} stage{'s' if len(rows) > 1 else ''} -> {compiled.folder}")  # fmt: skip
    for note in compiled.notes:
        print(note)
    print(table(["stage", "device", "ops", "params", "fwd FLOPs", "predicted ms", "sends", "memory", "recompute"], rows))
    times = [stage["cost"]["predicted_time"] for stage in compiled.stages]
    print(f"predicted balance (max/mean stage time): {max(times) / (sum(times) / len(times)):.3f}")
    predicted = compiled.manifest["predicted"]
    if len(predicted["device_times"]) < len(times):  # mixed pipe: devices run several stages
        print(f"predicted balance (max/mean device time): {predicted['balance']:.3f}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from ftc.check import ModelFails, check_pipeline
    from ftc.runtime import load_pipeline

    sizes = [args.batch_size] if args.batch_size else check_batch_sizes(load_pipeline(args.pipeline).manifest)
    passed = True
    for k, size in enumerate(sizes):
        if k:
            print()
        try:
            report = check_pipeline(args.pipeline, args.model, size, args.seed, args.tolerance)
        except ModelFails as exc:
            if not k:
                raise
            print(f"not checked at the micro-batch size {size}: {exc.message}")
            sizes = sizes[:k]
            break
        _print_check(report)
        passed = passed and report.ok
    if len(sizes) > 1:
        print(f"\ncheck {'passed' if passed else 'FAILED'} at batch sizes {' and '.join(map(str, sizes))}")
    return 0 if passed else 1


def check_batch_sizes(manifest: dict) -> list[int]:
    """The compile batch size and the micro-batch size training runs the stages at (the planned
    one), so that a shape that holds only at the compile size (`.view(8, -1)`) fails here."""
    batch = manifest["batch_size"]
    micro = batch // max(1, int(manifest.get("settings", {}).get("micro_batches") or 1))
    return [batch] if micro in (0, batch) else [batch, micro]


def _print_check(report) -> None:
    rows = [
        [s.index, s.file, f"{s.outputs:.2e}", f"{s.input_grads:.2e}", f"{s.gradients:.2e}", f"{s.state:.2e}",
         "ok" if report.stage_ok(s) else "FAIL"]
        if s.compared else [s.index, s.file, "-", "-", "-", "-", "-"]
        for s in report.stages
    ]  # fmt: skip
    print(f"{report.folder}: each stage alone on the reference values, batch size {report.batch_size}, "
          f"relative tolerance {report.tolerance:g}")  # fmt: skip
    print(table(["stage", "file", "sent values", "returned grads", "param grads", "params & buffers", "result"], rows))
    for s in report.stages:
        for problem in s.problems:
            print(f"  stage {s.index}: {problem}")
    for problem in report.problems:
        print(f"  {problem}")
    for note in report.notes:
        print(f"  note: {note}")
    print(f"end to end: model outputs {report.model_outputs:.2e}, parameter gradients {report.model_gradients:.2e}, "
          f"parameters and buffers {report.model_state:.2e}")
    eval_line = f"eval mode: model outputs {report.eval_outputs:.2e}"
    if math.isnan(report.eval_outputs):
        eval_line = "eval mode: not compared (see the note above)"
    elif not report.eval_expected:
        eval_line += " (not judged: forward branches on self.training, and the stages keep the training branch)"
    elif report.eval_outputs > report.tolerance:
        # Only where training mode matches is a difference in eval mode down to the mode.
        eval_line += " FAIL" + (" (a stage keeps the training mode it was traced in)"
                                if report.model_outputs <= report.tolerance else "")  # fmt: skip
    print(eval_line)
    print("check passed" if report.ok else "check FAILED")


def run_train(args: argparse.Namespace) -> int:
    from ftc.runtime.config import load_config
    from ftc.runtime.results import summary
    from ftc.runtime.train import train
    from ftc.runtime.checkpoint import left_to_resume
    from ftc.runtime.worker import Stopped, launch

    config = load_config(args.config, args.set)
    try:
        if config.mode == "dist":
            results = launch(config)  # which passes a signal on to the ranks and raises Stopped
        else:
            try:
                results = train(config)
            except KeyboardInterrupt:
                raise Stopped(signal.SIGINT) from None
    except Stopped as stopped:
        print(f"ftc train: {stopped.message}; {left_to_resume(config.checkpoint.dir)}", file=sys.stderr)
        # The shell's convention for a process a signal stopped: 128 + the signal (Ctrl-C: 130).
        return 128 + stopped.signum
    print(summary(results) if results is not None else "this machine's ranks finished; rank 0's machine writes the results")
    return 0


def run_merge_checkpoint(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ftc.runtime.checkpoint import damaged_steps, file_in_the_way, merge, save_state_dict

    for damaged, missing in damaged_steps(Path(args.dir)).items():
        print(f"ftc merge-checkpoint: warning: skipped {damaged}: it lacks {', '.join(missing)}", file=sys.stderr)
    step, state = merge(Path(args.dir))
    folder = Path(args.dir)
    # Beside a step folder, not in it: keep, or a new run in the folder, removes step folders.
    is_step_folder = (folder / "manifest.json").is_file()
    default = folder.parent / f"merged-{folder.name}.safetensors" if is_step_folder else folder / "merged.safetensors"
    output = Path(args.output) if args.output else default
    # A folder, existing or not: a name without a suffix (or ending in a slash) would otherwise
    # become a torch file of that name.
    if output.is_dir() or (not output.exists() and (output.suffix == "" or str(args.output).endswith(("/", "\\")))):
        output = output / "merged.safetensors"
    blocking = file_in_the_way(output.parent)
    if blocking is not None:
        raise FtcError(f"-o {args.output}: {blocking} is a file, not a folder", "pass a file path in a folder")
    save_state_dict(output, state)
    print(f"{args.dir}: step {step}, {len(state)} tensors -> {output}")
    return 0


def run_explain(args: argparse.Namespace) -> int:
    from ftc.explain import explain, plot, render

    explanation = explain(args.pipeline, [args.micro_batches] if args.micro_batches else None, args.flush_every)
    if args.plot:
        plot(explanation, args.plot)
    print(render(explanation))
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


# Flags whose value may start with "-": argparse takes `--memory-limit -5MB` for two options
# ("expected one argument"); joined as `--memory-limit=-5MB`, the value's own check names it.
SIZE_FLAGS = ("--memory-limit", "--bandwidth", "--tflops", "--memory-gbps", "--op-overhead-us", "--stage-overhead-us")


def _join_dashed_values(argv: list[str]) -> list[str]:
    joined: list[str] = []
    for arg in argv:
        if joined and joined[-1] in SIZE_FLAGS and arg.startswith("-") and arg[1:2].isdigit():
            joined[-1] = f"{joined[-1]}={arg}"
        else:
            joined.append(arg)
    return joined


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # Building compile's parser imports torch and the compiler (seconds): Ctrl-C then is an
        # interruption too, not a traceback from inside an import.
        parser = _parser(argv[0] if argv else None)
    except KeyboardInterrupt:
        command = f"ftc {argv[0]}" if argv and not argv[0].startswith("-") else "ftc"
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    args = parser.parse_args(_join_dashed_values(argv))
    try:
        commands = {"compile": run_compile, "check": run_check, "explain": run_explain, "train": run_train, "merge-checkpoint": run_merge_checkpoint}
        return commands[args.command](args)
    except FtcError as exc:
        print(f"ftc {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"ftc {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`ftc explain ... | head`): what it wanted was printed
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # a bug in ftc, not in the user's input
        if isinstance(exc, OSError) and exc.filename is not None:
            # The file system refused a file (a read-only or virtual folder, a full disk): the
            # user's to fix, not a bug of ftc's.
            print(f"ftc {args.command}: error: {exc.filename}: {exc.strerror or exc}\n  fix: check that the path "
                  "exists and can be written, or pass another", file=sys.stderr)  # fmt: skip
            return EXIT_USAGE
        if os.environ.get("FTC_DEBUG"):
            traceback.print_exc()
        else:
            print(f"ftc {args.command}: internal error: {type(exc).__name__}: {exc} (FTC_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
