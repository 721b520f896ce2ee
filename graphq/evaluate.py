"""Accuracy measurement: perplexity over non-overlapping windows and logit agreement between two models."""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from graphq.errors import GraphqError


class CausalLM(Protocol):
    def logits(self, ids: np.ndarray) -> np.ndarray: ...


def read_text(path: str | Path) -> str:
    """Read a text file and reflow it: lines inside a paragraph are joined, paragraphs are kept apart."""
    path = Path(path)
    if not path.is_file():
        state = "does not exist" if not path.exists() else "is not a regular file"
        raise GraphqError(f"text file {path} {state}: pass a UTF-8 text file")
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise GraphqError(f"text file {path} is not UTF-8 text") from exc
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", raw.replace("\r\n", "\n"))]
    return "\n\n".join(p for p in paragraphs if p)


def bos_token_id(tokenizer) -> int:
    """The token put before each window: BOS, or the end-of-text token for tokenizers without one (Qwen2)."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise GraphqError("the tokenizer has neither a BOS nor an EOS token to start each window with")


def token_windows(tokenizer, text: str, ctx: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Non-overlapping windows of ``ctx`` text tokens each, with BOS prepended (each window is ctx + 1 ids)."""
    if ctx < 2:
        raise GraphqError(f"context length {ctx} is too short: use at least 2 tokens")
    if max_tokens is not None and max_tokens < ctx:
        raise GraphqError(f"--max-tokens {max_tokens} is shorter than one window of --ctx {ctx}")
    if max_tokens is not None:
        # Tokenize only a prefix generous enough for max_tokens (a token is rarely more than ~12 characters).
        ids = tokenizer(text[: max_tokens * 12], add_special_tokens=False)["input_ids"]
        if len(ids) < max_tokens:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ids[:max_tokens]
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n_windows = len(ids) // ctx
    if n_windows == 0:
        raise GraphqError(
            f"the text has {len(ids)} tokens, fewer than one window of {ctx}: use a longer text or a smaller --ctx"
        )
    bos = bos_token_id(tokenizer)
    ids_array = np.asarray(ids[: n_windows * ctx], dtype=np.int64).reshape(n_windows, ctx)
    return [np.concatenate([[bos], window]) for window in ids_array]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@dataclass
class PerplexityResult:
    ppl: float
    tokens: int
    windows: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity(model: CausalLM, windows: list[np.ndarray], progress: bool = False) -> PerplexityResult:
    """exp(mean negative log-likelihood) of every window token, each predicted from the ones before it."""
    started = time.perf_counter()
    nll_sum = 0.0
    count = 0
    for window in tqdm(windows, desc="perplexity", unit="window", disable=not progress, file=sys.stderr):
        logprobs = log_softmax(model.logits(window)[:-1])
        targets = window[1:]
        nll_sum -= float(logprobs[np.arange(len(targets)), targets].sum())
        count += len(targets)
    return PerplexityResult(
        ppl=float(np.exp(nll_sum / count)), tokens=count, windows=len(windows), seconds=time.perf_counter() - started
    )


@dataclass
class AgreementResult:
    mean_kl: float
    top1_agreement: float
    mean_cosine: float
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def logit_agreement(reference: CausalLM, candidate: CausalLM, windows: list[np.ndarray], progress: bool = False) -> AgreementResult:
    """Mean KL(reference || candidate) of next-token distributions, top-1 agreement, and cosine of logits."""
    kl_sum = agree = cosine_sum = 0.0
    count = 0
    for window in tqdm(windows, desc="compare", unit="window", disable=not progress, file=sys.stderr):
        ref_logits = reference.logits(window).astype(np.float64)
        cand_logits = candidate.logits(window).astype(np.float64)
        ref_lp, cand_lp = log_softmax(ref_logits), log_softmax(cand_logits)
        kl_sum += float((np.exp(ref_lp) * (ref_lp - cand_lp)).sum())
        agree += float((ref_logits.argmax(-1) == cand_logits.argmax(-1)).sum())
        norms = np.linalg.norm(ref_logits, axis=-1) * np.linalg.norm(cand_logits, axis=-1)
        cosine_sum += float(((ref_logits * cand_logits).sum(-1) / np.maximum(norms, 1e-30)).sum())
        count += len(window)
    return AgreementResult(
        mean_kl=kl_sum / count, top1_agreement=agree / count, mean_cosine=cosine_sum / count, tokens=count
    )


def dumps_json_line(data: dict) -> str:
    return json.dumps(data, sort_keys=True)


def require_finite(model: str, **results: float) -> None:
    """A NaN or infinite measurement means the model computes NaN/inf logits: a failure, not a result."""
    bad = [name.replace("_", " ") for name, value in results.items() if not math.isfinite(value)]
    if bad:
        raise GraphqError(
            f"{' and '.join(bad)} is not finite: {model} produces NaN or infinite logits (damaged weights or scales?)"
        )


def check_window_fits(model_path: str | Path, ctx: int) -> None:
    """Refuse, before any work, windows longer than the model's context (BOS + ctx tokens), as quantize does."""
    from graphq.model_io import model_context_length, resolve_model_file

    limit = model_context_length(resolve_model_file(model_path).parent)
    if limit is not None and ctx + 1 > limit:
        raise GraphqError(
            f"--ctx {ctx} makes windows of {ctx + 1} tokens (BOS first) but {model_path} has a context of {limit} "
            f"tokens: use --ctx {limit - 1} or less"
        )
