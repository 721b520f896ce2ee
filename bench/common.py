"""Shared bench plumbing: the default model's export, the eval windows, and measuring one quantized model."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphq.default_model import ensure_default_model
from graphq.evaluate import perplexity, read_text, token_windows
from graphq.tokenizer import load_tokenizer
from graphq.export import export
from graphq.model_io import model_size_bytes, resolve_model_file
from graphq.runtimes.ort import OrtCausalLM

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "austen"


def bench_arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--work", type=Path, default=REPO / "out" / "bench", help="scratch folder (reused exports)")
    parser.add_argument("--eval-text", type=Path, default=DATA / "prideprejudice.txt")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    return parser


def float_export(work: Path) -> Path:
    target = work / "fp32"
    if not (target / "model.onnx").is_file():
        export(ensure_default_model(), target, overwrite=True)
    return target


@dataclass
class Measurement:
    name: str
    ppl: float
    size_mib: float
    quant_seconds: float | None
    decode_tok_s: float


def decode_speed(model: OrtCausalLM, prompt: np.ndarray, new_tokens: int) -> float:
    model.greedy_decode(prompt, 4)  # warm-up: first runs allocate
    started = time.perf_counter()
    model.greedy_decode(prompt, new_tokens)
    return new_tokens / (time.perf_counter() - started)


class Evaluator:
    def __init__(self, float_dir: Path, args: argparse.Namespace):
        self.args = args
        tokenizer = load_tokenizer(float_dir)
        self.windows = token_windows(tokenizer, read_text(args.eval_text), args.ctx, args.max_tokens)
        self.prompt = self.windows[0][:32]

    def measure(self, name: str, model_dir: Path, quant_seconds: float | None) -> Measurement:
        model = OrtCausalLM(model_dir, threads=self.args.threads)
        ppl = perplexity(model, self.windows).ppl
        speed = decode_speed(model, self.prompt, self.args.decode_tokens) if self.args.decode_tokens > 0 else float("nan")
        size = model_size_bytes(resolve_model_file(model_dir)) / 2**20
        print(f"  {name}: ppl {ppl:.3f}, {size:.1f} MiB, {speed:.1f} tok/s", flush=True)
        return Measurement(name, ppl, size, quant_seconds, speed)


def markdown_table(rows: list[Measurement], reference_ppl: float) -> str:
    lines = [
        "| model | perplexity | delta | size MiB | quant s | decode tok/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        delta = (row.ppl / reference_ppl - 1) * 100
        quant = "-" if row.quant_seconds is None else f"{row.quant_seconds:.1f}"
        lines.append(
            f"| {row.name} | {row.ppl:.3f} | {delta:+.2f}% | {row.size_mib:.1f} | {quant} | {row.decode_tok_s:.1f} |"
        )
    return "\n".join(lines)
