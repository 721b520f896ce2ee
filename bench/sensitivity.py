"""Sensitivity-ranked precision on SmolLM2-135M: --disable-level against --act-fallback and none (W8A8 static),
against plain RTN (W4A16), and --target-bits 4.5 against uniform 4-bit AWQ, all rows measured in one run.

    .venv/bin/python -m bench.sensitivity [--num-samples 8] [--awq-samples 16]

The rankings come from `graphq analyze` (2 windows of 128 tokens of the calibration text, RTN on the scheme's
grid); every quantization runs in a fresh process (peak RSS = its VmHWM); perplexity on Pride and Prejudice
(first --max-tokens tokens, windows of --ctx). lm_head stays float everywhere.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from bench.awq_gptq import Row, markdown_table
from bench.common import DATA, Evaluator, bench_arguments, float_export
from bench.w8a8 import run_isolated
from graphq.model_io import model_size_bytes

N = 5


def variants(sensitivity: dict[str, Path], num_samples: int, awq_samples: int) -> list[tuple[str, dict, int]]:
    w8a8 = dict(scheme="w8a8", act_method="minmax")
    w4 = dict(scheme="w4a16", group_size=128, symmetric=False)
    return [
        ("graphq W8A8 static minmax", w8a8, num_samples),
        (f"graphq W8A8 static minmax --act-fallback {N} (input groups, local error)", {**w8a8, "act_fallback": N}, num_samples),
        (f"graphq W8A8 static minmax --disable-level {N} (linears float, sensitivity)",
         {**w8a8, "disable_level": N, "sensitivity_file": str(sensitivity["w8a8"])}, num_samples),
        (f"graphq W8A8 static minmax --disable-level {N} --fallback-scheme w8a16",
         {**w8a8, "disable_level": N, "fallback_scheme": "w8a16", "sensitivity_file": str(sensitivity["w8a8"])}, num_samples),
        ("graphq W4A16 g128 asym RTN", w4, num_samples),
        (f"graphq W4A16 g128 asym RTN --disable-level {N}",
         {**w4, "disable_level": N, "sensitivity_file": str(sensitivity["w4a16"])}, num_samples),
        ("graphq W4A16 g128 asym AWQ (uniform 4-bit)", {**w4, "method": "awq"}, awq_samples),
        ("graphq W4A16 g128 asym AWQ --target-bits 4.5 (w8a16 g128 for the most sensitive)",
         {**w4, "method": "awq", "target_bits": 4.5, "sensitivity_file": str(sensitivity["w4a16"])}, awq_samples),
    ]


def main() -> None:
    parser = bench_arguments(__doc__.splitlines()[0])
    parser.set_defaults(decode_tokens=0)
    parser.add_argument("--calib", type=Path, default=DATA / "sensesensibility.txt")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--awq-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None, help="run only rows whose label contains one of these")
    args = parser.parse_args()
    args.calib = args.calib.resolve()
    float_dir = float_export(args.work)
    runs = args.work / "sensitivity"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    from graphq import QuantConfig
    from graphq.sensitivity import analyze

    sensitivity = {scheme: runs / f"sensitivity-{scheme}.json" for scheme in ("w8a8", "w4a16")}
    selected = [(index, variant) for index, variant in enumerate(variants(sensitivity, args.num_samples, args.awq_samples))
                if not args.only or any(part in variant[0] for part in args.only)]
    # Only the rankings the selected rows read are analysed (the W4A16 one is most of the run's time).
    needed = {path for _, (_, options, _) in selected for path in [options.get("sensitivity_file")] if path}
    analysis_seconds = {}
    for scheme, options in (("w8a8", {}), ("w4a16", dict(group_size=128, symmetric=False))):
        if str(sensitivity[scheme]) not in needed:
            continue
        started = time.perf_counter()
        report = analyze(float_dir, QuantConfig(scheme=scheme, calib=str(args.calib), seed=args.seed, **options),
                         num_windows=2, progress=False)
        analysis_seconds[scheme] = time.perf_counter() - started
        report.save(sensitivity[scheme])
        print(f"analyze {scheme}: {analysis_seconds[scheme]:.1f}s; top {N}: {report.ranking[:N]}", flush=True)
    evaluator = Evaluator(float_dir, args)
    reference = evaluator.measure("fp32", float_dir, None).ppl
    rows = [Row("fp32", reference, None, None)]
    for index, (label, options, samples) in selected:
        out_dir = runs / f"row{index}"
        print(f"{label} ...", flush=True)
        child = run_isolated("graphq", dict(float_dir=str(float_dir), out_dir=str(out_dir), options=options,
                                            calib=str(args.calib), num_samples=samples, seq_len=args.seq_len,
                                            seed=args.seed))
        if "error" in child:
            print(f"  failed: {child['error']}", flush=True)
            rows.append(Row(label, None, None, None, failure=child["error"]))
            continue
        measured = evaluator.measure(label, out_dir, child["seconds"])
        report = json.loads((out_dir / "report.json").read_text())
        plan = report.get("precision_plan", {})
        note = f"{len(plan.get('layers', {}))} linears moved" if plan else ""
        if plan.get("bits_per_weight"):
            note += f", {plan['bits_per_weight']:.3f} bits/weight"
        rows.append(Row(label, measured.ppl, child["seconds"], child["peak_rss_bytes"] / 2**20, note=note))
    print()
    print(f"SmolLM2-135M; calibration {args.calib.name} ({args.num_samples} x {args.seq_len} tokens, AWQ "
          f"{args.awq_samples} x {args.seq_len}); analysis 2 windows x 128 tokens ("
          f"{', '.join(f'{scheme} {seconds:.0f}s' for scheme, seconds in analysis_seconds.items())}); eval {args.eval_text.name}, first {args.max_tokens} tokens, "
          f"windows of {args.ctx}; float model {model_size_bytes(float_dir / 'model.onnx') / 2**20:.1f} MiB")
    print(markdown_table(rows, reference))



if __name__ == "__main__":
    main()
