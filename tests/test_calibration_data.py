"""Calibration samples from text, JSON and JSONL files: seeded, bounded, and clear about bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from graphq import GraphqError
from graphq.calibration_data import DEFAULT_CALIBRATION_FILE, calibration_samples
from graphq.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return load_tokenizer(tiny_models["llama"]["onnx"])


def test_text_windows_are_seeded_and_bounded(tokenizer, tiny_text):
    first = calibration_samples(tokenizer, tiny_text, num_samples=5, seq_len=40, seed=3)
    again = calibration_samples(tokenizer, tiny_text, num_samples=5, seq_len=40, seed=3)
    other = calibration_samples(tokenizer, tiny_text, num_samples=5, seq_len=40, seed=4)
    assert len(first) == 5 and all(len(s) == 40 and s[0] == tokenizer.bos_token_id for s in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_json_jsonl_and_src_tgt_records(tokenizer, tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "the cat sat"}, {"text": "on a mat"}]))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"src": "say hi", "tgt": "hi"}) for _ in range(3)))
    (tmp_path / "c.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    from_json = calibration_samples(tokenizer, tmp_path / "a.json", num_samples=10, seq_len=64)
    assert len(from_json) == 2
    assert sorted(tokenizer.decode(s[1:]).replace(" ", "") for s in from_json) == ["onamat", "thecatsat"]
    from_jsonl = calibration_samples(tokenizer, tmp_path / "b.jsonl", num_samples=2, seq_len=64)
    assert len(from_jsonl) == 2 and tokenizer.decode(from_jsonl[0][1:]).replace(" ", "").startswith("sayhi")
    truncated = calibration_samples(tokenizer, texts=["a long line " * 20], num_samples=1, seq_len=10)
    assert len(truncated[0]) == 10
    with pytest.raises(GraphqError, match="no 'text'"):
        calibration_samples(tokenizer, tmp_path / "c.jsonl")
    custom = calibration_samples(tokenizer, tmp_path / "c.jsonl", text_field="prompt", seq_len=8)
    assert len(custom) == 1


def test_bad_calibration_input_is_refused(tokenizer, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(GraphqError, match="does not exist"):
        calibration_samples(tokenizer, tmp_path / "missing.txt")
    with pytest.raises(GraphqError, match="no usable records"):
        calibration_samples(tokenizer, tmp_path / "empty.jsonl")
    with pytest.raises(GraphqError, match="not valid JSON"):
        calibration_samples(tokenizer, tmp_path / "broken.json")
    with pytest.raises(GraphqError, match="fewer than one sample"):
        calibration_samples(tokenizer, tmp_path / "short.txt", seq_len=64)
    with pytest.raises(GraphqError, match="longer than the model's context"):
        calibration_samples(tokenizer, texts=["x"], seq_len=300, max_context=256)


def test_default_sample_ships_with_the_project(tokenizer):
    assert DEFAULT_CALIBRATION_FILE.is_file() and DEFAULT_CALIBRATION_FILE.stat().st_size > 50_000
    samples = calibration_samples(tokenizer, num_samples=4, seq_len=128)
    assert len(samples) == 4 and all(len(s) == 128 for s in samples)
