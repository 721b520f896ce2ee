"""KD weight stage (issue 12) on SmolLM2-135M, W4A16 g128 asym: RTN, AWQ, AWQ+GPTQ, KD from RTN, KD from AWQ.

    .venv/bin/python -m bench.kd [--only KEY ...] [--kd key=value ...] [--num-samples 64]

Calibrated / trained on Sense and Sensibility, evaluated on Pride and Prejudice (first 4096 tokens, windows of 512)
in onnxruntime. Every quantization is its own 'graphq quantize' process (started before this process loads the
evaluator), so the time and peak RSS in its report.json are its own. KD rows run with the default kd settings
unless --kd overrides them. Prints a markdown table; the float model's size is given for the RSS goal
(peak RSS <= 2x the float model plus one layer's activations).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.common import DATA, Evaluator, bench_arguments, float_export
from graphq.model_io import model_size_bytes, resolve_model_file

VARIANTS = {  # key: (label, method)
    "rtn": ("graphq RTN", "rtn"),
    "awq": ("graphq AWQ", "awq"),
    "awq-gptq": ("graphq AWQ+GPTQ", "awq+gptq"),
    "kd": ("graphq KD from RTN", "kd"),
    "awq-kd": ("graphq KD from AWQ", "awq+kd"),
}


def main() -> None:
    parser = bench_arguments(__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="run these rows only")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--kd", nargs="+", default=[], metavar="KEY=VALUE", help="kd settings for the KD rows")
    parser.add_argument("--reuse", action="store_true", help="evaluate existing outputs instead of quantizing again")
    args = parser.parse_args()
    args.decode_tokens = 0
    float_dir = float_export(args.work)
    keys = args.only or list(VARIANTS)
    reports = {}
    for key in keys:
        out = args.work / "kd" / key
        if not (args.reuse and (out / "report.json").is_file()):
            label, method = VARIANTS[key]
            command = [sys.executable, "-m", "graphq.cli", "quantize", str(float_dir), "-o", str(out), "--overwrite",
                       "--quiet", "--method", method, "--group-size", "128", "--asym",
                       "--calib", str(DATA / "sensesensibility.txt"), "--num-samples", str(args.num_samples),
                       "--seq-len", str(args.seq_len)]
            if "kd" in method and args.kd:
                command += ["--kd", *args.kd]
            print(f"{label}: {' '.join(command[2:])}", flush=True)
            subprocess.run(command, check=True)
        reports[key] = json.loads((out / "report.json").read_text())
    evaluator = Evaluator(float_dir, args)
    reference = evaluator.measure("float", float_dir, None).ppl
    float_mib = model_size_bytes(resolve_model_file(float_dir)) / 2**20
    lines = ["| model | perplexity | delta | quant s | peak RSS MiB | kd settings |", "|---|---:|---:|---:|---:|---|",
             f"| float | {reference:.3f} | - | - | - | - |"]
    for key in keys:
        report = reports[key]
        ppl = evaluator.measure(VARIANTS[key][0], args.work / "kd" / key, None).ppl
        kd = report["config"].get("kd") or {}
        lines.append(f"| {VARIANTS[key][0]} | {ppl:.3f} | {(ppl / reference - 1) * 100:+.2f}% | "
                     f"{report['elapsed_seconds']:.0f} | {report['peak_rss_bytes'] / 2**20:.0f} | "
                     f"{json.dumps(kd) if 'kd' in report['config']['method'] else '-'} |")
    print(f"\nSmolLM2-135M W4A16 g128 asym; float model {float_mib:.0f} MiB; eval {len(evaluator.windows)} windows "
          f"of {args.ctx} tokens\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
