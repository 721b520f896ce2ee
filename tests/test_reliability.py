"""Hostile input, as a table: every row drives the CLI with one bad input and says what must come back.

Each row: the command line (built in a fresh folder, with the tiny models and a quantized model at hand), the exit
status, a phrase the one ``graphq: error:`` line must contain, and that the folder holding the output is left as it
was (no output, no ``.partial`` staging, no half-written file). A new flag gets a row here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from graphq.cli import main
from graphq.output_files import staging_prefix

REPO = Path(__file__).resolve().parent.parent
DEAD_PID = 999_999_999  # above any pid_max: never a running process
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cli import assert_one_error, error_lines  # noqa: E402


@dataclass
class Place:
    """What a row can use: a fresh folder (``work``) and inputs nobody may change."""

    work: Path
    llama: Path
    qwen2: Path
    text: Path
    w4: Path  # an RTN W4A16 quantization of llama, with its artifacts
    v80: Path  # a tiny llama with another vocabulary (80 tokens)
    hf: Path  # the Hugging Face folder llama was exported from

    def yaml(self, body: str) -> Path:
        path = self.work / "config.yaml"
        path.write_text(body)
        return path

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.work / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return path

    def copy(self, source: Path, name: str) -> Path:
        return Path(shutil.copytree(source, self.work / name))


@dataclass
class Row:
    argv: Callable[[Place], list]
    phrase: str
    code: int = 2


Q = "model.layers.0.self_attn.q_proj"


def damaged_artifacts(edit_tensors=None, edit_metadata=None):
    """A copy of the W4A16 output whose safetensors file was rewritten: tensors and/or metadata edited."""

    def build(p: Place) -> Path:
        from safetensors import safe_open
        from safetensors.numpy import save_file

        folder = p.copy(p.w4, "damaged")
        path = folder / "quant_model_weight_w4a16.safetensors"
        with safe_open(str(path), framework="numpy") as f:
            metadata, tensors = f.metadata(), {n: f.get_tensor(n).copy() for n in f.keys()}
        (edit_tensors or (lambda t: None))(tensors)
        (edit_metadata or (lambda m: None))(metadata)
        save_file(tensors, str(path), metadata=metadata)
        return folder

    return build


def truncated_artifacts(p: Place) -> Path:
    """A copy of the W4A16 output whose safetensors file lost its last 40%: the header still parses."""
    folder = p.copy(p.w4, "truncated")
    path = folder / "quant_model_weight_w4a16.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])
    return folder


def set_nan(name: str, index=(0, 0)):
    def edit(tensors):
        tensors[name][index] = np.nan
    return edit


def nan_model(p: Place) -> Path:
    """A copy of the float export whose final norm weight holds a NaN: every logit is NaN."""
    import onnx
    from onnx import numpy_helper

    folder = p.work / "nan"
    folder.mkdir()
    model = onnx.load(str(p.llama / "model.onnx"))
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name == "model.norm.weight":
            array = numpy_helper.to_array(tensor).copy()
            array[0] = np.nan
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, tensor.name))
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    for side in p.llama.iterdir():
        if side.suffix == ".json":
            shutil.copy(side, folder / side.name)
    return folder


def export_copy(edit: Callable[[Path], None]):
    """A copy of the llama export, damaged by ``edit``."""

    def build(p: Place) -> Path:
        folder = p.copy(p.llama, "export")
        edit(folder)
        return folder

    return build


def hard_link_data(folder: Path) -> None:
    os.link(folder / "model.onnx.data", folder.parent / "linked.data")


def truncate(path: Path, size: int = 1000) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def pickle_only_folder(p: Place) -> Path:
    """The Hugging Face folder with its safetensors weights replaced by a (harmless) pickle."""
    import pickle

    folder = p.work / "hf-pickle"
    folder.mkdir()
    for side in p.hf.glob("*.json"):
        shutil.copy(side, folder / side.name)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"not": "weights"}))
    return folder


def symlink_loop(p: Place) -> Path:
    (p.work / "loop-a").symlink_to(p.work / "loop-b")
    (p.work / "loop-b").symlink_to(p.work / "loop-a")
    return p.work / "loop-a" / "out"


def calib_quantize(name: str, data: bytes | str, *extra):
    return lambda p: ["quantize", p.llama, "-o", p.work / "out", "--quiet", "--method", "gptq", "--seq-len", "16",
                      "--calib", p.file(name, data), *extra]


def with_file(p: Place, name: str, text: str) -> Path:
    """A copy of the W4A16 output with one file replaced by ``text``."""
    folder = p.copy(p.w4, "edited")
    (folder / name).write_text(text)
    return folder


def run_main(argv: list[str]) -> int:
    """The CLI in-process; argparse's usage errors exit through SystemExit, which a real process turns into a status."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def verify_html(target: Callable[[Place], Path], *extra):
    return lambda p: ["verify", p.llama, p.w4, "--text", p.text, "--ctx", "32", "--html", target(p), *extra]


def quantize_from(model: Path, *extra) -> list:
    return ["quantize", model, "-o", model.parent / "out", "--quiet", *extra]


def quantize(*extra):
    return lambda p: ["quantize", p.llama, "-o", p.work / "out", "--quiet", *extra]


def quantize_yaml(body: str):
    return lambda p: ["quantize", p.llama, "-o", p.work / "out", "--quiet", "--config", p.yaml(body)]


ROWS: dict[str, Row] = {
    # --------------------------------------------------------------- config types and ranges (YAML and flags alike)
    "yaml-symmetric-string": Row(quantize_yaml('symmetric: "no"\n'), "'symmetric' must be true or false"),
    "yaml-lm-head-string": Row(quantize_yaml('quantize_lm_head: "false"\n'), "'quantize_lm_head' must be true or false"),
    "yaml-num-samples-word": Row(quantize_yaml('num_samples: "many"\n'), "'num_samples' must be an integer"),
    "yaml-scheme-list": Row(quantize_yaml("scheme: [w4a16]\n"), "'scheme' must be a string"),
    "yaml-exclude-int": Row(quantize_yaml("exclude: 5\n"), "'exclude' must be a list of strings"),
    "yaml-damp-string": Row(quantize_yaml('damp: "0.1"\n'), "'damp' must be a number"),
    "yaml-seed-float": Row(quantize_yaml("seed: 1.5\n"), "'seed' must be an integer"),
    "yaml-overrides-value": Row(quantize_yaml('scheme_overrides: {"*down_proj": 8}\n'), "'scheme_overrides' must be a mapping"),
    "yaml-part-file-size-inf": Row(quantize_yaml("part_file_size: .inf\n"), "'part_file_size' must be a finite number"),
    "seed-negative": Row(quantize("--seed", "-1"), "--seed (config key 'seed') must be an integer >= 0"),
    "part-file-size-inf": Row(quantize("--part-file-size", "inf"), "'part_file_size' must be a finite number"),
    "part-file-size-nan": Row(quantize("--part-file-size", "nan"), "'part_file_size' must be a finite number"),
    "num-samples-zero": Row(quantize("--num-samples", "0"), "must be an integer >= 1"),
    # --------------------------------------------------------------- sensitivity-ranked precision
    "disable-level-negative": Row(quantize("--disable-level", "-1"), "--disable-level must be a count >= 0"),
    "fallback-scheme-unknown": Row(quantize("--disable-level", "2", "--fallback-scheme", "w9a9"),
                                   "unknown --fallback-scheme 'w9a9'"),
    "target-bits-below-base": Row(quantize("--target-bits", "3.0", "--sensitivity-windows", "1"),
                                  "the base scheme already takes"),
    "target-bits-w8a8": Row(quantize("--scheme", "w8a8", "--target-bits", "9"), "--target-bits mixes weight-only"),
    "sensitivity-file-missing": Row(quantize("--disable-level", "2", "--sensitivity", "/nonexistent/s.json"),
                                    "sensitivity file /nonexistent/s.json does not exist"),
    "sensitivity-file-garbage": Row(lambda p: ["quantize", p.llama, "-o", p.work / "out", "--quiet", "--disable-level",
                                               "1", "--sensitivity", p.file("s.json", "{}")],
                                    "is not a graphq sensitivity file"),
    "analyze-method-awq": Row(lambda p: ["analyze", p.llama, "-o", p.work / "s.json", "--quiet", "--calib", p.text,
                                         "--config", p.yaml("method: awq\n")], "analyze measures each linear under RTN"),
    "analyze-output-is-input": Row(lambda p: ["analyze", p.llama, "-o", p.llama / "model.onnx", "--quiet"],
                                   "is one of the inputs"),
    # --------------------------------------------------------------- W4A8 (int4 per-group weights, int8 activations)
    "w4a8-format-matmulnbits": Row(quantize("--scheme", "w4a8", "--format", "matmulnbits"), "is emitted as QDQ"),
    "w4a8-yaml-format-matmulnbits": Row(quantize_yaml("scheme: w4a8-dynamic\nformat: matmulnbits\n"),
                                        "is emitted as QDQ"),
    "w4a8-pruning-method": Row(quantize("--scheme", "w4a8", "--method", "wanda", "--sparsity", "0.5"), "does not prune"),
    "w4a8-group-does-not-divide": Row(quantize("--scheme", "w4a8-dynamic", "--group-size", "64", "--seq-len", "32",
                                               "--target", "vllm-ascend"),
                                      "which group size 64 does not divide"),
    "w4a8-group-not-power-of-two": Row(quantize("--scheme", "w4a8", "--group-size", "48"), "group size 48 is not supported"),
    "w4a8-target-gguf": Row(quantize("--scheme", "w4a8-dynamic", "--group-size", "32", "--target", "gguf",
                                     "--seq-len", "32"), "--target gguf has no layout for w4a8-dynamic"),
    "w4a8-static-vllm-ascend": Row(quantize("--scheme", "w4a8", "--group-size", "32", "--target", "vllm-ascend",
                                            "--seq-len", "32"), "no static W4A8 linear"),
    "w4a8-smooth-alpha-word": Row(quantize("--scheme", "w4a8", "--smooth", "smoothquant", "--smooth-alpha", "big"),
                                  "--smooth-alpha must be a number in [0, 1] or 'auto'"),
    # --------------------------------------------------------------- verify --html never destroys a file
    "html-onto-quant-model": Row(verify_html(lambda p: p.w4 / "model.onnx", "--overwrite"), "is one of the inputs"),
    "html-onto-float-data": Row(verify_html(lambda p: p.llama / "model.onnx.data", "--overwrite"), "is one of the inputs"),
    "html-onto-text": Row(lambda p: ["verify", p.llama, p.w4, "--text", p.file("eval.txt", p.text.read_text()),
                                     "--ctx", "32", "--html", p.work / "eval.txt", "--overwrite"], "is one of the inputs"),
    "html-existing-file": Row(verify_html(lambda p: p.file("mine.html", "<p>mine</p>")), "already exists"),
    "html-folder": Row(verify_html(lambda p: p.work), "is a folder"),
    "html-under-a-file": Row(verify_html(lambda p: p.file("plain", "x") / "report.html"), "which is a file"),
    # --------------------------------------------------------------- artifacts that cannot run are refused
    "artifacts-group-size-disagrees": Row(
        lambda p: ["load-artifacts", damaged_artifacts(edit_metadata=lambda m: m.update(group_size="64"))(p),
                   "-o", p.work / "out"], f"{Q}.weight_scale has 2 groups"),
    "artifacts-nan-scale": Row(
        lambda p: ["load-artifacts", damaged_artifacts(set_nan(f"{Q}.weight_scale"))(p), "-o", p.work / "out"],
        f"{Q}.weight_scale holds 1 NaN or infinite"),
    "artifacts-inf-offset": Row(
        lambda p: ["load-artifacts", damaged_artifacts(set_nan(f"{Q}.weight_offset", (1, 1)))(p), "-o", p.work / "out"],
        f"{Q}.weight_offset holds 1 NaN or infinite"),
    "artifacts-nan-float-tensor": Row(
        lambda p: ["load-artifacts", damaged_artifacts(set_nan("model.norm.weight", 3))(p), "-o", p.work / "out"],
        "model.norm.weight holds 1 NaN"),
    "eval-nan-model": Row(lambda p: ["eval", nan_model(p), "--text", p.text, "--ctx", "32", "--max-tokens", "64"],
                          "perplexity is not finite"),
    "compare-nan-model": Row(lambda p: ["compare", p.llama, nan_model(p), "--text", p.text, "--ctx", "32",
                                        "--max-tokens", "64"], "mean kl and logit cosine is not finite"),
    # --------------------------------------------------------------- a truncated safetensors file is not healthy
    "inspect-truncated-safetensors": Row(lambda p: ["inspect", truncated_artifacts(p)], "is truncated"),
    "load-truncated-safetensors": Row(lambda p: ["load-artifacts", truncated_artifacts(p), "-o", p.work / "out"],
                                      "is truncated"),
    # --------------------------------------------------------------- missing or truncated model.onnx.data
    "quantize-missing-data": Row(lambda p: quantize_from(export_copy(lambda f: (f / "model.onnx.data").unlink())(p)),
                                 "model.onnx.data, which is missing"),
    "quantize-truncated-data": Row(lambda p: quantize_from(export_copy(lambda f: truncate(f / "model.onnx.data"))(p)),
                                   "model.onnx.data is truncated"),
    "inspect-missing-data": Row(lambda p: ["inspect", export_copy(lambda f: (f / "model.onnx.data").unlink())(p)],
                                "which is missing"),
    "inspect-truncated-data": Row(lambda p: ["inspect", export_copy(lambda f: truncate(f / "model.onnx.data"))(p)],
                                  "is truncated"),
    # onnx refuses to read external data with several hard links (cp -l copies); said up front, not mid-verify
    "verify-hardlinked-data": Row(lambda p: ["verify", p.llama, export_copy(hard_link_data)(p), "--text", p.text,
                                             "--ctx", "32"], "has 2 hard links"),
    "quantize-hardlinked-data": Row(lambda p: quantize_from(export_copy(hard_link_data)(p)), "has 2 hard links"),
    # --------------------------------------------------------------- models that do not belong together
    "verify-swapped": Row(lambda p: ["verify", p.w4, p.llama, "--text", p.text, "--ctx", "32"], "look swapped"),
    "verify-quant-of-another-export": Row(lambda p: ["verify", p.qwen2, p.w4, "--text", p.text, "--ctx", "32"],
                                          "was not quantized from"),
    "verify-other-vocabulary": Row(lambda p: ["verify", p.v80, p.w4, "--text", p.text, "--ctx", "32"],
                                   "not a quantization of this float model"),
    "compare-other-vocabulary": Row(lambda p: ["compare", p.llama, p.v80, "--text", p.text, "--ctx", "32"],
                                    "vocabulary of 96 tokens but"),
    # --------------------------------------------------------------- windows beyond the model's context (256)
    "eval-ctx-beyond-context": Row(lambda p: ["eval", p.llama, "--text", p.text, "--ctx", "256"], "use --ctx 255 or less"),
    "compare-ctx-beyond-context": Row(lambda p: ["compare", p.llama, p.w4, "--text", p.text], "use --ctx 255 or less"),
    "verify-ctx-beyond-context": Row(lambda p: ["verify", p.llama, p.w4, "--text", p.text, "--ctx", "300"],
                                     "use --ctx 255 or less"),
    # --------------------------------------------------------------- output paths that cannot be written
    "output-under-a-file": Row(lambda p: ["quantize", p.llama, "-o", p.file("plain", "x") / "out", "--quiet"],
                               "which is a file"),
    "output-is-a-file": Row(lambda p: ["quantize", p.llama, "-o", p.file("plain", "x"), "--quiet", "--overwrite"],
                            "is a file"),
    "output-symlink-loop": Row(lambda p: ["quantize", p.llama, "-o", symlink_loop(p), "--quiet"], "cannot be resolved"),
    "overwrite-folder-holding-calib": Row(
        lambda p: ["quantize", p.llama, "-o", p.work, "--quiet", "--overwrite", "--method", "gptq", "--seq-len", "16",
                   "--calib", p.file("calib.jsonl", '{"text": "the cat sat"}\n')], "would overwrite the input"),
    "overwrite-folder-holding-config": Row(
        lambda p: ["quantize", p.llama, "-o", p.work, "--quiet", "--overwrite", "--config", p.yaml("scheme: w4a16\n")],
        "would overwrite the input"),
    # --------------------------------------------------------------- calibration files
    "calib-not-utf8": Row(calib_quantize("calib.json", b'[{"text": "\xff\xfe caf\xe9"}]'), "is not UTF-8"),
    "calib-json-not-a-list": Row(calib_quantize("calib.json", "42"), "holds a JSON int, not a list of records"),
    "calib-json-string": Row(calib_quantize("calib.json", '"just a text"'), "holds a JSON str"),
    "calib-jsonl-bad-line-4": Row(calib_quantize("calib.jsonl", '{"text": "a"}\n\n{"text": "b"}\n{oops\n'), "line 4"),
    "calib-mostly-unusable": Row(calib_quantize("calib.jsonl", '{"text": "a b"}\n{"body": 1}\n{"body": 2}\n'),
                                 "only 1 of 3 records are usable"),
    # --------------------------------------------------------------- inputs checked before the work
    "input-config-json-invalid": Row(
        lambda p: quantize_from(export_copy(lambda f: (f / "config.json").write_text("{oops"))(p)), "is not valid JSON"),
    "already-quantized": Row(lambda p: ["quantize", p.w4, "-o", p.work / "out", "--quiet"], "is already quantized"),
    # --------------------------------------------------------------- export
    "export-opset-999": Row(lambda p: ["export", p.hf, "-o", p.work / "out", "--opset", "999"],
                            "--opset 999 is not supported"),
    "export-pickle-only": Row(lambda p: ["export", pickle_only_folder(p), "-o", p.work / "out"],
                              "pytorch_model.bin"),
    "export-an-onnx-export": Row(lambda p: ["export", p.llama, "-o", p.work / "out"], "is already an ONNX export"),
    # --------------------------------------------------------------- damaged side files and odd values
    "eval-text-not-a-file": Row(lambda p: ["eval", p.llama, "--text", "/dev/null", "--ctx", "32"], "is not a regular file"),
    "yaml-non-string-key": Row(quantize_yaml("1: 2\n"), "unknown config key(s) 1"),
    "load-artifacts-report-not-json": Row(
        lambda p: ["load-artifacts", with_file(p, "report.json", "{bad"), "-o", p.work / "out"], "report.json is not valid JSON"),
    "verify-report-not-json": Row(
        lambda p: ["verify", p.llama, with_file(p, "report.json", "[1, 2]"), "--text", p.text, "--ctx", "32"],
        "report.json holds a JSON list"),
    "inspect-index-not-a-map": Row(
        lambda p: ["inspect", with_file(p, "quant_model_weight_w4a16.safetensors.index.json", '{"weight_map": [1]}')],
        "is not a safetensors index"),
    "calib-is-a-folder": Row(lambda p: ["quantize", p.llama, "-o", p.work / "out", "--quiet", "--method", "gptq",
                                        "--seq-len", "16", "--calib", p.work], "is a folder"),
    "output-name-too-long": Row(lambda p: ["quantize", p.llama, "-o", p.work / ("o" * 300), "--quiet"], "name too long"),
    "html-name-too-long": Row(verify_html(lambda p: p.work / ("r" * 300 + ".html")), "name too long"),
    "text-name-too-long": Row(lambda p: ["eval", p.llama, "--text", p.work / ("t" * 300)], "name too long"),
    # --------------------------------------------------------------- usage errors are one line too
    "worst-negative": Row(lambda p: ["verify", p.llama, p.w4, "--text", p.text, "--worst", "-1"], "--worst: must be a count"),
    "threads-not-a-number": Row(lambda p: ["eval", p.llama, "--text", p.text, "--threads", "x"], "--threads"),
    "group-size-not-a-number": Row(quantize("--group-size", "abc"), "invalid int value: 'abc'"),
    "missing-output": Row(lambda p: ["quantize", p.llama], "required: -o/--output"),
    # --------------------------------------------------------------- issue 12: kd settings, device, plan files
    "kd-not-key-value": Row(quantize("--method", "kd", "--kd", "epochs"), "expected KEY=VALUE"),
    "kd-unknown-key": Row(quantize("--method", "kd", "--kd", "epochs=2"), "unknown kd key(s) epochs"),
    "kd-word-for-number": Row(quantize("--method", "kd", "--kd", "learning_rate=fast"), "'kd.learning_rate' must be a number"),
    "kd-yaml-not-a-map": Row(quantize_yaml("method: kd\nkd: [1]\n"), "'kd' must be a mapping"),
    "kd-after-gptq": Row(quantize("--method", "gptq+kd"), "kd comes last"),
    "kd-activation-scheme": Row(quantize("--method", "kd", "--scheme", "w8a8"), "weight-only schemes"),
    "device-unknown": Row(quantize("--method", "kd", "--device", "npu"), "unknown --device 'npu'"),
    "plan-missing": Row(lambda p: ["quantize", p.llama, "-o", p.work / "out", "--quiet", "--plan", p.work / "none.json"],
                        "plan file"),
    "plan-not-json": Row(lambda p: ["quantize", p.llama, "-o", p.work / "out", "--quiet", "--plan", p.file("plan.json", "{")],
                         "is not valid JSON"),
    "plan-unknown-tensor": Row(lambda p: ["quantize", p.llama, "-o", p.work / "out", "--quiet", "--plan", p.file(
        "plan.json", '{"layer_strategy": {"model.layers.7.mlp.up_proj": {"weight": {"bit": 4}}}}')], "names no tensor"),
    "plan-bits-5": Row(lambda p: ["quantize", p.llama, "-o", p.work / "out", "--quiet", "--plan", p.file(
        "plan.json", '{"layer_strategy": {"model.layers.0.mlp.up_proj": {"weight": {"bit": 5}}}}')], "weight bit 5"),
    "plan-output-exists": Row(lambda p: ["plan", p.llama, "-o", p.file("plan.json", "{}")], "exists"),
}


@pytest.fixture(scope="module")
def inputs(tiny_models, tiny_text, tmp_path_factory) -> dict[str, Path]:
    from graphq.config import QuantConfig
    from graphq.quantize import quantize as run_quantize

    from conftest import build_tiny_model
    from graphq.export import export

    root = tmp_path_factory.mktemp("reliability")
    w4 = root / "w4"
    run_quantize(tiny_models["llama"]["onnx"], QuantConfig(scheme="w4a16", group_size=32), w4, progress=False)
    export(build_tiny_model("llama", root / "v80-hf", vocab_size=80), root / "v80")
    return {"llama": tiny_models["llama"]["onnx"], "qwen2": tiny_models["qwen2"]["onnx"], "text": tiny_text, "w4": w4,
            "v80": root / "v80", "hf": tiny_models["llama"]["hf"]}


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) -> sha256: what a row must leave unchanged."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("case", list(ROWS))
def test_bad_input_is_one_line_and_leaves_nothing(case, inputs, tmp_path, capsys):
    row = ROWS[case]
    place = Place(work=tmp_path, **inputs)
    argv = [str(a) for a in row.argv(place)]
    protected = {name: tree_digest(inputs[name]) for name in ("llama", "qwen2", "w4", "v80", "hf")}
    before = tree_digest(tmp_path)
    capsys.readouterr()
    code = run_main(argv)
    captured = capsys.readouterr()
    assert code == row.code, captured.err
    assert_one_error(code, captured.out, captured.err, row.phrase)
    assert tree_digest(tmp_path) == before, "the row left something behind (or changed an input in its folder)"
    assert {name: tree_digest(inputs[name]) for name in protected} == protected, "an input was modified"


# ------------------------------------------------------------------- usable input with a warning


def input_warnings(err: str) -> list[str]:
    """The warning lines about the input (the mindie target's note that it serves fp16/bf16 is about the output)."""
    return [line for line in error_lines(err)
            if line.startswith("graphq: warning:") and "serves fp16 or bf16" not in line]


def test_exclude_pattern_that_matches_nothing_is_named(inputs, tmp_path, capsys):
    capsys.readouterr()
    code = main(["quantize", str(inputs["llama"]), "-o", str(tmp_path / "out"), "--quiet",
                 "--exclude", "*.down_proj", "layers.9.*"])
    err = capsys.readouterr().err
    assert code == 0, err
    warnings = input_warnings(err)
    assert len(warnings) == 1 and "'layers.9.*'" in warnings[0] and "down_proj" not in warnings[0], warnings
    assert json.loads((tmp_path / "out" / "report.json").read_text())["layers_quantized"] == 12


def test_scheme_override_pattern_that_matches_nothing_is_named(inputs, tmp_path, capsys):
    config = tmp_path / "mixed.yaml"
    config.write_text('scheme_overrides: {"*down_proj": w8a16, "*.no_such_proj": w8a16}\n')
    capsys.readouterr()
    code = main(["quantize", str(inputs["llama"]), "-o", str(tmp_path / "out"), "--quiet", "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 0, err
    warnings = input_warnings(err)
    assert len(warnings) == 1 and "scheme_overrides pattern(s) '*.no_such_proj'" in warnings[0], warnings


def test_fewer_calibration_records_than_num_samples_are_counted(inputs, tmp_path, capsys):
    calib = tmp_path / "calib.jsonl"
    records = [{"text": "the cat sat on the mat"}, {"text": 5}, {"text": "and then it ran far away"}, {"text": "home"}]
    calib.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    capsys.readouterr()
    code = main(["quantize", str(inputs["llama"]), "-o", str(tmp_path / "out"), "--quiet", "--method", "gptq",
                 "--calib", str(calib), "--num-samples", "10", "--seq-len", "16"])
    err = capsys.readouterr().err
    assert code == 0, err
    warnings = input_warnings(err)
    assert any("skipped 1 of 4 records (1 text not a string)" in w for w in warnings), warnings
    assert any("gives 3 samples, fewer than --num-samples 10" in w for w in warnings), warnings
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["calibration_samples"] == 3 and report["config"]["num_samples"] == 10


def test_truncated_numpy_artifact_is_one_error_after_the_pickle_warning(inputs, tmp_path, capsys):
    from graphq.config import QuantConfig
    from graphq.quantize import quantize as run_quantize

    config = QuantConfig(scheme="w4a16", group_size=32, save_format=["safetensors", "numpy"])
    out = run_quantize(inputs["llama"], config, tmp_path / "np", progress=False).output_dir
    truncate(out / "quant_model_weight_w4a16.float.npy", 500)
    capsys.readouterr()
    with pytest.warns(UserWarning, match="pickle"):
        code = main(["load-artifacts", str(out), "-o", str(tmp_path / "rebuilt"), "--numpy", "--float", str(inputs["llama"])])
    lines = error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 2 and lines[0].startswith("graphq: warning:"), lines
    assert lines[1].startswith("graphq: error: quant_model_weight_w4a16.float.npy is not a readable numpy artifact")
    assert not (tmp_path / "rebuilt").exists() and not list(tmp_path.glob(".rebuilt*"))


# ------------------------------------------------------------------- write errors are one line, nothing left


def test_full_disk_is_one_line_and_leaves_nothing(inputs, tmp_path, capsys, monkeypatch):
    import errno

    import graphq.model_io

    def disk_full(model, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(graphq.model_io, "save_model", disk_full)  # the first stage's checkpoint cannot be written
    capsys.readouterr()
    code = main(["quantize", str(inputs["llama"]), "-o", str(tmp_path / "out"), "--quiet"])
    assert_one_error(code, *capsys.readouterr(), "No space left on device", "nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_in_the_export_keeps_the_finished_stages(inputs, tmp_path, capsys, monkeypatch):
    import errno
    import importlib

    quantize_module = importlib.import_module("graphq.quantize")

    def disk_full(model, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(quantize_module, "save_model", disk_full)  # the export's model.onnx
        capsys.readouterr()
        code = main(["quantize", str(inputs["llama"]), "-o", str(out), "--quiet"])
    assert_one_error(code, *capsys.readouterr(), "No space left on device", f"{out} is as it was")
    assert list(tmp_path.iterdir()) == [out] and [p.name for p in out.iterdir()] == ["stages"]
    assert main(["quantize", str(inputs["llama"]), "-o", str(out), "--quiet"]) == 0  # resumes: the export alone
    assert (out / "model.onnx").is_file() and (out / "report.json").is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_is_refused_before_the_work(inputs, tmp_path, capsys):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        capsys.readouterr()
        code = main(["quantize", str(inputs["llama"]), "-o", str(parent / "out"), "--quiet"])
        assert_one_error(code, *capsys.readouterr(), "is not writable")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


# ------------------------------------------------------------------- verify --html: replaced only when asked


def test_verify_html_replaces_a_file_only_with_overwrite(inputs, tmp_path, capsys):
    report = tmp_path / "report.html"
    report.write_text("<p>an older report</p>")
    argv = ["verify", inputs["llama"], inputs["w4"], "--text", inputs["text"], "--ctx", "32", "--max-tokens", "64",
            "--html", report]
    code = main([str(a) for a in argv])
    assert_one_error(code, *capsys.readouterr(), "already exists", "--overwrite")
    assert report.read_text() == "<p>an older report</p>"

    code = main([str(a) for a in argv] + ["--overwrite"])
    assert code == 0, capsys.readouterr().err
    assert report.read_text().lstrip().lower().startswith("<!doctype html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temporary file left beside it


# ------------------------------------------------------------------- interrupted runs: SIGTERM and kill -9

# Runs the CLI with RTN made to hang, so that the test can signal the process while it holds a staging folder.
_HANGING_QUANTIZE = """
import importlib, sys, time
quantize = importlib.import_module("graphq.quantize")
quantize.data_free_quantize = lambda *args, **kwargs: time.sleep(120)
from graphq.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start_hanging_quantize(model: Path, output: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    return subprocess.Popen(
        [sys.executable, "-c", _HANGING_QUANTIZE, "quantize", str(model), "-o", str(output), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=output.parent,
    )


def _wait_for_staging(proc: subprocess.Popen, output: Path, timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        staging = list(output.parent.glob(f"{staging_prefix(output, proc.pid)}*.partial"))
        if staging:
            return staging[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the quantize never created its staging folder")


def test_sigterm_cleans_up_and_exits_143(inputs, tmp_path, capsys):
    output = tmp_path / "out"
    proc = _start_hanging_quantize(inputs["llama"], output)
    _wait_for_staging(proc, output)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert error_lines(stderr) == ["graphq: terminated (SIGTERM); nothing was written"]
    assert list(tmp_path.iterdir()) == [], "SIGTERM left the staging folder behind"
    assert main(["quantize", str(inputs["llama"]), "-o", str(output), "--quiet"]) == 0, capsys.readouterr().err
    assert (output / "model.onnx").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_next_run_removes_the_staging_of_a_killed_run(inputs, tmp_path, capsys):
    output = tmp_path / "out"
    proc = _start_hanging_quantize(inputs["llama"], output)
    staging = _wait_for_staging(proc, output)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)  # reaps it: a zombie would still count as running
    assert staging.is_dir()  # kill -9 runs no cleanup: the next run must do it

    # A live process's staging for the same output is not touched.
    live = tmp_path / f"{staging_prefix(output)}live.partial"
    live.mkdir()
    capsys.readouterr()
    code = main(["quantize", str(inputs["llama"]), "-o", str(output), "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"removed {staging.name}" in err and f"process {proc.pid}" in err
    assert not staging.exists() and live.is_dir()
    assert (output / "model.onnx").is_file() and json.loads((output / "report.json").read_text())["layers_quantized"] == 14
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "out"]


def test_a_killed_replace_gets_the_previous_output_back(inputs, tmp_path, capsys):
    """Killed between moving the old output aside and moving the new one in: the old one is restored."""
    output = tmp_path / "out"
    previous = tmp_path / f"{staging_prefix(output, DEAD_PID)}x.old" / "previous"
    previous.mkdir(parents=True)
    (previous / "model.onnx").write_text("the previous output")
    capsys.readouterr()
    code = main(["quantize", str(inputs["llama"]), "-o", str(output), "--quiet"])
    lines = error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 2, lines
    assert lines[0].startswith(f"graphq: restored {output} from {previous.parent.name}")
    assert lines[1].startswith("graphq: error: ") and "already exists" in lines[1]  # restored, so not replaced
    assert (output / "model.onnx").read_text() == "the previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------- reproducible outputs


def test_two_rtn_runs_write_identical_files(inputs, tmp_path):
    from graphq.config import QuantConfig
    from graphq.quantize import quantize as run_quantize

    digests, reports = [], []
    for run in ("a", "b"):
        config = QuantConfig(scheme="w4a16", group_size=32, part_file_size=0.00003)  # sharded: index and shards too
        out = run_quantize(inputs["llama"], config, tmp_path / run, progress=False).output_dir
        digests.append({k: v for k, v in tree_digest(out).items()
                        if k != "report.json" and not k.endswith("/timing.json")})  # the checkpoints' times
        report = json.loads((out / "report.json").read_text())
        for timing in ("elapsed_seconds", "stage_seconds", "peak_rss_bytes"):
            report.pop(timing)
        reports.append(report)
    assert len(digests[0]) >= 8 and any(name.endswith(".safetensors") for name in digests[0])
    assert digests[0] == digests[1]
    assert reports[0] == reports[1]


# ------------------------------------------------------------------- the schema follows the annotations


def test_schema_checks_any_annotated_field():
    """A field added to the dataclass is checked from its annotation alone, with lossless conversions only."""
    from dataclasses import dataclass, field

    from graphq.config_schema import check_config
    from graphq.errors import GraphqError

    @dataclass
    class Options:
        flag: bool = False
        ratio: float = 0.5
        names: list[str] = field(default_factory=list)
        limit: int | None = None
        table: dict[str, int] = field(default_factory=dict)

    converted = Options(ratio=2, names="only", limit=None, table={"a": 1})
    check_config(converted)
    assert converted.ratio == 2.0 and isinstance(converted.ratio, float) and converted.names == ["only"]
    for bad, phrase in [
        (Options(flag="false"), "'flag' must be true or false"),
        (Options(flag=1), "'flag' must be true or false"),
        (Options(ratio=True), "'ratio' must be a number"),
        (Options(ratio=float("nan")), "'ratio' must be a finite number"),
        (Options(names=["a", 3]), "'names' must be a list of strings"),
        (Options(limit=2.5), "'limit' must be an integer"),
        (Options(limit=True), "'limit' must be an integer"),
        (Options(table={"a": "1"}), "'table' must be a mapping of string to integer"),
    ]:
        with pytest.raises(GraphqError, match=phrase):
            check_config(bad)


def test_html_left_half_written_by_a_dead_process_is_removed(inputs, tmp_path, capsys):
    report = tmp_path / "report.html"
    stale = tmp_path / f"{staging_prefix(report, DEAD_PID)}abc.partial"
    stale.write_text("<html>half")
    capsys.readouterr()
    code = main(["verify", str(inputs["llama"]), str(inputs["w4"]), "--text", str(inputs["text"]), "--ctx", "32",
                 "--max-tokens", "64", "--html", str(report)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"removed {stale.name}, left unfinished by process {DEAD_PID}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_staging_of_another_host_is_left_alone(inputs, tmp_path, capsys):
    """A PID names a process only on the machine that wrote it: another host's staging on a shared disk stays."""
    foreign = tmp_path / f".out.pid{DEAD_PID}-00000000.x.partial"
    foreign.mkdir()
    capsys.readouterr()
    assert main(["quantize", str(inputs["llama"]), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    assert "removed" not in capsys.readouterr().err and foreign.is_dir()


def test_constants_kept_in_external_data_are_read_into_the_graph(inputs, tmp_path):
    """onnx saves the Constant nodes' tensors of a model over 2 GB in its data file too (optimum's model.onnx_data).
    graphq's calibration slices are sessions built from bytes, where that relative reference cannot resolve; the
    loader reads them into the graph, and `graphq export` leaves no second data file behind."""
    import onnx

    from graphq.config import QuantConfig
    from graphq.export import move_weights_to_external_data
    from graphq.quantize import quantize as run_quantize

    folder = tmp_path / "big-style"
    folder.mkdir()
    model = onnx.load(str(inputs["llama"] / "model.onnx"))
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=0, convert_attribute=True)
    saved = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    external = [n for n in saved.graph.node for a in n.attribute if a.t.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "the setup must put Constant tensors in the data file"
    for side in inputs["llama"].iterdir():
        if side.suffix == ".json":
            shutil.copy(side, folder / side.name)
    config = QuantConfig(method="awq", group_size=32, calib=str(inputs["text"]), num_samples=2, seq_len=16)
    run_quantize(folder, config, tmp_path / "q", progress=False)  # slices with those constants run
    move_weights_to_external_data(folder / "model.onnx")  # what export does after optimum
    assert sorted(p.name for p in folder.glob("model.onnx*")) == ["model.onnx", "model.onnx.data"]
    run_quantize(folder, config, tmp_path / "q2", progress=False)
