"""Calibrated W4A16 g128 on SmolLM2-135M: graphq RTN/AWQ/GPTQ/AWQ+GPTQ next to onnxruntime's MatMulNBitsQuantizer.

    .venv/bin/python -m bench.awq_gptq [--num-samples 64] [--seq-len 512] [--ort-gptq-samples 6] [--ort-gptq-seq-len 128]

Calibrates on Sense and Sensibility and prints a table of perplexity on Pride and Prejudice, delta against float,
quantization wall time and peak resident memory. Every quantization runs alone in a fresh ('spawn') child process
so that its time and peak RSS (the child's own VmHWM) are its own; evaluation runs in this process.
lm_head stays float in every row.
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import resource
import shutil
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import DATA, Evaluator, bench_arguments, float_export
from graphq.memory import peak_rss_bytes
from graphq.model_io import model_size_bytes

GROUP = 128


@dataclass
class Variant:
    key: str  # output folder name and --only filter target
    label: str
    tool: str  # "graphq" or "ort"
    symmetric: bool
    method: str  # graphq: rtn|awq|gptq|awq+gptq; ort: default|rtn|gptq|hqq|kquant
    ort_samples: bool = False  # graphq calibrated on onnxruntime GPTQ's (smaller) samples, to compare speed


@dataclass
class Row:
    label: str
    ppl: float | None
    seconds: float | None
    peak_rss_mib: float | None
    failure: str | None = None
    note: str = ""


def variants() -> list[Variant]:
    out = []
    for symmetric in (True, False):
        scheme = "sym" if symmetric else "asym"
        for method, name in (("rtn", "RTN"), ("awq", "AWQ"), ("gptq", "GPTQ"), ("awq+gptq", "AWQ+GPTQ")):
            out.append(Variant(f"graphq-{method.replace('+', '-')}-{scheme}", f"graphq {name} {scheme}", "graphq", symmetric, method))
        out.append(Variant(f"graphq-gptq-{scheme}-ort-samples", f"graphq GPTQ {scheme}", "graphq", symmetric, "gptq", True))
        ort_methods = [("default", "default"), ("rtn", "RTN"), ("gptq", "GPTQ")]
        if not symmetric:  # HQQ and k-quant always store zero points: they have no symmetric form
            ort_methods += [("hqq", "HQQ"), ("kquant", "k-quant")]
        for method, name in ort_methods:
            out.append(Variant(f"ort-{method}-{scheme}", f"onnxruntime {name} {scheme}", "ort", symmetric, method))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Child processes: one quantization each.


def own_peak_rss_bytes() -> int:
    return peak_rss_bytes()


def _child_result(seconds: float, **extra) -> dict:
    return {
        "seconds": seconds,
        "peak_rss_bytes": own_peak_rss_bytes(),
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        **extra,
    }


def _run_graphq(float_dir: str, out_dir: str, method: str, symmetric: bool, calib: str, num_samples: int,
                seq_len: int, seed: int, group_size: int = GROUP, propagate: str | None = None) -> dict:
    from graphq import QuantConfig, quantize

    config = QuantConfig(
        scheme="w4a16", group_size=group_size, symmetric=symmetric, format="matmulnbits", method=method,
        calib=calib, num_samples=num_samples, seq_len=seq_len, seed=seed,
        **({} if propagate is None else {"propagate": propagate}),
    )
    started = time.perf_counter()
    result = quantize(float_dir, config, out_dir, progress=False)
    seconds = time.perf_counter() - started
    return _child_result(
        seconds,
        report_seconds=result.report["elapsed_seconds"],
        report_peak_rss_bytes=result.report["peak_rss_bytes"],
    )


class _ListReader:
    """CalibrationDataReader over prepared feed dicts (deep-copyable: MatMulNBitsQuantizer copies it)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self.index = 0

    def get_next(self):
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def _run_ort(float_dir: str, out_dir: str, method: str, symmetric: bool, gptq_feeds) -> dict:
    from onnxruntime.quantization.calibrate import CalibrationDataReader
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        KQuantWeightOnlyQuantConfig,
        RTNWeightOnlyQuantConfig,
    )

    from bench.anchors import ort_matmulnbits

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per graph node

    class Reader(_ListReader, CalibrationDataReader):
        pass

    algo = {
        "default": lambda: None,
        "rtn": RTNWeightOnlyQuantConfig,
        "gptq": lambda: GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(gptq_feeds), block_size=GROUP),
        "hqq": lambda: HQQWeightOnlyQuantConfig(block_size=GROUP, bits=4),
        "kquant": KQuantWeightOnlyQuantConfig,
    }[method]()
    started = time.perf_counter()
    _, process_seconds = ort_matmulnbits(
        float_dir, out_dir, bits=4, block_size=GROUP, symmetric=symmetric, algo_config=algo
    )
    seconds = time.perf_counter() - started
    return _child_result(seconds, process_seconds=process_seconds)


def _child(kind: str, kwargs: dict) -> dict:
    try:
        return (_run_graphq if kind == "graphq" else _run_ort)(**kwargs)
    except BaseException as exc:  # report, don't kill the bench
        text = f"{type(exc).__name__}: {exc}".strip().splitlines()
        return {"error": text[0][:200] if text else type(exc).__name__, "traceback": traceback.format_exc()}


def run_isolated(kind: str, kwargs: dict) -> dict:
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            return pool.submit(_child, kind, kwargs).result()
    except BrokenProcessPool as exc:
        return {"error": f"the quantizing process died ({exc})"}


# ---------------------------------------------------------------------------------------------------------------


def calibration_feeds(float_dir: Path, calib: Path, num_samples: int, seq_len: int, seed: int) -> list[dict[str, np.ndarray]]:
    """graphq's calibration sequences (same sampler, file and seed) as onnxruntime feeds for its quantizers."""
    from graphq.calibration_data import calibration_samples
    from graphq.tokenizer import load_tokenizer
    from graphq.runtimes.ort import OrtCausalLM

    samples = calibration_samples(
        load_tokenizer(float_dir), path=calib, num_samples=num_samples, seq_len=seq_len, seed=seed
    )
    model = OrtCausalLM(float_dir, threads=1)
    # input_ids / attention_mask / position_ids int64 [1, T]; every past_key_values.*.key/value float32 [1, 3, 0, 64]
    feeds = [model._feeds(np.asarray(ids, dtype=np.int64).reshape(1, -1), None, 0) for ids in samples]
    del model
    return feeds


def delta_percent(ppl: float, reference: float) -> float:
    return (ppl / reference - 1) * 100


def markdown_table(rows: list[Row], reference_ppl: float) -> str:
    lines = [
        "| model | perplexity | delta vs fp32 | quantization time s | peak RSS MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        label = row.label + (f" ({row.note})" if row.note else "")
        if row.failure is not None:
            lines.append(f"| {label} | failed: {row.failure} | - | - | - |")
            continue
        seconds = "-" if row.seconds is None else f"{row.seconds:.1f}"
        rss = "-" if row.peak_rss_mib is None else f"{row.peak_rss_mib:.0f}"
        ppl = f"{row.ppl:.3f}" if row.ppl < 1e5 else f"{row.ppl:.3g}"  # collapsed int8 models reach millions
        lines.append(f"| {label} | {ppl} | {delta_percent(row.ppl, reference_ppl):+.2f}% | {seconds} | {rss} |")
    return "\n".join(lines)


def main() -> None:
    parser = bench_arguments(__doc__.splitlines()[0])
    parser.set_defaults(decode_tokens=0)
    parser.add_argument("--calib", type=Path, default=DATA / "sensesensibility.txt", help="calibration text")
    parser.add_argument("--num-samples", type=int, default=64, help="graphq calibration samples")
    parser.add_argument("--seq-len", type=int, default=512, help="graphq calibration sample length (tokens)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ort-gptq-samples", type=int, default=6, help="onnxruntime GPTQ calibration samples")
    parser.add_argument("--ort-gptq-seq-len", type=int, default=128, help="onnxruntime GPTQ sample length (tokens)")
    parser.add_argument("--only", nargs="*", default=None, help="run only variants whose key contains one of these")
    args = parser.parse_args()
    args.calib = args.calib.resolve()

    args.work.mkdir(parents=True, exist_ok=True)
    float_dir = float_export(args.work)
    float_file = float_dir / "model.onnx"
    float_mib = model_size_bytes(float_file) / 2**20  # model.onnx plus its external data
    print(
        f"SmolLM2-135M W4A16 g{GROUP}, lm_head float; calibration {args.calib.name}: graphq {args.num_samples} samples "
        f"x {args.seq_len} tokens (seed {args.seed}), onnxruntime GPTQ {args.ort_gptq_samples} x "
        f"{args.ort_gptq_seq_len}; eval {args.eval_text.name}, first {args.max_tokens} tokens, windows of {args.ctx}",
        flush=True,
    )
    print(f"float model: {float_mib:.1f} MiB (goal: peak RSS < {2 * float_mib:.0f} MiB)", flush=True)

    evaluator = Evaluator(float_dir, args)
    reference = evaluator.measure("fp32", float_dir, None).ppl
    rows = [Row("fp32", reference, None, None)]
    runs = args.work / "awq_gptq"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)

    chosen = [v for v in variants() if not args.only or any(s in v.key for s in args.only)]
    feeds = None
    if any(v.tool == "ort" and v.method == "gptq" for v in chosen):
        feeds = calibration_feeds(float_dir, args.calib, args.ort_gptq_samples, args.ort_gptq_seq_len, args.seed)
    results: dict[str, tuple[Variant, Row, dict]] = {}
    for variant in chosen:
        out_dir = runs / variant.key
        print(f"{variant.label} ...", flush=True)
        if variant.tool == "graphq":
            kwargs = dict(float_dir=str(float_dir), out_dir=str(out_dir), method=variant.method,
                          symmetric=variant.symmetric, calib=str(args.calib), seed=args.seed,
                          num_samples=args.ort_gptq_samples if variant.ort_samples else args.num_samples,
                          seq_len=args.ort_gptq_seq_len if variant.ort_samples else args.seq_len)
        else:
            kwargs = dict(float_dir=str(float_dir), out_dir=str(out_dir), method=variant.method,
                          symmetric=variant.symmetric, gptq_feeds=feeds if variant.method == "gptq" else None)
        note = ""
        if (variant.tool == "ort" and variant.method == "gptq") or variant.ort_samples:
            note = f"{args.ort_gptq_samples} samples x {args.ort_gptq_seq_len} tokens"
        outcome = run_isolated(variant.tool, kwargs)
        if "error" in outcome:
            print(f"  {variant.label}: failed: {outcome['error']}", flush=True)
            if outcome.get("traceback"):
                print("    " + outcome["traceback"].strip().splitlines()[-1], flush=True)
            row = Row(variant.label, None, None, None, failure=outcome["error"], note=note)
        else:
            extra = ", ".join(f"{k} {v}" for k, v in outcome.items() if k not in ("seconds", "peak_rss_bytes"))
            print(f"  quantized in {outcome['seconds']:.1f}s, peak RSS {outcome['peak_rss_bytes'] / 2**20:.0f} MiB"
                  + (f" ({extra})" if extra else ""), flush=True)
            try:
                ppl = evaluator.measure(variant.label, out_dir, outcome["seconds"]).ppl
                row = Row(variant.label, ppl, outcome["seconds"], outcome["peak_rss_bytes"] / 2**20, note=note)
            except Exception as exc:  # a quantized model onnxruntime cannot load or run
                reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:200]
                print(f"  {variant.label}: evaluation failed: {reason}", flush=True)
                row = Row(variant.label, None, None, None, failure=f"evaluation: {reason}", note=note)
        rows.append(row)
        results[variant.key] = (variant, row, outcome)

    print()
    header = (
        f"SmolLM2-135M W4A16 group {GROUP}, lm_head float. Calibration: {args.calib.name}; graphq {args.num_samples} "
        f"samples x {args.seq_len} tokens (seed {args.seed}); onnxruntime GPTQ {args.ort_gptq_samples} samples x "
        f"{args.ort_gptq_seq_len} tokens (fewer: its run time grows with samples x linear inputs). Evaluation: "
        f"{args.eval_text.name}, first {args.max_tokens} tokens, windows of {args.ctx}. Quantization time: wall time "
        f"of the whole quantize call (load, quantize, save) in a fresh process; peak RSS: that process's VmHWM "
        f"(float model {float_mib:.1f} MiB)."
    )
    print(header)
    print()
    print(markdown_table(rows, reference))
    print()
    print(summary(results, reference, float_mib, args))


def summary(results: dict, reference: float, float_mib: float, args: argparse.Namespace) -> str:
    ran = [(v, r) for v, r, _ in results.values() if r.ppl is not None]
    lines = []
    graphq = [(v, r) for v, r in ran if v.tool == "graphq"]
    ort = [(v, r) for v, r in ran if v.tool == "ort"]
    if graphq and ort:
        gv, gr = min(graphq, key=lambda x: x[1].ppl)
        ov, orow = min(ort, key=lambda x: x[1].ppl)
        g_delta, o_delta = delta_percent(gr.ppl, reference), delta_percent(orow.ppl, reference)
        ratio = g_delta / o_delta if o_delta > 0 else math.nan
        lines.append(
            f"Summary: graphq best delta {g_delta:+.2f}% ({gv.label}); onnxruntime best delta {o_delta:+.2f}% "
            f"({ov.label}); ratio {ratio:.2f} (goal <= 0.6): {'met' if ratio <= 0.6 else 'NOT met'}."
        )
    if graphq:
        worst = max(graphq, key=lambda x: x[1].peak_rss_mib)
        lines.append(
            f"graphq peak RSS max {worst[1].peak_rss_mib:.0f} MiB ({worst[0].label}) = "
            f"{worst[1].peak_rss_mib / float_mib:.2f}x the float model (goal < 2x)."
        )
    samples = f"{args.ort_gptq_samples} samples x {args.ort_gptq_seq_len} tokens"
    for scheme in ("sym", "asym"):
        ours, theirs = results.get(f"graphq-gptq-{scheme}-ort-samples"), results.get(f"ort-gptq-{scheme}")
        if ours and theirs and ours[1].seconds is not None and theirs[1].seconds is not None:
            lines.append(
                f"GPTQ {scheme} time on the same {samples}: graphq {ours[1].seconds:.1f}s, onnxruntime "
                f"{theirs[1].seconds:.1f}s ({theirs[1].seconds / ours[1].seconds:.1f}x faster; goal: faster)."
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
