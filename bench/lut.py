"""LUT (codebook) weights on SmolLM2-135M next to uniform RTN at 4 and 3 bits, data-free (and a calibrated preview).

    .venv/bin/python -m bench.lut [--float /work/out/fp32] [--runs /tmp/lut] [--variants NAME ...]

Every decoder linear is quantized (lm_head stays float), the model saved and evaluated in onnxruntime:
perplexity on Pride and Prejudice, delta against float, stored bits per weight of the quantized linears
(codes + tables + scales + zero points, counting every scale at float16 as a float16 deployment stores it),
file size, quantization seconds (algorithm + graph rewrite, not saving) and decode speed.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir

from bench.common import DATA, Evaluator, Measurement, bench_arguments, float_export
from graphq.algorithms.codebook import CodebookWeight, iq4nl_quantize, lut_quantize, nf4_quantize, shared_lut_quantize
from graphq.algorithms.rtn import QuantizedWeight, quantize_rtn
from graphq.linear_layers import LinearLayer, find_linear_layers
from graphq.model_io import MODEL_FILENAME, copy_side_files, load_model, save_model
from graphq.passes.lut import emit_lut
from graphq.passes.matmulnbits import emit_matmulnbits

CALIBRATION_TEXT = DATA / "sensesensibility.txt"  # never the evaluation text
# Scales and table scales counted at float16 (the fp32 export's MatMulNBits scales are float32 in the graph).
SCALE_BITS = 16


def rtn_layer(bits: int, group_size: int) -> Callable[[ir.Model, LinearLayer], tuple[int, int]]:
    """Uniform asymmetric RTN as MatMulNBits. 3-bit integers travel in the 4-bit kernel (onnxruntime's CPU
    MatMulNBits takes 2, 4 or 8 bits): the arithmetic is the 3-bit grid's; the bits are counted at 3."""

    def apply(model: ir.Model, layer: LinearLayer) -> tuple[int, int]:
        qw = quantize_rtn(layer.weight_kn(), bits, group_size, symmetric=False)
        carrier = qw if bits in (2, 4, 8) else QuantizedWeight(qw.q, qw.scales, qw.zero_points, 4, qw.group_size)
        emit_matmulnbits(model, layer, carrier)
        stored = qw.q.size * bits + qw.scales.size * (SCALE_BITS + bits)
        return stored, 0

    return apply


def norm_importance(layer: LinearLayer) -> np.ndarray | None:
    """A data-free stand-in for the Hessian diagonal E[x_k^2]: the square of the RMSNorm weight that scales
    input channel k of q/k/v and gate/up (the normalised hidden state has unit mean square). None elsewhere."""
    if layer.norm_weight is None:
        return None
    return np.asarray(layer.norm_weight.const_value.numpy(), dtype=np.float64) ** 2


class HessianDiagonals:
    """Per linear input, sum over calibration tokens of x_k^2 (the diagonal of X^T X), from the float model's
    activations, computed once on first use. A preview of the data-aware LUT (SqueezeLLM-style weighting) until
    the layer-wise engine passes its own statistics; float-model activations, not layer-wise ones."""

    def __init__(self, samples: int = 16, seq_len: int = 512, seed: int = 0):
        self.samples, self.seq_len, self.seed = samples, seq_len, seed
        self.float_dir: Path | None = None
        self.by_input: dict[str, np.ndarray] | None = None

    def __call__(self, layer: LinearLayer) -> np.ndarray:
        if self.by_input is None:
            self.by_input = self._collect()
        return self.by_input[layer.input.name]

    def _collect(self) -> dict[str, np.ndarray]:
        from graphq.calibration_data import calibration_samples
        from graphq.runtimes.activation_capture import ActivationCapture
        from graphq.tokenizer import load_tokenizer

        model = load_model(self.float_dir)
        layers = [layer for layer in find_linear_layers(model) if layer.role != "lm_head"]
        capture = ActivationCapture(model, layers)
        windows = calibration_samples(
            load_tokenizer(self.float_dir), CALIBRATION_TEXT, num_samples=self.samples, seq_len=self.seq_len, seed=self.seed
        )
        sums: dict[str, np.ndarray] = {}
        for ids in windows:
            for name, x in capture.run(ids).items():
                x = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
                sums[name] = sums.get(name, 0.0) + (x * x).sum(axis=0)
        return sums


HESSIAN = HessianDiagonals()


def codebook_layer(
    quantize: Callable[[np.ndarray, LinearLayer], CodebookWeight]
) -> Callable[[ir.Model, LinearLayer], tuple[int, int]]:
    def apply(model: ir.Model, layer: LinearLayer) -> tuple[int, int]:
        cw = quantize(layer.weight_kn(), layer)
        emit_lut(model, layer, cw)
        return round(cw.storage_bytes() * 8), cw.fallback_rows

    return apply


VARIANTS: dict[str, Callable[[ir.Model, LinearLayer], tuple[int, int]]] = {
    "RTN asym g128 4-bit (MatMulNBits)": rtn_layer(4, 128),
    "NF4 g64": codebook_layer(lambda w, layer: nf4_quantize(w, 64)),
    "IQ4_NL-style g64": codebook_layer(lambda w, layer: iq4nl_quantize(w, 64)),
    "learned shared table g64 (k-means + scale search)": codebook_layer(
        lambda w, layer: shared_lut_quantize(w, 4, 64, refinements=1)
    ),
    "LUT 4-bit per-channel, fp16 table": codebook_layer(lambda w, layer: lut_quantize(w, 4, -1)),
    "LUT 4-bit per-channel, int8 table + fp16 scale": codebook_layer(
        lambda w, layer: lut_quantize(w, 4, -1, table_dtype="int8")
    ),
    "LUT 4-bit g128, int8 table + fp16 scale": codebook_layer(
        lambda w, layer: lut_quantize(w, 4, 128, table_dtype="int8")
    ),
    "RTN asym g128 3-bit (MatMulNBits, 4-bit carrier)": rtn_layer(3, 128),
    "LUT 3-bit per-channel, int8 table + fp16 scale": codebook_layer(
        lambda w, layer: lut_quantize(w, 3, -1, table_dtype="int8")
    ),
    # Measured once at 1024 tokens and left out of the default run (see bench/results/lut.md).
    "LUT 4-bit g128, fp16 table": codebook_layer(lambda w, layer: lut_quantize(w, 4, 128)),
    "LUT 4-bit per-channel, int8 table, norm-weighted": codebook_layer(
        lambda w, layer: lut_quantize(w, 4, -1, importance=norm_importance(layer), table_dtype="int8")
    ),
    "LUT 4-bit per-channel, int8 table, Hessian-diagonal weighted (calibrated preview)": codebook_layer(
        lambda w, layer: lut_quantize(w, 4, -1, importance=HESSIAN(layer), table_dtype="int8")
    ),
    "LUT 3-bit per-channel, int8 table, Hessian-diagonal weighted (calibrated preview)": codebook_layer(
        lambda w, layer: lut_quantize(w, 3, -1, importance=HESSIAN(layer), table_dtype="int8")
    ),
    "learned shared table g64, Hessian-diagonal weighted (calibrated preview)": codebook_layer(
        lambda w, layer: shared_lut_quantize(w, 4, 64, importance=HESSIAN(layer), refinements=1)
    ),
}
DEFAULT_VARIANTS = list(VARIANTS)[:9]


@dataclass
class Row:
    measurement: Measurement
    bits_per_weight: float | None
    fallback_rows: int


def quantize_variant(float_dir: Path, out_dir: Path, apply: Callable) -> tuple[float, float, int]:
    """Quantize every decoder linear with ``apply``; returns (seconds, bits per weight, fallback rows)."""
    model = load_model(float_dir)
    layers = [layer for layer in find_linear_layers(model) if layer.role != "lm_head"]
    stored_bits = weights = fallback = 0
    started = time.perf_counter()
    for layer in layers:
        bits, rows = apply(model, layer)
        stored_bits += bits
        fallback += rows
        weights += layer.in_features * layer.out_features
    seconds = time.perf_counter() - started
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    save_model(model, out_dir / MODEL_FILENAME)
    copy_side_files(float_dir, out_dir)
    return seconds, stored_bits / weights, fallback


def markdown_table(rows: list[Row], reference_ppl: float) -> str:
    lines = [
        "| variant | bits/weight | perplexity | delta vs fp32 | size MiB | quant s | decode tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        m = row.measurement
        bpw = "32" if row.bits_per_weight is None else f"{row.bits_per_weight:.3f}"
        quant = "-" if m.quant_seconds is None else f"{m.quant_seconds:.1f}"
        lines.append(
            f"| {m.name} | {bpw} | {m.ppl:.3f} | {(m.ppl / reference_ppl - 1) * 100:+.2f}% | {m.size_mib:.1f} "
            f"| {quant} | {m.decode_tok_s:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = bench_arguments(__doc__.splitlines()[0])
    parser.add_argument("--float", type=Path, default=None, help="float export (default: the bench's export in --work)")
    parser.add_argument("--runs", type=Path, default=None, help="where quantized models go (default: --work/lut)")
    parser.add_argument("--variants", nargs="*", default=None, help=f"a subset of: {'; '.join(VARIANTS)}")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    float_dir = args.float or float_export(args.work)
    runs = args.runs or args.work / "lut"
    chosen = args.variants or DEFAULT_VARIANTS
    unknown = [name for name in chosen if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}")
    HESSIAN.float_dir = float_dir
    evaluator = Evaluator(float_dir, args)
    rows = [Row(evaluator.measure("fp32", float_dir, None), None, 0)]
    for name in chosen:
        out_dir = runs / re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
        seconds, bpw, fallback = quantize_variant(float_dir, out_dir, VARIANTS[name])
        print(f"  {name}: {bpw:.3f} bits/weight, {seconds:.1f} s, {fallback} fallback rows", flush=True)
        rows.append(Row(evaluator.measure(name, out_dir, seconds), bpw, fallback))
    print()
    calibration = (
        f"'calibrated' variants weighted by {HESSIAN.samples} windows of {HESSIAN.seq_len} tokens of {CALIBRATION_TEXT.name}"
        if HESSIAN.by_input is not None else "data-free (no calibration)"
    )
    print(f"SmolLM2-135M, Pride and Prejudice, first {args.max_tokens} tokens, windows of {args.ctx}; lm_head float; "
          f"{calibration}")
    print(markdown_table(rows, rows[0].measurement.ppl))
    fallbacks = {row.measurement.name: row.fallback_rows for row in rows if row.fallback_rows}
    if fallbacks:
        print(f"k-means rows with fewer distinct values than table entries: {fallbacks}")


if __name__ == "__main__":
    main()
