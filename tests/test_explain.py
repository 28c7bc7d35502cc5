"""`ftc explain`: per-stage figures that add up to the manifest's, schedule predictions that match
the closed form for equal stages, the PNG, and errors in the CLI's style."""

from __future__ import annotations

import json

import matplotlib.image
import pytest

from ftc.cli import main
from ftc.explain import explain

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


@pytest.mark.parametrize("name", ["gpt", "two_tower"])
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


def _synthetic(tmp_path, devices: list[int], fwd: float = 1.0, bwd: float = 2.0, comm: float = 0.0):
    """A pipeline.json with equal stages: a chain, stage k on devices[k]."""
    stages = []
    for k, device in enumerate(devices):
        stages.append(
            {
                "index": k, "file": f"stage{k}.py", "class": f"Stage{k}", "device": device,
                "inputs": [f"v{k}"], "outputs": [f"v{k + 1}"], "state": [], "recompute": False,
                "cost": {
                    "ops": 3, "parameters": 10, "parameter_bytes": 40, "fwd_flops": 0, "bwd_flops": 0,
                    "fwd_time": fwd, "bwd_time": bwd, "bytes_in": 16, "bytes_out": 16,
                    "predicted_time": fwd + bwd + comm, "recompute_time": 0.0,
                    "comm_fwd_time": 0.75 * comm, "comm_bwd_time": 0.25 * comm,
                },
            }
        )  # fmt: skip
    values = {
        f"v{k}": {"kind": "tensor", "shape": [4], "dtype": "float32", "batch_dim": 0, "requires_grad": k > 0}
        for k in range(len(devices) + 1)
    }
    manifest = {
        "format": "ftc-pipeline/1", "name": "chain", "model_file": "chain.py", "batch_size": 16,
        "settings": {"profile": "analytic", "bandwidth": 1.0}, "inputs": ["v0"], "outputs": [f"v{len(devices)}"],
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
    folder = _synthetic(tmp_path, [0, 1, 0, 1], comm=0.5)
    manifest = json.loads((folder / "pipeline.json").read_text())
    recomputing = manifest["stages"][3]
    recomputing["recompute"] = True
    recomputing["cost"]["recompute_time"] = recomputing["cost"]["fwd_time"]  # the re-forward
    recomputing["cost"]["predicted_time"] += recomputing["cost"]["fwd_time"]
    (folder / "pipeline.json").write_text(json.dumps(manifest))
    explanation = explain(folder, [4])
    for stage in explanation.stages:
        assert stage.comm_fwd + stage.comm_bwd == pytest.approx(0.5)
        assert stage.total == pytest.approx(4.5 if stage.recompute else 3.5)
    assert [s.recompute for s in explanation.stages] == [False, False, False, True]
    assert explanation.stages[3].bwd_time == pytest.approx(3.0)  # backward 2 s + forward again 1 s
    assert explanation.stages[0].comm_fwd == pytest.approx(0.75 * 0.5)
    devices = explanation.devices()
    assert sorted(devices) == [0, 1] and [s.index for s in devices[0]] == [0, 2]
    code, out, err = run_cli(["explain", folder, "--micro-batches", 4], capsys)
    assert code == 0, err
    device_table = out.split("device  stages", 1)[1]
    assert "0,2" in device_table and "7000.000" in device_table  # 2 stages x 3.5 s
    assert "8000.000" in device_table  # 3.5 s + 4.5 s
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

    user_error([tmp_path / "missing"], "holds no pipeline.json")
    user_error([GENERATED / "gpt", "--micro-batches", 0], "must be at least 1")
    user_error([GENERATED / "gpt", "--plot", tmp_path / "plot.svg"], "the plot is a PNG")
    user_error([GENERATED / "gpt", "--plot", tmp_path / "no" / "plot.png"], "does not exist")
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
