"""Accuracy measurement: perplexity over non-overlapping windows and logit agreement between two models."""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
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


@dataclass
class WindowTerms:
    """One window's contribution to ``LogitMetrics``: small, so a worker can send it back."""

    nll: float  # sum of the log-probabilities of the targets (subtracted)
    targets: int
    reference_nll: float | None = None
    kl: float = 0.0
    agree: float = 0.0
    cosine: float = 0.0
    positions: int = 0


def window_terms(window: np.ndarray, logits: np.ndarray, reference_logits: np.ndarray | None = None) -> WindowTerms:
    """The sums of one window of ids [T] given the logits [T, vocab] of the candidate (and of the reference)."""
    targets = np.asarray(window)[1:]
    rows = np.arange(len(targets))
    logprobs = log_softmax(logits)
    terms = WindowTerms(nll=float(logprobs[:-1][rows, targets].sum()), targets=len(targets))
    if reference_logits is None:
        return terms
    reference = log_softmax(reference_logits)
    terms.reference_nll = float(reference[:-1][rows, targets].sum())
    terms.kl = float((np.exp(reference) * (reference - logprobs)).sum())
    terms.agree = float((reference_logits.argmax(-1) == logits.argmax(-1)).sum())
    ref64, cand64 = reference_logits.astype(np.float64), logits.astype(np.float64)
    norms = np.linalg.norm(ref64, axis=-1) * np.linalg.norm(cand64, axis=-1)
    terms.cosine = float(((ref64 * cand64).sum(-1) / np.maximum(norms, 1e-30)).sum())
    terms.positions = len(window)
    return terms


class LogitMetrics:
    """Streams windows into the sums every accuracy number comes from: the candidate's (and the reference's) NLL of
    each next token, and against a reference the KL of the next-token distributions, top-1 agreement and logit
    cosine. ``eval``, ``compare`` and ``verify`` all measure through this one accumulator."""

    def __init__(self) -> None:
        self.nll = self.reference_nll = 0.0
        self.targets = 0
        self.kl = self.agree = self.cosine = 0.0
        self.positions = 0

    def add_terms(self, terms: WindowTerms) -> None:
        """One window's terms (``window_terms``, computed here or by a worker), added in window order."""
        self.nll -= terms.nll
        self.targets += terms.targets
        if terms.reference_nll is None:
            return
        self.reference_nll -= terms.reference_nll
        self.kl += terms.kl
        self.agree += terms.agree
        self.cosine += terms.cosine
        self.positions += terms.positions

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll / self.targets))

    @property
    def reference_ppl(self) -> float:
        return float(np.exp(self.reference_nll / self.targets))

    def agreement(self) -> "AgreementResult":
        return AgreementResult(mean_kl=self.kl / self.positions, top1_agreement=self.agree / self.positions,
                               mean_cosine=self.cosine / self.positions, tokens=self.positions)


def _keep(model):
    return model


def _perplexity_terms(model: CausalLM, window: np.ndarray) -> WindowTerms:
    return window_terms(window, model.logits(window))


def _agreement_terms(models: tuple[CausalLM, CausalLM], window: np.ndarray) -> WindowTerms:
    reference, candidate = models
    return window_terms(window, candidate.logits(window), reference.logits(window))


def perplexity(model: CausalLM, windows: list[np.ndarray], progress: bool = False, pool=None) -> PerplexityResult:
    """exp(mean negative log-likelihood) of every window token, each predicted from the ones before it.

    ``pool`` (graphq.runtimes.workers.WorkerPool): the windows are computed by its workers (each opens the model
    itself: ``model`` must pickle, as OrtCausalLM does) and combined in window order, so the result is the same."""
    from graphq.runtimes.workers import local_pool

    started = time.perf_counter()
    metrics = LogitMetrics()
    pool = pool or local_pool()
    terms = pool.map(partial(_keep, model), _perplexity_terms, windows)
    for term in tqdm(terms, total=len(windows), desc="perplexity", unit="window", disable=not progress, file=sys.stderr):
        metrics.add_terms(term)
    return PerplexityResult(ppl=metrics.ppl, tokens=metrics.targets, windows=len(windows),
                            seconds=time.perf_counter() - started)


@dataclass
class AgreementResult:
    mean_kl: float
    top1_agreement: float
    mean_cosine: float
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def logit_agreement(reference: CausalLM, candidate: CausalLM, windows: list[np.ndarray], progress: bool = False,
                    pool=None) -> AgreementResult:
    """Mean KL(reference || candidate) of next-token distributions, top-1 agreement, and cosine of logits."""
    from graphq.runtimes.workers import local_pool

    metrics = LogitMetrics()
    terms = (pool or local_pool()).map(partial(_keep, (reference, candidate)), _agreement_terms, windows)
    for term in tqdm(terms, total=len(windows), desc="compare", unit="window", disable=not progress, file=sys.stderr):
        metrics.add_terms(term)
    return metrics.agreement()


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
