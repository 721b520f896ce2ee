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

REPO = Path(__file__).resolve().parent.parent
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
}


@pytest.fixture(scope="module")
def inputs(tiny_models, tiny_text, tmp_path_factory) -> dict[str, Path]:
    from graphq.config import QuantConfig
    from graphq.quantize import quantize as run_quantize

    w4 = tmp_path_factory.mktemp("reliability") / "w4"
    run_quantize(tiny_models["llama"]["onnx"], QuantConfig(scheme="w4a16", group_size=32), w4, progress=False)
    return {"llama": tiny_models["llama"]["onnx"], "qwen2": tiny_models["qwen2"]["onnx"], "text": tiny_text, "w4": w4}


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
    protected = {name: tree_digest(inputs[name]) for name in ("llama", "qwen2", "w4")}
    before = tree_digest(tmp_path)
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    assert_one_error(code, captured.out, captured.err, row.phrase) if row.code == 2 else None
    assert code == row.code, captured.err
    assert tree_digest(tmp_path) == before, "the row left something behind (or changed an input in its folder)"
    assert {name: tree_digest(inputs[name]) for name in protected} == protected, "an input was modified"
