"""The command line: every bad input is one 'graphq: error:' line and exit status 2, with no traceback and no
half-written output; the happy path quantizes from a YAML config, evaluates, and compares."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphq.cli import main

GRAPHQ = Path(sys.executable).parent / "graphq"
# tqdm redraws with carriage returns; its lines hold "it/s", "%|" or end in "]".
_PROGRESS = re.compile(r"\r|\d+%\||it/s\]|s/it\]|window/s\]|layer/s\]")


def error_lines(stderr: str) -> list[str]:
    lines = [line for line in stderr.splitlines() if line.strip() and not _PROGRESS.search(line)]
    return lines


def assert_one_error(code: int, out: str, err: str, *fragments: str) -> str:
    assert code == 2, f"exit status {code}; stderr: {err}"
    assert "Traceback" not in err and "Traceback" not in out
    lines = error_lines(err)
    assert len(lines) == 1, f"expected one error line, got {lines}"
    (line,) = lines
    assert line.startswith("graphq: error: "), line
    for fragment in fragments:
        assert fragment.lower() in line.lower(), f"{fragment!r} not in {line!r}"
    return line


def assert_nothing_written(output: Path) -> None:
    assert not output.exists(), f"{output} was created"
    leftovers = [p.name for p in output.parent.iterdir() if p.name.endswith((".partial", ".old"))]
    assert leftovers == [], leftovers


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tree_hashes(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def llama(tiny_models) -> Path:
    return tiny_models["llama"]["onnx"]


@pytest.fixture
def corrupt_model(tmp_path) -> Path:
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    return folder


@pytest.fixture
def add_only_model(tmp_path) -> Path:
    folder = tmp_path / "add"
    folder.mkdir()
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])],
        "add",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), folder / "model.onnx")
    return folder


# ----------------------------------------------------------------- quantize: bad inputs


def test_missing_model(capsys, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "quantize", tmp_path / "nope", "-o", out, "--quiet")
    assert_one_error(code, stdout, err, "does not exist")
    assert_nothing_written(out)


def test_corrupt_model(capsys, tmp_path, corrupt_model):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "quantize", corrupt_model, "-o", out, "--quiet")
    assert_one_error(code, stdout, err, "not a readable ONNX model")
    assert_nothing_written(out)


def test_model_without_linear_layers(capsys, tmp_path, add_only_model):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "quantize", add_only_model, "-o", out, "--quiet")
    assert_one_error(code, stdout, err, "no quantizable linear layers")
    assert_nothing_written(out)


@pytest.mark.parametrize(
    "flags,fragment",
    [
        (["--scheme", "w2a16"], "unknown scheme 'w2a16'"),  # w3a16 exists (codebook weights only)
        (["--scheme", "w3a16"], "w3a16 has no uniform 3-bit kernel"),
        (["--group-size", "48"], "group size 48"),
        (["--group-size", "8"], "group size 8"),
        (["--group-size", "0"], "group size 0"),
        (["--format", "gguf"], "unknown format 'gguf'"),
        (["--method", "smoothquant"], "unknown method 'smoothquant'"),
    ],
)
def test_bad_options(capsys, tmp_path, llama, flags, fragment):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "quantize", llama, "-o", out, "--quiet", *flags)
    assert_one_error(code, stdout, err, fragment)
    assert_nothing_written(out)


def test_output_exists_is_refused_then_overwritten(capsys, tmp_path, llama):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, stdout, err = run_cli(capsys, "quantize", llama, "-o", out, "--quiet")
    assert_one_error(code, stdout, err, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine" and not (out / "model.onnx").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []

    code, stdout, err = run_cli(capsys, "quantize", llama, "-o", out, "--quiet", "--overwrite")
    assert code == 0, err
    assert "Traceback" not in err
    assert stdout.strip().splitlines()[-1] == str(out / "model.onnx")
    assert (out / "model.onnx").is_file() and (out / "report.json").is_file()
    assert not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_output_equal_to_input_is_refused(capsys, tmp_path, llama):
    before = tree_hashes(llama)
    for source in (llama, llama / "model.onnx"):
        code, stdout, err = run_cli(capsys, "quantize", source, "-o", llama, "--quiet", "--overwrite")
        assert_one_error(code, stdout, err, "would overwrite the input")
    assert tree_hashes(llama) == before
    assert [p.name for p in llama.parent.iterdir() if p.name.endswith(".partial")] == []


def test_config_unknown_key(capsys, tmp_path, llama):
    config = tmp_path / "q.yaml"
    config.write_text("scheme: w4a16\ngroup_sise: 32\n")
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "quantize", llama, "-o", out, "--config", config, "--quiet")
    assert_one_error(code, stdout, err, "unknown config key", "group_sise")
    assert_nothing_written(out)


def test_config_invalid_yaml(capsys, tmp_path, llama):
    config = tmp_path / "q.yaml"
    config.write_text("scheme: [w4a16\n  group_size: : 32\n")
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "quantize", llama, "-o", out, "--config", config, "--quiet")
    assert_one_error(code, stdout, err, "not valid YAML")
    assert_nothing_written(out)


def test_config_missing(capsys, tmp_path, llama):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "quantize", llama, "-o", out, "--config", tmp_path / "none.yaml", "--quiet")
    assert_one_error(code, stdout, err, "does not exist")
    assert_nothing_written(out)


# ----------------------------------------------------------------- eval / compare: bad inputs


def test_eval_text_too_short(capsys, tmp_path, llama):
    text = tmp_path / "short.txt"
    text.write_text("the cat sat.")
    code, stdout, err = run_cli(capsys, "eval", llama, "--text", text, "--ctx", "64")
    assert_one_error(code, stdout, err, "fewer than one window")


def test_eval_missing_text(capsys, tmp_path, llama):
    code, stdout, err = run_cli(capsys, "eval", llama, "--text", tmp_path / "missing.txt")
    assert_one_error(code, stdout, err, "does not exist")


def test_compare_missing_model(capsys, tmp_path, llama, tiny_text):
    code, stdout, err = run_cli(capsys, "compare", llama, tmp_path / "nope", "--text", tiny_text, "--ctx", "32")
    assert_one_error(code, stdout, err, "does not exist")


# ----------------------------------------------------------------- a real process


def _subprocess(*argv, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([str(GRAPHQ), *map(str, argv)], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_subprocess_errors_have_no_traceback(tmp_path, corrupt_model):
    assert GRAPHQ.is_file(), f"{GRAPHQ} is not installed (pip install -e .)"
    out = tmp_path / "out"
    proc = _subprocess("quantize", corrupt_model, "-o", out, "--quiet", cwd=tmp_path)
    assert_one_error(proc.returncode, proc.stdout, proc.stderr, "not a readable ONNX model")
    assert_nothing_written(out)

    config = tmp_path / "bad.yaml"
    config.write_text("bits: 4\n")
    proc = _subprocess("quantize", corrupt_model, "-o", out, "--config", config, "--quiet", cwd=tmp_path)
    assert_one_error(proc.returncode, proc.stdout, proc.stderr, "unknown config key", "bits")
    assert_nothing_written(out)


# ----------------------------------------------------------------- happy path


def test_config_file_with_override_then_eval_and_compare(capsys, tmp_path, llama, tiny_text):
    config = tmp_path / "quant.yaml"
    config.write_text("scheme: w4a16\ngroup-size: 64\nsymmetric: true\nformat: qdq\nexclude: ['*.down_proj']\n")
    out = tmp_path / "w4"
    code, stdout, err = run_cli(capsys, "quantize", llama, "-o", out, "--config", config, "--group-size", "32", "--quiet")
    assert code == 0, err
    assert "Traceback" not in err and "graphq: error" not in err
    assert stdout.strip() == str(out / "model.onnx")
    report = json.loads((out / "report.json").read_text())
    # From the file: scheme, symmetric, format, exclude. From the command line: group size 32 (file said 64).
    assert report["config"]["group_size"] == 32
    assert report["config"]["format"] == "qdq" and report["config"]["symmetric"] is True
    assert report["config"]["exclude"] == ["*.down_proj"]
    entries = {e["name"]: e for e in report["layers"]}
    assert entries["model.layers.0.self_attn.q_proj"]["group_size"] == 32
    assert "skipped" in entries["model.layers.1.mlp.down_proj"]
    assert report["layers_quantized"] == 12

    args = ["--text", tiny_text, "--ctx", "64", "--max-tokens", "256", "--threads", "1", "--json"]
    code, stdout, err = run_cli(capsys, "eval", out, *args)
    assert code == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert set(result) >= {"ppl", "tokens"}
    assert result["tokens"] == 256
    # A random 96-token model: perplexity near the vocabulary size, never below 1 or infinite.
    assert 1.0 < result["ppl"] < 1000.0
    assert "perplexity" in stdout

    code, stdout, err = run_cli(capsys, "eval", llama, *args)
    assert code == 0, err
    float_ppl = json.loads(stdout.strip().splitlines()[-1])["ppl"]
    assert float_ppl != result["ppl"]  # the quantized model is a different model

    code, stdout, err = run_cli(capsys, "compare", out, out, *args)
    assert code == 0, err
    same = json.loads(stdout.strip().splitlines()[-1])
    assert abs(same["mean_kl"]) < 1e-9
    assert same["top1_agreement"] == 1.0
    assert same["mean_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert same["tokens"] == 4 * 65

    code, stdout, err = run_cli(capsys, "compare", llama, out, *args)
    assert code == 0, err
    different = json.loads(stdout.strip().splitlines()[-1])
    assert different["mean_kl"] > 1e-7 and different["mean_cosine"] < 1.0


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("graphq ")
