"""Calibration samples: token sequences drawn reproducibly from text, JSON or JSONL files, or given strings."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from graphq.errors import GraphqError
from graphq.evaluate import bos_token_id, read_text

if TYPE_CHECKING:
    from graphq.config import QuantConfig

DEFAULT_CALIBRATION_FILE = Path(__file__).resolve().parent.parent / "samples" / "calibration_sense_and_sensibility.txt"


def _json_records(path: Path) -> list:
    """The records of a JSON file (a list, or an object holding one under "data"/"records") or a JSONL file."""
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise GraphqError(f"calibration file {path} is not UTF-8 text (byte {exc.start}): convert it to UTF-8") from exc
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise GraphqError(
                    f"calibration file {path} is not valid JSONL: line {number} ({exc.msg} at column {exc.colno})"
                ) from exc
        return records
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise GraphqError(f"calibration file {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if isinstance(data, dict):
        nested = next((data[key] for key in ("data", "records") if key in data), None)
        return nested if isinstance(nested, list) else [data]
    if not isinstance(data, list):
        raise GraphqError(
            f"calibration file {path} holds a JSON {type(data).__name__}, not a list of records: give a list of "
            '{"text": ...} objects (or strings), or one JSON object per line in a .jsonl file'
        )
    return data


def _records_from_json(path: Path, text_field: str) -> list[str]:
    """The texts of the records; records without usable text are counted, warned about, and refused when most are."""
    records = _json_records(path)
    texts = []
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    for record in records:
        if isinstance(record, str):
            text = record
        elif isinstance(record, dict) and text_field in record:
            text = record[text_field]
        elif isinstance(record, dict) and "src" in record:
            text = record["src"] if "tgt" not in record else f"{record['src']}\n{record['tgt']}"
        else:
            skip(f"no '{text_field}' field" if isinstance(record, dict) else "not an object or a string")
            continue
        if not isinstance(text, str):
            skip("text not a string")
        elif not text.strip():
            skip("empty text")
        else:
            texts.append(text)
    if records and not texts and skipped.get(f"no '{text_field}' field") == len(records):
        raise GraphqError(
            f"calibration file {path} has no '{text_field}' (or 'src'/'tgt') field in its records: "
            "name the field with --calib-field"
        )
    if skipped:
        details = ", ".join(f"{count} {reason}" for reason, count in skipped.items())
        lost = sum(skipped.values())
        if not texts:
            raise GraphqError(f"calibration file {path} has no usable records ({details}): fix the file")
        if len(texts) < lost:
            raise GraphqError(
                f"calibration file {path}: only {len(texts)} of {len(records)} records are usable ({details}): "
                "fix the file or name the text field with --calib-field"
            )
        print(f"graphq: warning: calibration file {path}: skipped {lost} of {len(records)} records ({details})",
              file=sys.stderr)
    return texts


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
            raise GraphqError(f"calibration file {path} {'is a folder' if path.is_dir() else 'does not exist'}: "
                              "pass a text, JSON or JSONL file")
        if path.suffix in (".json", ".jsonl"):
            texts = _records_from_json(path, text_field)
        else:
            return _warn_if_short(_windows_from_text(tokenizer, read_text(path), num_samples, seq_len, rng, bos, path),
                                  num_samples)
    usable = [t for t in texts if t.strip()]
    if not usable:
        raise GraphqError("the calibration data has no usable records (all empty)")
    if len(usable) < len(texts):  # inline --calib-texts (file records were counted when read)
        print(f"graphq: warning: skipped {len(texts) - len(usable)} empty calibration text(s) of {len(texts)}",
              file=sys.stderr)
    texts = usable
    order = rng.permutation(len(texts))[:num_samples]
    samples = []
    for index in sorted(order):
        ids = tokenizer(texts[index], add_special_tokens=False)["input_ids"][: seq_len - 1]
        if ids:
            samples.append(np.asarray([bos, *ids], dtype=np.int64))
    if not samples:
        raise GraphqError("the calibration data has no usable records (no tokens)")
    return _warn_if_short(samples, num_samples)


def _warn_if_short(samples: list[np.ndarray], num_samples: int) -> list[np.ndarray]:
    if len(samples) < num_samples:
        print(
            f"graphq: warning: the calibration data gives {len(samples)} samples, fewer than --num-samples "
            f"{num_samples}: using {len(samples)} (report.json records the number used)",
            file=sys.stderr,
        )
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


def load_calibration_samples(model_file: Path, config: QuantConfig) -> list[np.ndarray]:
    """The calibration token sequences the config names (the shipped samples/ text when it names none), tokenized
    by the export's own tokenizer."""
    from graphq.model_io import model_context_length
    from graphq.tokenizer import load_tokenizer

    return calibration_samples(
        load_tokenizer(model_file.parent),
        path=config.calib,
        texts=config.calib_texts,
        num_samples=config.num_samples,
        seq_len=config.seq_len,
        seed=config.seed,
        text_field=config.calib_field,
        max_context=model_context_length(model_file.parent),
    )
