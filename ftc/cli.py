"""The `ftc` command line: compile a model file into a pipeline, check a pipeline against its model."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from ftc.ir import FtcError

EXIT_USAGE = 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def _parser() -> argparse.ArgumentParser:
    from ftc.frontends import FRONTENDS
    from ftc.passes.partition import METHODS
    from ftc.profiling import DeviceModel

    parser = argparse.ArgumentParser(prog="ftc", description="A pipeline-parallel compiler for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    compile_ = commands.add_parser("compile", help="compile a model file into per-stage modules")
    compile_.add_argument("model", help="model file (defines build_model() and example_inputs(batch_size))")
    compile_.add_argument("--stages", type=_positive_int, required=True, help="number of pipeline stages")
    compile_.add_argument("-o", "--output", required=True, help="folder to write <name>/ into")
    compile_.add_argument("--name", help="pipeline name (default: the model file's stem)")
    compile_.add_argument("--batch-size", type=_positive_int, default=8, help="batch size to trace and cost with (default 8)")
    compile_.add_argument("--method", choices=sorted(METHODS), default="pipedream", help="partitioner (default pipedream)")
    compile_.add_argument("--frontend", choices=FRONTENDS, default="auto", help="tracer: fx, export, or auto (fx, then export)")
    compile_.add_argument("--bandwidth", type=_positive_float, default=1.0, metavar="GBPS", help="link bandwidth between stages, GB/s (default 1)")
    compile_.add_argument("--tflops", type=_positive_float, default=DeviceModel.tflops, help=f"device peak TFLOP/s for predicted times (default {DeviceModel.tflops})")
    compile_.add_argument("--memory-gbps", type=_positive_float, default=DeviceModel.memory_gbps, help=f"device memory bandwidth, GB/s (default {DeviceModel.memory_gbps})")
    compile_.add_argument("--force", action="store_true", help="overwrite stage files edited by hand")

    check = commands.add_parser("check", help="check a generated pipeline against its model (outputs, buffers, gradients)")
    check.add_argument("pipeline", help="generated pipeline folder (generated/<name>)")
    check.add_argument("--model", help="model file (default: the one pipeline.json names)")
    check.add_argument("--batch-size", type=_positive_int, help="batch size (default: the compile batch size)")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--tolerance", type=_positive_float, default=1e-5, help="largest relative difference allowed (default 1e-5)")
    return parser  # fmt: skip


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(cell).rjust(w) for cell, w in zip(row, widths)) for row in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _human(count: float, unit: str = "") -> str:
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.2f}{suffix}{unit}"
    return f"{count:.0f}{unit}"


def run_compile(args: argparse.Namespace) -> int:
    from ftc.compiler import CompileOptions, compile_model

    options = CompileOptions(
        stages=args.stages, batch_size=args.batch_size, method=args.method, frontend=args.frontend,
        bandwidth=args.bandwidth, tflops=args.tflops, memory_gbps=args.memory_gbps, name=args.name,
        force=args.force,
    )  # fmt: skip
    compiled = compile_model(args.model, args.output, options)
    rows = []
    for stage in compiled.stages:
        cost = stage["cost"]
        rows.append([
            stage["index"], stage["device"], cost["ops"], _human(cost["parameters"]),
            _human(cost["fwd_flops"]), f"{cost['predicted_time'] * 1e3:.3f}", _human(cost["bytes_out"], "B"),
        ])  # fmt: skip
    print(f"{compiled.graph.name}: {len([n for n in compiled.graph.nodes if n.is_compute])} ops "
          f"({compiled.graph.frontend} frontend), {args.method} into {len(rows)} stages -> {compiled.folder}")  # fmt: skip
    print(table(["stage", "device", "ops", "params", "fwd FLOPs", "predicted ms", "sends"], rows))
    times = [stage["cost"]["predicted_time"] for stage in compiled.stages]
    print(f"predicted balance (max/mean stage time): {max(times) / (sum(times) / len(times)):.3f}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from ftc.check import check_pipeline

    report = check_pipeline(args.pipeline, args.model, args.batch_size, args.seed, args.tolerance)
    rows = [
        [s.index, s.file, f"{s.outputs:.2e}", f"{s.input_grads:.2e}", f"{s.gradients:.2e}", f"{s.buffers:.2e}",
         "ok" if report.stage_ok(s) else "FAIL"]
        for s in report.stages
    ]  # fmt: skip
    print(f"{report.folder}: each stage alone on the reference values, batch size {report.batch_size}, "
          f"relative tolerance {report.tolerance:g}")  # fmt: skip
    print(table(["stage", "file", "sent values", "returned grads", "param grads", "buffers", "result"], rows))
    for s in report.stages:
        for problem in s.problems:
            print(f"  stage {s.index}: {problem}")
    for problem in report.problems:
        print(f"  {problem}")
    print(f"end to end: model outputs {report.model_outputs:.2e}, parameter gradients {report.model_gradients:.2e}")
    print("check passed" if report.ok else "check FAILED")
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"compile": run_compile, "check": run_check}[args.command](args)
    except FtcError as exc:
        print(f"ftc {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a bug in ftc, not in the user's input
        if os.environ.get("FTC_DEBUG"):
            traceback.print_exc()
        else:
            print(f"ftc {args.command}: internal error: {type(exc).__name__}: {exc} (FTC_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
