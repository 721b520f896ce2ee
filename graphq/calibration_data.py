"""Calibration samples: token sequences drawn reproducibly from text, JSON or JSONL files, or given strings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from graphq.errors import GraphqError
from graphq.evaluate import bos_token_id, read_text

DEFAULT_CALIBRATION_FILE = Path(__file__).resolve().parent.parent / "samples" / "calibration_sense_and_sensibility.txt"


def _records_from_json(path: Path, text_field: str) -> list[str]:
    raw = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in raw.splitlines() if line.strip()]
        else:
            records = json.loads(raw)
            if isinstance(records, dict):
                records = records.get("data", records.get("records", [records]))
    except json.JSONDecodeError as exc:
        raise GraphqError(f"calibration file {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    texts = []
    for record in records:
        if isinstance(record, str):
            texts.append(record)
        elif isinstance(record, dict) and text_field in record:
            texts.append(str(record[text_field]))
        elif isinstance(record, dict) and "src" in record:
            texts.append(str(record["src"]) + ("\n" + str(record["tgt"]) if "tgt" in record else ""))
    if records and not texts:
        raise GraphqError(
            f"calibration file {path} has no '{text_field}' (or 'src'/'tgt') field in its records: "
            "name the field with --calib-field"
        )
    return [t for t in texts if t.strip()]


def calibration_samples(
    tokenizer,
    path: str | Path | None = None,
    texts: list[str] | None = None,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    text_field: str = "text",
    max_context: int | None = None,
) -> list[np.ndarray]:
    """Up to ``num_samples`` int64 token sequences of at most ``seq_len`` tokens, BOS first.

    Plain text is reflowed and cut into random windows of ``seq_len`` tokens; JSON/JSONL records (field ``text``, or
    ``src`` + ``tgt``) and given strings are one sample each, truncated. The choice depends only on ``seed``.
    """
    if num_samples < 1:
        raise GraphqError(f"--num-samples must be at least 1, got {num_samples}")
    if seq_len < 2:
        raise GraphqError(f"--seq-len must be at least 2, got {seq_len}")
    if max_context is not None and seq_len > max_context:
        raise GraphqError(f"--seq-len {seq_len} is longer than the model's context of {max_context} tokens")
    rng = np.random.default_rng(seed)
    bos = bos_token_id(tokenizer)
    if texts is None:
        path = Path(path) if path is not None else DEFAULT_CALIBRATION_FILE
        if not path.is_file():
            raise GraphqError(f"calibration file {path} does not exist")
        if path.suffix in (".json", ".jsonl"):
            texts = _records_from_json(path, text_field)
        else:
            return _windows_from_text(tokenizer, read_text(path), num_samples, seq_len, rng, bos, path)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise GraphqError("the calibration data has no usable records (all empty)")
    order = rng.permutation(len(texts))[:num_samples]
    samples = []
    for index in sorted(order):
        ids = tokenizer(texts[index], add_special_tokens=False)["input_ids"][: seq_len - 1]
        if ids:
            samples.append(np.asarray([bos, *ids], dtype=np.int64))
    if not samples:
        raise GraphqError("the calibration data has no usable records (no tokens)")
    return samples


def _windows_from_text(tokenizer, text: str, num_samples: int, seq_len: int, rng, bos: int, path: Path) -> list[np.ndarray]:
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    window = seq_len - 1
    if len(ids) < window:
        raise GraphqError(
            f"calibration file {path} has {len(ids)} tokens, fewer than one sample of --seq-len {seq_len}"
        )
    starts = np.sort(rng.choice(len(ids) - window + 1, size=min(num_samples, len(ids) - window + 1), replace=False))
    return [np.concatenate([[bos], ids[start : start + window]]) for start in starts]
