"""Issue 11 through graphq's own pipeline: codebook weights by ``quantize`` (--method lut, --weight-format) on
SmolLM2-135M next to uniform RTN, graphq AWQ+GPTQ and onnxruntime's HQQ.

    GRAPHQ_THREADS=2 .venv/bin/python -m bench.lut_issue11 --float /work/out/fp32 --runs /tmp/lutint/runs \
        [--only NAME ...] [--num-samples 16] [--decode-tokens 32]

Every row is one ``graphq.quantize`` call (lm_head float, model written as ONNX only), then onnxruntime perplexity on
the first --max-tokens tokens of Pride and Prejudice; calibrated rows use --num-samples windows of 512 tokens of
Sense and Sensibility (seed 0). bits/weight: codebook rows from report.json (codes + tables + scales, as stored);
uniform rows counted as bits + (16 + bits) / group (a float16 scale and a zero point per group, as bench.lut
counts them). quant s: wall time of the quantize call (load, calibrate, quantize, save); decode tok/s: greedy
decoding of --decode-tokens tokens after a 32-token prompt in onnxruntime (bench.common.decode_speed; 0 skips it).
Each finished row is appended to --runs/rows.md at once, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from pathlib import Path

from bench.common import DATA, Evaluator, Measurement, bench_arguments, float_export
from graphq import QuantConfig, quantize

CALIB = str(DATA / "sensesensibility.txt")

# name -> QuantConfig kwargs; "ort-hqq" is onnxruntime's HQQ (bench.anchors); "bench-rtn3" bench.lut's 3-bit RTN.
ROWS = {
    "uniform RTN asym g128 (graphq)": dict(method="rtn", group_size=128, symmetric=False),
    "NF4 g64 (data-free)": dict(method="lut", weight_format="nf4", group_size=64),
    "LUT per-channel, int8 table (data-free)": dict(method="lut", weight_format="lut", group_size=-1,
                                                     lut_table_dtype="int8"),
    "LUT per-channel, int8 table (data-aware, --calib)": dict(method="lut", weight_format="lut", group_size=-1,
                                                               lut_table_dtype="int8", calib=CALIB),
    "AWQ+LUT per-channel, int8 table": dict(method="awq+lut", weight_format="lut", group_size=-1,
                                            lut_table_dtype="int8", calib=CALIB),
    "shared table g64 (data-aware, --calib)": dict(method="lut", weight_format="shared", group_size=64, calib=CALIB),
    "AWQ+shared table g64": dict(method="awq+lut", weight_format="shared", group_size=64, calib=CALIB),
    "onnxruntime HQQ asym g128": "ort-hqq",
    "3-bit LUT per-channel, int8 table (data-aware)": dict(scheme="w3a16", method="lut", weight_format="lut",
                                                           group_size=-1, lut_table_dtype="int8", calib=CALIB),
    "3-bit AWQ+LUT per-channel, int8 table": dict(scheme="w3a16", method="awq+lut", weight_format="lut",
                                                  group_size=-1, lut_table_dtype="int8", calib=CALIB),
    "3-bit shared table g64 (data-aware, --calib)": dict(scheme="w3a16", method="lut", weight_format="shared",
                                                          group_size=64, calib=CALIB),
    "3-bit AWQ+shared table g64": dict(scheme="w3a16", method="awq+lut", weight_format="shared", group_size=64,
                                       calib=CALIB),
    "3-bit AWQ+shared table g64+GPTQ codes": dict(scheme="w3a16", method="awq+lut+gptq", weight_format="shared",
                                                  group_size=64, calib=CALIB),
    "AWQ+shared table g64+GPTQ codes (4-bit)": dict(method="awq+lut+gptq", weight_format="shared", group_size=64,
                                                    calib=CALIB),
    "uniform RTN asym g128 3-bit (bench.lut, 4-bit carrier)": "bench-rtn3",
    "uniform AWQ asym g128 3-bit (graphq awq, 4-bit carrier)": ("uniform-3bit", dict(method="awq", group_size=128,
                                                                                      symmetric=False, calib=CALIB)),
    "uniform AWQ+GPTQ asym g128 3-bit (4-bit carrier)": ("uniform-3bit", dict(method="awq+gptq", group_size=128,
                                                                              symmetric=False, calib=CALIB)),
    "graphq AWQ+GPTQ asym g128": dict(method="awq+gptq", group_size=128, symmetric=False, calib=CALIB),
}


def bits_per_weight(report: dict) -> float:
    layers = [e for e in report["layers"] if "skipped" not in e]
    weights = sum(e["in_features"] * e["out_features"] for e in layers)
    stored = 0.0
    for e in layers:
        count = e["in_features"] * e["out_features"]
        if "bits_per_weight" in e:
            stored += e["bits_per_weight"] * count
        else:
            group = e["in_features"] if e["group_size"] == -1 else e["group_size"]
            stored += count * (e["bits"] + (16 + (0 if e["symmetric"] else e["bits"])) / group)
    return stored / weights


def uniform_3bit_quantize(float_dir: Path, out_dir: Path, args, **spec) -> dict:
    """graphq refuses uniform w3a16 (onnxruntime's MatMulNBits has no 3-bit kernel): graphq's own method on the
    3-bit grid (a config whose bits are 3), each layer's 3-bit integers carried in 4-bit MatMulNBits (the same
    integers, zero points and scales: the same arithmetic); report.json counts them at 3 bits."""
    import dataclasses

    from graphq.passes import emitters

    class ThreeBitConfig(QuantConfig):
        @property
        def bits(self) -> int:
            return 3 if self.scheme == "w4a16" else super().bits

    key = ("w4a16", "matmulnbits")
    carrier = emitters.EMITTERS[key]

    def emit(model, layer, weight, details):
        return carrier.emit(model, layer, dataclasses.replace(weight, bits=4) if weight.bits == 3 else weight, details)

    emitters.EMITTERS[key] = dataclasses.replace(carrier, emit=emit)
    try:
        spec = dict(save_format=["onnx"], num_samples=args.num_samples, seq_len=512, seed=0) | spec
        config = ThreeBitConfig(**spec)
        return quantize(float_dir, config, out_dir, progress=False).report
    finally:
        emitters.EMITTERS[key] = carrier


def run_row(name: str, spec, float_dir: Path, out_dir: Path, args) -> tuple[float, float]:
    shutil.rmtree(out_dir, ignore_errors=True)
    started = time.perf_counter()
    if spec == "ort-hqq":
        from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

        from bench.anchors import ort_matmulnbits

        ort_matmulnbits(float_dir, out_dir, bits=4, block_size=128, symmetric=False,
                        algo_config=HQQWeightOnlyQuantConfig(block_size=128, bits=4))
        return time.perf_counter() - started, 4 + (16 + 4) / 128
    if spec == "bench-rtn3":  # graphq refuses uniform w3a16 (no 3-bit MatMulNBits): bench.lut's 4-bit carrier
        from bench.lut import quantize_variant, rtn_layer

        seconds, bpw, _ = quantize_variant(float_dir, out_dir, rtn_layer(3, 128))
        return seconds, bpw
    if isinstance(spec, tuple) and spec[0] == "uniform-3bit":
        report = uniform_3bit_quantize(float_dir, out_dir, args, **spec[1])
        return time.perf_counter() - started, bits_per_weight(report)
    config = QuantConfig(save_format=["onnx"], num_samples=args.num_samples, seq_len=512, seed=0, **spec)
    result = quantize(float_dir, config, out_dir, progress=False)
    return time.perf_counter() - started, bits_per_weight(result.report)


def tokens_per_second(measured: Measurement) -> str:
    """The decode speed cell: '-' when --decode-tokens 0 skipped it."""
    return "-" if math.isnan(measured.decode_tok_s) else f"{measured.decode_tok_s:.1f}"


def main() -> None:
    parser = bench_arguments(__doc__.splitlines()[0])
    parser.add_argument("--float", type=Path, default=None)
    parser.add_argument("--runs", type=Path, default=Path("/tmp/lutint/runs"))
    parser.add_argument("--only", nargs="*", default=None, help=f"a subset of: {'; '.join(ROWS)}")
    parser.add_argument("--num-samples", type=int, default=16)
    args = parser.parse_args()
    float_dir = args.float or float_export(args.work)
    args.runs.mkdir(parents=True, exist_ok=True)
    chosen = args.only or list(ROWS)
    unknown = [name for name in chosen if name not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}")
    evaluator = Evaluator(float_dir, args)
    table = args.runs / "rows.md"
    reference = evaluator.measure("fp32", float_dir, None)
    with table.open("a") as out:
        out.write(f"\n<!-- {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}: first {args.max_tokens} tokens, "
                  f"ctx {args.ctx}, calibration {args.num_samples} x 512 -->\n"
                  "| variant | bits/weight | perplexity | delta vs fp32 | quant s | decode tok/s |\n"
                  "|---|---:|---:|---:|---:|---:|\n"
                  f"| fp32 | 32 | {reference.ppl:.3f} | +0.00% | - | {tokens_per_second(reference)} |\n")
    for name in chosen:
        out_dir = args.runs / re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
        try:
            seconds, bpw = run_row(name, ROWS[name], float_dir, out_dir, args)
            measured = evaluator.measure(name, out_dir, seconds)
            line = (f"| {name} | {bpw:.3f} | {measured.ppl:.3f} | {(measured.ppl / reference.ppl - 1) * 100:+.2f}% "
                    f"| {seconds:.1f} | {tokens_per_second(measured)} |")
        except Exception as exc:  # report the row, keep going
            line = f"| {name} | - | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} | - | - | - |"
        shutil.rmtree(out_dir, ignore_errors=True)
        print(line, flush=True)
        with table.open("a") as out:
            out.write(line + "\n")


if __name__ == "__main__":
    main()
