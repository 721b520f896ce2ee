"""Resumable stages (--stage weights | activations | export | all): each stage alone, started from the previous
stage's checkpoint in the output folder, gives the same bytes as one --stage all run; a stopped run resumes after
its last finished stage; an activation stage rerun with other ranges keeps the weights stage as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import graphq
from graphq.cli import main as cli_main
from graphq.config import QuantConfig
from graphq.errors import GraphqError
from graphq.stages import STAGES, finished_stages, stage_dir

GROUP = 32
COMMON = dict(group_size=GROUP, num_samples=4, seq_len=32)
CASES = {
    # calibrated weight-only layers (emitted in the weights stage), params extraction beside the artifacts
    "w4a16-awq-params": dict(scheme="w4a16", method="awq", save_format=["onnx", "safetensors", "params"]),
    # smoothing in the weights stage, its derived statistics reused by the ranges; KV cache in the activation stage
    "w8a8-smooth-kv": dict(scheme="w8a8", smooth="smoothquant", kv_cache="int8", act_method="auto"),
    # int4 weights rounded in the weights stage, waiting in the checkpoint for their activation ranges
    "w4a8-awq-smooth": dict(scheme="w4a8", method="awq", smooth="smoothquant", smooth_alpha=0.5),
    # the torch-side KD weights stage: its trained state travels in the weights checkpoint into the export
    "kd": dict(scheme="w4a16", method="kd", kd={"train_samples": 4, "cutoff_len": 32, "num_epochs": 1}),
    # mixed: weight-only and per-token layers in one run
    "mixed-dynamic": dict(scheme="w4a16", scheme_overrides={"mlp": "w4a8-dynamic"}),
    # pruned, smoothed, lowbit levels rounded by GPTQ in the weights stage, compressed at the export
    "w8a8s-sparsegpt": dict(scheme="w8a8s", method="sparsegpt", sparsity=0.5, smooth="smoothquant", compress=True),
}
# Timing and memory differ from run to run; everything else in report.json must not.
VOLATILE = ("elapsed_seconds", "stage_seconds", "peak_rss_bytes", "seconds_per_decoder_layer")


def stable_report(folder: Path) -> dict:
    report = json.loads((folder / "report.json").read_text())
    for key in VOLATILE:
        report.pop(key, None)
    calibration = report.get("activation_calibration", {})
    for key in ("seconds", "peak_rss_bytes_after"):
        calibration.pop(key, None)
    for entry in report["layers"]:
        entry.pop("layer_seconds", None)
    return report


def output_files(folder: Path) -> dict[str, bytes]:
    """Every file of the export (not the checkpoints) but report.json, by name."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != "report.json"}


def assert_same_export(a: Path, b: Path) -> None:
    files_a, files_b = output_files(a), output_files(b)
    assert sorted(files_a) == sorted(files_b)
    for name in files_a:
        assert files_a[name] == files_b[name], f"{name} differs"
    assert stable_report(a) == stable_report(b)


@pytest.fixture(scope="module")
def staged(tiny_models, tiny_text, tmp_path_factory):
    """{case: (folder of one --stage all run, folder built stage by stage)}."""
    root = tmp_path_factory.mktemp("stages")
    model = tiny_models["llama"]["onnx"]
    result = {}
    for case, options in CASES.items():
        config = QuantConfig(**COMMON, **options, calib=str(tiny_text))
        whole, parts = root / f"{case}-all", root / f"{case}-staged"
        graphq.quantize(model, config, whole, progress=False)
        for stage in STAGES:
            graphq.quantize(model, config, parts, progress=False, stage=stage)
        result[case] = (whole, parts)
    return result


@pytest.mark.parametrize("case", list(CASES))
def test_each_stage_from_its_checkpoint_equals_one_run(staged, case):
    whole, parts = staged[case]
    assert_same_export(whole, parts)
    assert finished_stages(parts) == ["weights", "activations"]
    report = json.loads((parts / "report.json").read_text())
    assert set(report["stage_seconds"]) == set(STAGES)
    if CASES[case].get("method") == "awq":  # layer-wise calibration: its time per decoder layer
        assert set(report["seconds_per_decoder_layer"]) == {"0", "1"}
        assert all(t["capture"] >= 0 and t["search"] > 0 for t in report["seconds_per_decoder_layer"].values())


def test_the_weights_checkpoint_holds_w4a8_weights_waiting_for_their_ranges(staged):
    _, parts = staged["w4a8-awq-smooth"]
    state = json.loads((stage_dir(parts, "weights") / "stage.json").read_text())
    assert state["prep"]["rounded"] and state["prep"]["smoothing"]["groups"]
    assert (stage_dir(parts, "weights") / "tensors.safetensors").is_file()
    after = json.loads((stage_dir(parts, "activations") / "stage.json").read_text())
    assert not after["prep"]["rounded"]  # emitted by the activation stage


def test_the_kd_state_goes_from_the_weights_checkpoint_into_the_export(staged):
    from graphq.kd.engine import KD_STATE_FILE

    _, parts = staged["kd"]
    assert (parts / KD_STATE_FILE).read_bytes() == (stage_dir(parts, "weights") / KD_STATE_FILE).read_bytes()


def test_a_weight_only_run_keeps_one_graph_for_both_checkpoints(staged):
    _, parts = staged["w4a16-awq-params"]
    state = json.loads((stage_dir(parts, "activations") / "stage.json").read_text())
    assert state["model_from"] == "weights"
    assert not (stage_dir(parts, "activations") / "model.onnx").exists()


def test_a_stopped_run_resumes_after_its_last_finished_stage(staged, tiny_models, tiny_text, tmp_path, capsys):
    model = tiny_models["llama"]["onnx"]
    config = QuantConfig(**COMMON, **CASES["w4a8-awq-smooth"], calib=str(tiny_text))
    out = tmp_path / "q"
    graphq.quantize(model, config, out, progress=False, stage="weights")  # as if killed during the activations
    weights_state = stage_dir(out, "weights") / "stage.json"
    inode = weights_state.stat().st_ino
    capsys.readouterr()
    graphq.quantize(model, config, out, progress=False)
    assert "resuming from there" in capsys.readouterr().err
    assert weights_state.stat().st_ino == inode  # carried over, not redone
    assert_same_export(staged["w4a8-awq-smooth"][0], out)


def test_the_activation_stage_reruns_with_other_ranges(staged, tiny_models, tiny_text, tmp_path):
    """The weights stage stays; the new ranges give what a whole run with them gives."""
    model = tiny_models["llama"]["onnx"]
    options = {**COMMON, **CASES["w4a8-awq-smooth"], "calib": str(tiny_text)}
    out = tmp_path / "rerun"
    graphq.quantize(model, QuantConfig(**options), out, progress=False)
    inode = (stage_dir(out, "weights") / "stage.json").stat().st_ino
    percentile = QuantConfig(**options, act_method="percentile", percentile=99.0)
    with pytest.raises(GraphqError, match="holds a finished export: pass --overwrite"):
        graphq.quantize(model, percentile, out, progress=False, stage="activations")
    graphq.quantize(model, percentile, out, progress=False, stage="activations", overwrite=True)
    assert not (out / "report.json").exists()  # the old export is gone with the old ranges
    graphq.quantize(model, percentile, out, progress=False, stage="export")
    assert (stage_dir(out, "weights") / "stage.json").stat().st_ino == inode
    whole = tmp_path / "whole"
    graphq.quantize(model, percentile, whole, progress=False)
    assert_same_export(whole, out)
    old = json.loads((staged["w4a8-awq-smooth"][0] / "report.json").read_text())
    new = json.loads((out / "report.json").read_text())
    assert {e["activation_method"] for e in new["layers"] if "activation_method" in e} == {"percentile"}
    assert [e.get("activation_range") for e in new["layers"]] != [e.get("activation_range") for e in old["layers"]]


def test_a_stage_refuses_a_checkpoint_of_other_options(tiny_models, tiny_text, tmp_path):
    model = tiny_models["llama"]["onnx"]
    base = dict(**COMMON, scheme="w8a8", calib=str(tiny_text))
    out = tmp_path / "q"
    with pytest.raises(GraphqError, match="has no finished weights stage: run graphq quantize with --stage weights"):
        graphq.quantize(model, QuantConfig(**base), out, progress=False, stage="activations")
    graphq.quantize(model, QuantConfig(**base), out, progress=False, stage="weights")
    with pytest.raises(GraphqError, match="has no finished activations stage"):
        graphq.quantize(model, QuantConfig(**base), out, progress=False, stage="export")
    with pytest.raises(GraphqError, match=r"ran with smooth=None, this run has smooth='smoothquant': run --stage weights"):
        graphq.quantize(model, QuantConfig(**base, smooth="smoothquant"), out, progress=False, stage="activations")
    with pytest.raises(GraphqError, match=r"ran with num_samples=4.*pass --overwrite to start again"):
        graphq.quantize(model, QuantConfig(**{**base, "num_samples": 3}), out, progress=False)
    with pytest.raises(GraphqError, match="holds the weights stage of"):
        graphq.quantize(tiny_models["qwen2"]["onnx"], QuantConfig(**base), out, progress=False, stage="activations")
    with pytest.raises(GraphqError, match="unknown stage 'calibrate'"):
        graphq.quantize(model, QuantConfig(**base), out, progress=False, stage="calibrate")
    # A stage's own options may change: the ranges are the activation stage's.
    graphq.quantize(model, QuantConfig(**base, act_method="mse"), out, progress=False, stage="activations")
    assert finished_stages(out) == ["weights", "activations"]


def test_an_unfinished_folder_is_not_an_export(tiny_models, tiny_text, tmp_path):
    """A folder holding only checkpoints has no model.onnx to load: commands reading an export say so."""
    model = tiny_models["llama"]["onnx"]
    out = tmp_path / "q"
    graphq.quantize(model, QuantConfig(**COMMON, calib=str(tiny_text)), out, progress=False, stage="weights")
    assert sorted(p.name for p in out.iterdir()) == ["stages"]
    assert (stage_dir(out, "weights") / "model.onnx").is_file()


def test_cli_stage_flag(tiny_models, tmp_path, capsys):
    from graphq.cli import build_parser
    from graphq.stages import STAGE_CHOICES

    # the command line lists the stages without importing the pipeline: the same list
    assert build_parser().parse_args(["quantize", "m", "-o", "o", "--stage", "export"]).stage == "export"
    for stage in STAGE_CHOICES:
        build_parser().parse_args(["quantize", "m", "-o", "o", "--stage", stage])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "m", "-o", "o", "--stage", "calibrate"])
    model = str(tiny_models["llama"]["onnx"])
    out = str(tmp_path / "q")
    assert cli_main(["quantize", model, "-o", out, "--group-size", str(GROUP), "--stage", "weights", "--quiet"]) == 0
    assert "next: --stage activations" in capsys.readouterr().err
    assert cli_main(["quantize", model, "-o", out, "--group-size", str(GROUP), "--quiet"]) == 0  # resumes
    assert (tmp_path / "q" / "report.json").is_file()
    assert cli_main(["quantize", model, "-o", out, "--stage", "weights", "--quiet"]) == 2
    assert "holds a finished export" in capsys.readouterr().err


def test_a_run_failing_in_a_stage_keeps_the_stages_before_it(staged, tiny_models, tiny_text, tmp_path, monkeypatch):
    """A crash in the activation stage (here: an interrupt) leaves the folder as the weights stage published it,
    with no staging folder beside it; the same command then resumes and ends with the same export."""
    import importlib

    pipeline = importlib.import_module("graphq.quantize")  # the module (graphq.quantize is also the function)

    model = tiny_models["llama"]["onnx"]
    config = QuantConfig(**COMMON, **CASES["w8a8-smooth-kv"], calib=str(tiny_text))
    out = tmp_path / "q"

    def interrupted(run, progress):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "activations_stage", interrupted)
        with pytest.raises(KeyboardInterrupt):
            graphq.quantize(model, config, out, progress=False)
    assert finished_stages(out) == ["weights"] and not (out / "report.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no partial folder left
    graphq.quantize(model, config, out, progress=False)
    assert_same_export(staged["w8a8-smooth-kv"][0], out)


@pytest.mark.parametrize("damage", ["stage.json not JSON", "stage.json without a key", "tensors cut short"])
def test_a_damaged_checkpoint_is_one_line_and_changes_nothing(tiny_models, tiny_text, tmp_path, capsys, damage):
    from test_cli import assert_one_error
    from test_reliability import tree_digest

    model = str(tiny_models["llama"]["onnx"])
    out = tmp_path / "q"
    args = ["quantize", model, "-o", str(out), "--scheme", "w4a8", "--method", "rtn", "--group-size", str(GROUP),
            "--calib", str(tiny_text), "--num-samples", "2", "--seq-len", "16", "--quiet"]
    assert cli_main([*args, "--stage", "weights"]) == 0
    checkpoint = stage_dir(out, "weights")
    if damage == "stage.json not JSON":
        (checkpoint / "stage.json").write_text("{\"format\": 1, ")
    elif damage == "stage.json without a key":
        state = json.loads((checkpoint / "stage.json").read_text())
        del state["collector"]
        (checkpoint / "stage.json").write_text(json.dumps(state))
    else:
        data = (checkpoint / "tensors.safetensors").read_bytes()
        (checkpoint / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    before = tree_digest(tmp_path)
    capsys.readouterr()
    code = cli_main([*args, "--stage", "activations"])
    assert_one_error(code, *capsys.readouterr(), "checkpoint", "run --stage weights again")
    assert tree_digest(tmp_path) == before  # no staging folder left, the checkpoint as it was


def test_the_export_stage_sets_the_matmulnbits_accuracy_level(staged, tiny_models, tiny_text, tmp_path):
    """--accuracy-level is an export option: rerunning the export from the weights checkpoint sets it on every
    MatMulNBits node and nothing else changes in the weights; onnxruntime runs it close to the float kernel."""
    import onnx

    from graphq.runtimes.ort import OrtCausalLM

    whole = staged["w4a16-awq-params"][0]
    out = tmp_path / "level4"
    shutil.copytree(whole, out)
    options = {**COMMON, **CASES["w4a16-awq-params"], "calib": str(tiny_text)}
    graphq.quantize(tiny_models["llama"]["onnx"], QuantConfig(**options, accuracy_level=4), out, progress=False,
                    stage="export", overwrite=True)
    levels = {}
    for folder in (whole, out):
        nodes = [n for n in onnx.load(folder / "model.onnx", load_external_data=False).graph.node
                 if n.op_type == "MatMulNBits"]
        levels[folder] = {a.i for n in nodes for a in n.attribute if a.name == "accuracy_level"}
        assert nodes and len(levels[folder]) == 1
    assert levels[whole] == {0} and levels[out] == {4}
    assert json.loads((out / "report.json").read_text())["config"]["accuracy_level"] == 4
    ids = np.arange(1, 33).reshape(1, -1) % 90
    exact, fast = (OrtCausalLM(folder, threads=1).logits(ids) for folder in (whole, out))
    cosine = np.sum(exact * fast) / (np.linalg.norm(exact) * np.linalg.norm(fast))
    assert cosine > 0.99
    for bad, message in ((dict(accuracy_level=5), "must be 0-4"), (dict(accuracy_level=4, format="qdq"), "has none")):
        with pytest.raises(GraphqError, match=message):
            QuantConfig(**{**options, **bad}).validate()
