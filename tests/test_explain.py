"""`ftc explain`: per-stage figures that add up to the manifest's, schedule predictions that match
the closed form for equal stages, the PNG, and errors in the CLI's style."""

from __future__ import annotations

import json
import math

import matplotlib.image
import pytest

from ftc.cli import main
from ftc.explain import explain
from ftc.ir import FtcError

from .conftest import ROOT

GENERATED = ROOT / "generated"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(args, capsys):
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", ["gpt", "mlp", "resnet", "unet", "two_tower"])
def test_explain_adds_up_to_the_manifest(name, capsys):
    folder = GENERATED / name
    manifest = json.loads((folder / "pipeline.json").read_text())
    code, out, err = run_cli(["explain", folder], capsys)
    assert code == 0, err
    assert "samples/s" in out and "bubble" in out and "1f1b" in out and "gpipe" in out
    assert "analytic profile" in out.splitlines()[0]
    assert "times: estimated from FLOPs and bytes moved; compile with --profile measure, or --refine N" in out

    explanation = explain(folder)
    assert [s.index for s in explanation.stages] == [s["index"] for s in manifest["stages"]]
    for stage, entry in zip(explanation.stages, manifest["stages"]):
        cost = entry["cost"]
        assert stage.total == pytest.approx(cost["predicted_time"], rel=1e-9, abs=1e-15)
        # priced from the value specs and the device map, as the compiler priced the boundaries
        assert (stage.comm_fwd, stage.comm_bwd) == (cost["comm_fwd_time"], cost["comm_bwd_time"])
        assert stage.parameters == cost["parameters"] and stage.ops == cost["ops"]
        assert (stage.bytes_in, stage.bytes_out) == (cost["bytes_in"], cost["bytes_out"])
        memory = cost["memory"]["total"] if "memory" in cost else cost["parameter_bytes"]
        assert stage.memory == memory
    assert sum(s.fwd_time for s in explanation.stages) == pytest.approx(
        sum(s["cost"]["fwd_time"] for s in manifest["stages"])
    )
    device_totals = [sum(s.total for s in held) for held in explanation.devices().values()]
    if "device_times" in manifest["predicted"]:
        assert device_totals == pytest.approx(manifest["predicted"]["device_times"])
    assert max(device_totals) == pytest.approx(manifest["predicted"]["bottleneck_time"])
    assert {(p.schedule, p.micro_batches) for p in explanation.predictions} == {
        (kind, m) for kind in ("gpipe", "1f1b", "async") for m in (4, 8)
    }
    for prediction in explanation.predictions:
        assert prediction.steps == (16 if prediction.schedule == "async" else 1)
        assert prediction.throughput == pytest.approx(prediction.steps * manifest["batch_size"] / prediction.timeline.makespan)
        # No schedule beats the busiest device's work on one batch.
        busiest = max(sum(s.total for s in held) for held in explanation.devices().values())
        assert prediction.step_time >= busiest * (1 - 1e-9)


def _synthetic(
    tmp_path, devices: list[int], fwd: float = 1.0, bwd: float = 2.0, width: int = 0, bandwidth: float = 1.0
):
    """A pipeline.json with equal stages: a chain, stage k on devices[k], passing values of
    `width` float32 numbers (0: nothing to send) over `bandwidth` GB/s. The manifest's own
    communication figures are those of one stage per device."""
    stages = []
    for k, device in enumerate(devices):
        comm = 4 * width * ((k > 0) + (k < len(devices) - 1)) / (bandwidth * 1e9)
        stages.append(
            {
                "index": k, "file": f"stage{k}.py", "class": f"Stage{k}", "device": device,
                "inputs": [f"v{k}"], "outputs": [f"v{k + 1}"], "state": [], "recompute": False,
                "cost": {
                    "ops": 3, "parameters": 10, "parameter_bytes": 40, "fwd_flops": 0, "bwd_flops": 0,
                    "fwd_time": fwd, "bwd_time": bwd, "bytes_in": 4 * width, "bytes_out": 4 * width,
                    "predicted_time": fwd + bwd + 2 * comm, "recompute_time": 0.0,
                    "comm_fwd_time": comm, "comm_bwd_time": comm,
                },
            }
        )  # fmt: skip
    values = {
        f"v{k}": {"kind": "tensor", "shape": [width], "dtype": "float32", "batch_dim": 0, "requires_grad": k > 0}
        for k in range(len(devices) + 1)
    }
    manifest = {
        "format": "ftc-pipeline/1", "name": "chain", "model_file": "chain.py", "batch_size": 16,
        "settings": {"profile": "analytic", "bandwidth": bandwidth}, "inputs": ["v0"], "outputs": [f"v{len(devices)}"],
        "output_structure": {"kind": "value", "keys": []}, "stages": stages, "values": values,
    }  # fmt: skip
    folder = tmp_path / "chain"
    folder.mkdir()
    (folder / "pipeline.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("micro_batches", [1, 2, 8])
def test_bubble_of_equal_stages_is_the_closed_form(stages, micro_batches, tmp_path):
    folder = _synthetic(tmp_path, list(range(stages)))
    explanation = explain(folder, [micro_batches])
    for prediction in explanation.predictions:
        # One fill and drain per step, per 16 steps under async: of n = M (16 M) micro-batches.
        n = micro_batches * prediction.steps
        bubble = (stages - 1) / (n + stages - 1)
        assert prediction.timeline.bubble_fraction == pytest.approx(bubble)
        # (n + P - 1) slots of one micro-batch's forward and backward: 3 s / M each.
        assert prediction.timeline.makespan == pytest.approx((n + stages - 1) * 3.0 / micro_batches)
        assert prediction.throughput == pytest.approx(16 * prediction.steps / prediction.timeline.makespan)
    assert {p.schedule for p in explanation.predictions} == {"gpipe", "1f1b", "async"}


def test_communication_recomputation_and_devices_holding_several_stages_are_totalled(tmp_path, capsys):
    """Values of 4 float32 numbers (16 bytes, and 16 of gradient back) over 64 bytes/s: 0.25 s
    each way per value a stage sends or receives. On devices 0, 1, 0, 1 every boundary crosses:
    the first stage sends one value (the model input comes with the data), the middle ones
    receive one and send one, the last receives one (its output is read where it is made)."""
    folder = _synthetic(tmp_path, [0, 1, 0, 1], width=4, bandwidth=64e-9)
    manifest = json.loads((folder / "pipeline.json").read_text())
    recomputing = manifest["stages"][3]
    recomputing["recompute"] = True
    recomputing["cost"]["recompute_time"] = recomputing["cost"]["fwd_time"]  # the re-forward
    recomputing["cost"]["predicted_time"] += recomputing["cost"]["fwd_time"]
    (folder / "pipeline.json").write_text(json.dumps(manifest))
    explanation = explain(folder, [4])
    assert [s.comm_fwd for s in explanation.stages] == pytest.approx([0.25, 0.5, 0.5, 0.25])
    assert [s.comm_bwd for s in explanation.stages] == pytest.approx([0.25, 0.5, 0.5, 0.25])
    assert [s.total for s in explanation.stages] == pytest.approx([3.5, 4.0, 4.0, 4.5])
    assert [s.recompute for s in explanation.stages] == [False, False, False, True]
    assert explanation.stages[3].bwd_time == pytest.approx(3.0)  # backward 2 s + forward again 1 s
    devices = explanation.devices()
    assert sorted(devices) == [0, 1] and [s.index for s in devices[0]] == [0, 2]
    code, out, err = run_cli(["explain", folder, "--micro-batches", 4], capsys)
    assert code == 0, err
    device_table = out.split("device  stages", 1)[1]
    assert "0,2" in device_table and "7500" in device_table.split()  # 3.5 s + 4 s
    assert "8500" in device_table.split()  # 4 s + 4.5 s
    assert "memory: parameter bytes only" in out


def test_plot_writes_a_png(tmp_path, capsys):
    png = tmp_path / "gpt.png"
    code, out, err = run_cli(["explain", GENERATED / "gpt", "--micro-batches", 4, "--plot", png], capsys)
    assert code == 0, err
    assert f"plot written to {png}" in out
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    height, width, _ = matplotlib.image.imread(png).shape
    assert height > 300 and width > 300
    assert not list(tmp_path.glob(".*.tmp"))


def test_explain_errors(tmp_path, capsys):
    def user_error(args, fragment):
        code, out, err = run_cli(["explain", *args], capsys)
        assert code == 2, (code, out, err)
        assert "Traceback" not in err and fragment in err, err

    user_error([tmp_path / "missing"], "missing does not exist")
    user_error([GENERATED / "gpt", "--micro-batches", 0], "must be at least 1")
    user_error([GENERATED / "gpt", "--plot", tmp_path / "plot.svg"], "the plot is a PNG")
    user_error([GENERATED / "gpt", "--plot", tmp_path / "no" / "plot.png"], "does not exist")
    # a folder that exists but takes no files: the user's path is named, not the temporary file
    user_error([GENERATED / "gpt", "--plot", "/proc/plot.png"], "--plot /proc/plot.png cannot be written")
    folder = _synthetic(tmp_path, [0, 1])
    manifest = json.loads((folder / "pipeline.json").read_text())
    del manifest["stages"][1]["cost"]["fwd_time"]
    (folder / "pipeline.json").write_text(json.dumps(manifest))
    user_error([folder], "stage 1 has no predicted cost")


def test_timeline_bars_name_the_stage_where_a_device_owns_several(tmp_path):
    from ftc.explain import bar_labels

    (tmp_path / "shared").mkdir()
    (tmp_path / "plain").mkdir()
    shared = explain(_synthetic(tmp_path / "shared", [0, 1, 0, 1]), [2]).predictions[0].timeline.actions
    labels = bar_labels(shared)
    assert "0.0" in labels and "2.1" in labels and all("." in label for label in labels)
    plain = explain(_synthetic(tmp_path / "plain", [0, 1]), [2]).predictions[0].timeline.actions
    assert sorted(bar_labels(plain)) == ["0", "0", "0", "0", "1", "1", "1", "1"]


def test_a_recompute_flag_switched_by_hand_changes_the_predicted_backward(tmp_path):
    import shutil

    folder = tmp_path / "mlp"
    shutil.copytree(GENERATED / "mlp", folder)
    before = explain(folder).stages[0]
    manifest = json.loads((folder / "pipeline.json").read_text())
    assert not manifest["stages"][0]["recompute"]
    manifest["stages"][0]["recompute"] = True
    (folder / "pipeline.json").write_text(json.dumps(manifest))
    after = explain(folder).stages[0]
    assert after.recompute and after.bwd_time == pytest.approx(before.bwd_time + before.fwd_time)


def test_stages_put_on_one_device_by_hand_pass_their_values_free(tmp_path, capsys):
    """gpt's 4 stages pass one float32 [8, 64, 128] activation down the chain (262,144 bytes, and
    as many of gradient back, at the compiled 1 GB/s). Put on devices 0, 0, 1, 1 by hand, only the
    value between stages 1 and 2 crosses a link: stages 0 and 3 move nothing, 1 and 2 one value
    each way, where the compiled map charged stages 1 and 2 two."""
    import shutil

    folder = tmp_path / "gpt"
    shutil.copytree(GENERATED / "gpt", folder)
    manifest = json.loads((folder / "pipeline.json").read_text())
    assert manifest["settings"]["bandwidth"] == 1.0
    for name in ("x_4", "x_8", "x_12"):
        assert manifest["values"][name]["shape"] == [8, 64, 128] and manifest["values"][name]["requires_grad"]
    before = explain(folder, [4]).stages
    for stage, device in zip(manifest["stages"], [0, 0, 1, 1]):
        stage["device"] = device
    (folder / "pipeline.json").write_text(json.dumps(manifest))
    explanation = explain(folder, [4])
    one_way = 8 * 64 * 128 * 4 / 1e9
    assert [s.comm_fwd for s in explanation.stages] == [0.0, one_way, one_way, 0.0]
    assert [s.comm_bwd for s in explanation.stages] == [0.0, one_way, one_way, 0.0]
    for stage, old in zip(explanation.stages, before):
        assert (stage.fwd_time, stage.bwd_time) == (old.fwd_time, old.bwd_time)
        assert stage.total == pytest.approx(stage.fwd_time + stage.bwd_time + stage.comm_fwd + stage.comm_bwd)
    assert {d: [s.index for s in held] for d, held in explanation.devices().items()} == {0: [0, 1], 1: [2, 3]}
    # The schedules are simulated with these costs: every action lasts its stage's share of them.
    for prediction in explanation.predictions:
        stage = {s.index: s for s in explanation.stages}
        for timed in prediction.timeline.actions:
            s = stage[timed.action.stage]
            expected = (s.fwd_time + s.comm_fwd if timed.action.kind == "forward" else s.bwd_time + s.comm_bwd) / 4
            assert timed.end - timed.start == pytest.approx(expected)
    code, out, err = run_cli(["explain", folder, "--micro-batches", 4], capsys)
    assert code == 0, err
    assert out.startswith("gpt: 4 stages on 2 devices")
    device_rows = out.split("device  stages", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    assert [row.split()[:2] for row in device_rows[:2]] == [["0", "0,1"], ["1", "2,3"]]
    assert "(pipeline.json has no device figures for this device map)" in out


def test_explain_needs_the_link_bandwidth(tmp_path, capsys):
    folder = _synthetic(tmp_path, [0, 1])
    manifest = json.loads((folder / "pipeline.json").read_text())
    for bandwidth in (None, 0, "fast"):
        manifest["settings"]["bandwidth"] = bandwidth
        (folder / "pipeline.json").write_text(json.dumps(manifest))
        code, out, err = run_cli(["explain", folder], capsys)
        assert code == 2 and "Traceback" not in err
        assert "settings key 'bandwidth'" in err and "recompile" in err, err


def _uneven_chain(tmp_path, times: list[tuple[float, float]]):
    """A chain of stages on devices of their own, stage k taking times[k] (forward, backward)."""
    folder = _synthetic(tmp_path, list(range(len(times))))
    manifest = json.loads((folder / "pipeline.json").read_text())
    for stage, (fwd, bwd) in zip(manifest["stages"], times):
        stage["cost"].update(fwd_time=fwd, bwd_time=bwd, predicted_time=fwd + bwd)
    (folder / "pipeline.json").write_text(json.dumps(manifest))
    return folder


def _async(explanation, micro_batches: int):
    return next(p for p in explanation.predictions if p.schedule == "async" and p.micro_batches == micro_batches)


def _one_f_one_b(explanation, micro_batches: int):
    return next(p for p in explanation.predictions if p.schedule == "1f1b" and p.micro_batches == micro_batches)


@pytest.mark.parametrize("times", [[(1.0, 2.0)] * 3, [(0.5, 1.0), (1.5, 2.0), (0.25, 0.75), (1.0, 1.0)]])
def test_async_flushing_every_step_is_1f1b(times, tmp_path):
    """staleness.flush_every 1 fills and drains the pipeline every step: 1F1B."""
    explanation = explain(_uneven_chain(tmp_path, times), [1, 2, 4, 8, 16], flush_every=1)
    for m in (1, 2, 4, 8, 16):
        flushed, synchronous = _async(explanation, m), _one_f_one_b(explanation, m)
        assert flushed.steps == 1
        assert flushed.step_time == pytest.approx(synchronous.step_time, rel=1e-12)
        assert flushed.timeline.bubble_fraction == pytest.approx(synchronous.timeline.bubble_fraction, rel=1e-12)
        assert flushed.throughput == pytest.approx(synchronous.throughput, rel=1e-12)


def test_async_steps_fall_toward_the_busiest_device_as_flushes_grow_rare(tmp_path):
    """Equal stages of 3 s per batch on P = 4 devices, M = 2: a flush every N steps runs N M
    micro-batches in (N M + P - 1) slots of 3/M s, so a step takes 3 (N M + 3) / (N M) s, down
    to the 3 s of the busiest device. Uneven stages: never below the busiest device's time per
    batch, never above it plus one pass of a micro-batch through every stage per N M of them."""
    equal = _synthetic(tmp_path, [0, 1, 2, 3])
    for n in (1, 2, 4, 16, 64):
        prediction = _async(explain(equal, [2], flush_every=n), 2)
        assert prediction.steps == n
        assert prediction.step_time == pytest.approx(3.0 * (n * 2 + 3) / (n * 2))
        assert prediction.throughput == pytest.approx(16 / prediction.step_time)
    (tmp_path / "uneven").mkdir()
    times = [(0.5, 1.0), (1.5, 2.0), (0.25, 0.75), (1.0, 1.0)]
    uneven = _uneven_chain(tmp_path / "uneven", times)
    busiest, everything = max(f + b for f, b in times), sum(f + b for f, b in times)
    previous = math.inf
    for n in (1, 2, 4, 16, 64):
        step = _async(explain(uneven, [4], flush_every=n), 4).step_time
        assert busiest <= step <= busiest + everything / (n * 4) and step <= previous
        previous = step
    assert step == pytest.approx(busiest, rel=0.02)


def test_flush_every_must_be_a_positive_integer(tmp_path, capsys):
    folder = _synthetic(tmp_path, [0, 1])
    for bad in (0, -3, 2.5, True):
        with pytest.raises(FtcError, match="--flush-every .* is not a positive integer"):
            explain(folder, flush_every=bad)
    for bad, message in (("0", "0 must be at least 1"), ("x", "'x' is not an integer")):
        code, out, err = run_cli(["explain", folder, "--flush-every", bad], capsys)
        assert code == 2 and "Traceback" not in err and message in err, err
    code, out, err = run_cli(["explain", folder, "--micro-batches", 2, "--flush-every", 4], capsys)
    assert code == 0, err
    assert "async (flush every 4 steps)" in out and "flush every 16" not in out
    code, out, err = run_cli(["explain", folder, "--micro-batches", 2, "--flush-every", 1], capsys)
    assert code == 0 and "async (flush every step)" in out, err


def test_device_figures_of_the_compiled_map_are_not_shown_for_another(tmp_path, capsys):
    """The manifest's device memory and parameters count a tensor two stages of a device share
    once; they are the figures of the stages each device held when compiled. Moved by hand, a
    device's figures are the sums of its stages' (each stage 40 parameter bytes, 10 parameters),
    and explain says so."""
    folder = _synthetic(tmp_path, [0, 1, 0, 1])
    manifest = json.loads((folder / "pipeline.json").read_text())
    manifest["predicted"] = {"device_stages": [[0, 2], [1, 3]], "device_memory": [60, 70], "device_parameters": [15, 17]}
    (folder / "pipeline.json").write_text(json.dumps(manifest))
    compiled = explain(folder, [4])
    assert compiled.device_memory == {0: 60, 1: 70} and compiled.device_parameters == {0: 15, 1: 17}
    code, out, err = run_cli(["explain", folder, "--micro-batches", 4], capsys)
    assert code == 0, err
    rows = out.split("device  stages", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    assert [row.split()[:4] for row in rows] == [["0", "0,2", "15", "60B"], ["1", "1,3", "17", "70B"]]
    assert "no device figures for this device map" not in out

    for stage, device in zip(manifest["stages"], [0, 0, 1, 1]):
        stage["device"] = device
    (folder / "pipeline.json").write_text(json.dumps(manifest))
    edited = explain(folder, [4])
    assert edited.device_memory == {} and edited.device_parameters == {}
    code, out, err = run_cli(["explain", folder, "--micro-batches", 4], capsys)
    assert code == 0, err
    rows = out.split("device  stages", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    assert [row.split()[:4] for row in rows[:2]] == [["0", "0,1", "20", "80B"], ["1", "2,3", "20", "80B"]]
    assert "(pipeline.json has no device figures for this device map)" in out


def test_figures_keep_four_significant_digits_at_any_scale():
    """A 7B model's predicted step on a CPU (488 s) printed 0.0 samples/s and times with three
    decimals of noise."""
    from ftc.tables import figure

    assert [figure(v) for v in (488431.398, 40.698, 0.5243, 0.004095, 0.0)] == ["488431", "40.70", "0.5243",
                                                                                "0.004095", "0"]  # fmt: skip
