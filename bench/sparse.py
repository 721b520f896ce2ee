"""Sparse SmolLM2-135M: graphq magnitude / Wanda / SparseGPT (50% and 2:4; float, W8A8, W4A16), W8A8S lowbit and its
W8A8SC compression, next to llm-compressor's SparseGPTModifier and WandaPruningModifier, all rows from one run.

    .venv/bin/python -m bench.sparse [--work /tmp/sparse/bench] [--num-samples 16] [--seq-len 512] [--skip-llmc]

Calibration: Sense and Sensibility (graphq's sampler; llm-compressor gets the very same token sequences). Evaluation:
Pride and Prejudice, first 4096 tokens in windows of 512, every model in onnxruntime (llm-compressor's checkpoints
are exported with graphq export). Every step runs in its own process under /usr/bin/time: wall time and peak RSS
are that process's. W8A8 rows quantize the pruned float model of the row above with plain W8A8: graphq prunes the
W8A8 schemes' float weights before activation calibration, so this is the same computation as
``quantize --scheme w8a8 --method M`` (their time adds the pruning). llm-compressor runs in bench/.llmc-venv (its own
torch and transformers; never a graphq dependency). Results are appended to bench/results/sparse.md as they come.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.common import DATA, REPO, Evaluator, bench_arguments

PY = sys.executable
LLMC_PY = REPO / "bench" / ".llmc-venv" / "bin" / "python"


@dataclass
class Row:
    label: str
    ppl: float | None = None
    seconds: float | None = None
    peak_rss_mib: float | None = None
    artifact_bytes: int | None = None
    ratio: str = "-"
    sparsity: float | None = None
    note: str = ""


@dataclass
class Bench:
    work: Path
    evaluator: Evaluator
    log: Path
    rows: list[Row] = field(default_factory=list)
    float_ppl: float | None = None

    def run(self, name: str, command: list[str]) -> tuple[float, float]:
        """Run one step in its own process; returns (wall seconds, peak RSS MiB)."""
        timing = self.work / f"{name}.time"
        with open(self.work / f"{name}.log", "w") as log:
            done = subprocess.run(["/usr/bin/time", "-o", str(timing), "-f", "%e %M", *command], stdout=log,
                                  stderr=subprocess.STDOUT, cwd=REPO)
        if done.returncode:
            raise RuntimeError(f"{name} failed (exit {done.returncode}); see {self.work / (name + '.log')}")
        seconds, kib = timing.read_text().split()[-2:]
        return float(seconds), float(kib) / 1024

    def graphq(self, name: str, *args: str) -> tuple[Path, float, float]:
        out = self.work / name
        if (out / "done.json").is_file():  # reuse a finished step of an interrupted run
            data = json.loads((out / "done.json").read_text())
            return out, data["seconds"], data["peak"]
        quiet = ["--quiet"] if args[0] in ("quantize", "prune", "compress") else []
        seconds, peak = self.run(name, [PY, "-m", "graphq", *args, "-o", str(out), "--overwrite", *quiet])
        (out / "done.json").write_text(json.dumps({"seconds": seconds, "peak": peak}))
        return out, seconds, peak

    def add(self, row: Row, model_dir: Path | None) -> Row:
        if model_dir is not None:
            row.ppl = self.evaluator.measure(row.label, model_dir, row.seconds).ppl
        self.rows.append(row)
        with open(self.log, "a") as log:
            log.write(json.dumps(row.__dict__) + "\n")
        print(f"  {row.label}: ppl {row.ppl}, {row.seconds}s, {row.peak_rss_mib} MiB {row.note}", flush=True)
        return row


def artifact_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("quant_model_*"))


def report_sparsity(folder: Path) -> float | None:
    """Measured zeros of the linears, weighted by size: report.json's, else counted in the ONNX graph (inspect)."""
    report = json.loads((folder / "report.json").read_text())
    if "sparsity" in report:
        return report["sparsity"]
    entries = [e for e in report["layers"] if "sparsity" in e]
    if entries:
        sizes = [e["in_features"] * e["out_features"] for e in entries]
        return float(sum(e["sparsity"] * s for e, s in zip(entries, sizes)) / sum(sizes))
    from graphq.artifacts.inspect import inspect_onnx

    view = inspect_onnx(folder)
    sizes = {e["name"]: e["in_features"] * e["out_features"] for e in report["layers"]}
    measured = {name: f for name, f in view.sparsity.items() if name in sizes}
    return float(sum(f * sizes[n] for n, f in measured.items()) / sum(sizes[n] for n in measured)) if measured else None


def markdown(bench: Bench, header: str) -> str:
    lines = [header, "", "| model | perplexity | delta | sparsity | time s | peak RSS MiB | artifact bytes | compression ratio | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in bench.rows:
        delta = "-" if r.ppl is None or bench.float_ppl is None else f"{(r.ppl / bench.float_ppl - 1) * 100:+.2f}%"
        lines.append(
            f"| {r.label} | {'-' if r.ppl is None else f'{r.ppl:.3f}'} | {delta} | "
            f"{'-' if r.sparsity is None else f'{r.sparsity:.3f}'} | {'-' if r.seconds is None else f'{r.seconds:.1f}'} | "
            f"{'-' if r.peak_rss_mib is None else f'{r.peak_rss_mib:.0f}'} | "
            f"{'-' if r.artifact_bytes is None else f'{r.artifact_bytes:,}'} | {r.ratio} | {r.note} |")
    return "\n".join(lines)


def render_from_log(args) -> None:
    """The table of the rows WORK/rows.jsonl holds (each row is appended there as soon as it is measured)."""
    bench = Bench(args.work, None, args.work / "rows.jsonl")
    seen = set()
    for line in (args.work / "rows.jsonl").read_text().splitlines():
        row = Row(**json.loads(line))
        if row.label not in seen:  # a step measured twice (two drivers) is listed once
            seen.add(row.label)
            bench.rows.append(row)
    bench.float_ppl = bench.rows[0].ppl
    header = (f"# bench.sparse — rows from {args.work / 'rows.jsonl'} (rendered {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
              f"Command: `.venv/bin/python -m bench.sparse` (graphq {args.num_samples} samples x {args.seq_len} tokens of "
              f"{args.calib.name}, seed 0; eval {args.eval_text.name}, first {args.max_tokens} tokens, windows of {args.ctx}), "
              f"rendered with `--from-log`.")
    args.results.write_text(markdown(bench, header) + "\n")
    print(markdown(bench, header))


def main() -> None:
    parser = bench_arguments(__doc__.splitlines()[0])
    parser.set_defaults(work=Path("/tmp/sparse/bench"), decode_tokens=0)
    parser.add_argument("--float-dir", type=Path, default=REPO.parent / "out" / "fp32")
    parser.add_argument("--hf-dir", type=Path, default=None, help="float HF checkpoint for llm-compressor (default: "
                        "converted from the default model's GGUF into WORK/hf)")
    parser.add_argument("--calib", type=Path, default=DATA / "sensesensibility.txt")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--skip-llmc", action="store_true")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "sparse.md")
    parser.add_argument("--from-log", action="store_true", help="only render the table from WORK/rows.jsonl (the rows "
                        "a run measured so far, e.g. one stopped before its end)")
    args = parser.parse_args()
    if args.from_log:
        render_from_log(args)
        return
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    float_dir = args.float_dir
    evaluator = Evaluator(float_dir, args)
    bench = Bench(work, evaluator, work / "rows.jsonl")
    calib = ["--calib", str(args.calib), "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len)]

    bench.float_ppl = bench.add(Row("fp32 (dense)", sparsity=0.0), float_dir).ppl
    out, s, p = bench.graphq("gptq-w4a16", "quantize", str(float_dir), "--scheme", "w4a16", "--method", "gptq", *calib)
    gptq_seconds = s
    bench.add(Row("graphq GPTQ W4A16 g128 (dense, time reference)", seconds=s, peak_rss_mib=p,
                  artifact_bytes=artifact_bytes(out), sparsity=report_sparsity(out)), out)
    out, s, p = bench.graphq("w8a8", "quantize", str(float_dir), "--scheme", "w8a8", *calib)
    w8a8_bytes = artifact_bytes(out)
    bench.add(Row("graphq W8A8 (dense)", seconds=s, peak_rss_mib=p, artifact_bytes=w8a8_bytes), out)

    targets = (("50%", ["--sparsity", "0.5"]), ("2:4", ["--sparsity-pattern", "2:4"]))
    sparsegpt_seconds = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        for tag, flags in targets:
            key = f"{method}-{tag.replace('%', '').replace(':', 'of')}"
            data = [] if method == "magnitude" else calib
            pruned, s, p = bench.graphq(f"{key}-float", "prune", str(float_dir), "--method", method, *flags, *data)
            bench.add(Row(f"graphq {method} {tag}, float", seconds=s, peak_rss_mib=p, sparsity=report_sparsity(pruned)),
                      pruned)
            out, s2, p2 = bench.graphq(f"{key}-w8a8", "quantize", str(pruned), "--scheme", "w8a8", *calib)
            bench.add(Row(f"graphq {method} {tag} + W8A8", seconds=s + s2, peak_rss_mib=max(p, p2),
                          artifact_bytes=artifact_bytes(out), sparsity=report_sparsity(out)), out)
            if method == "sparsegpt":
                out, s, p = bench.graphq(f"{key}-w4a16", "quantize", str(float_dir), "--scheme", "w4a16", "--method",
                                         "sparsegpt", *flags, *calib)
                sparsegpt_seconds[tag] = s
                bench.add(Row(f"graphq SparseGPT {tag} + W4A16 g128 (joint)", seconds=s, peak_rss_mib=p,
                              artifact_bytes=artifact_bytes(out), sparsity=report_sparsity(out),
                              note=f"{s / gptq_seconds:.2f}x GPTQ's time"), out)

    out, s, p = bench.graphq("w8a8s", "quantize", str(float_dir), "--scheme", "w8a8s", "--method", "sparsegpt",
                             "--sparsity", "0.5", "--smooth", "smoothquant", "--smooth-alpha", "auto", "--compress",
                             *calib)
    compression = json.loads((out / "w8a8sc" / "compression.json").read_text())
    sc_bytes = compression["artifact_bytes"]
    bench.add(Row("graphq W8A8S lowbit (SparseGPT 50% + GPTQ lowbit, smoothquant alpha auto)", seconds=s, peak_rss_mib=p,
                  artifact_bytes=artifact_bytes(out), sparsity=report_sparsity(out)), out)
    bench.add(Row("  its W8A8SC (--tp 1)", artifact_bytes=sc_bytes,
                  ratio=f"{compression['compression_ratio']:.3f} linears; {sc_bytes / w8a8_bytes:.3f} of W8A8 bytes",
                  note="same logits as W8A8S (checked below)"), None)

    # MindIE serves W8A8SC fp16 models: the same pair at --dtype fp16, where the float embedding weighs half as much.
    out16, s, p = bench.graphq("w8a8-fp16", "quantize", str(float_dir), "--scheme", "w8a8", "--dtype", "fp16", *calib)
    w8a8_fp16_bytes = artifact_bytes(out16)
    bench.add(Row("graphq W8A8 (dense), --dtype fp16", seconds=s, peak_rss_mib=p, artifact_bytes=w8a8_fp16_bytes), out16)
    out16, s, p = bench.graphq("w8a8s-fp16", "quantize", str(float_dir), "--scheme", "w8a8s", "--method", "sparsegpt",
                               "--sparsity", "0.5", "--smooth", "smoothquant", "--smooth-alpha", "auto", "--compress",
                               "--dtype", "fp16", *calib)
    compression16 = json.loads((out16 / "w8a8sc" / "compression.json").read_text())
    bench.add(Row("graphq W8A8S lowbit as above, --dtype fp16", seconds=s, peak_rss_mib=p,
                  artifact_bytes=artifact_bytes(out16), sparsity=report_sparsity(out16)), out16)
    bench.add(Row("  its W8A8SC (--tp 1), fp16", artifact_bytes=compression16["artifact_bytes"],
                  ratio=f"{compression16['compression_ratio']:.3f} linears; "
                        f"{compression16['artifact_bytes'] / w8a8_fp16_bytes:.3f} of W8A8 fp16 bytes"), None)

    # W8A8SC round trip on the real model: load-artifacts of the compressed folder == the W8A8S ONNX, bit for bit.
    from graphq.runtimes.ort import OrtCausalLM

    window = evaluator.windows[0]
    reference = OrtCausalLM(out).logits(window)
    identical = {}
    for tp in (1, 3):
        compressed, _, _ = bench.graphq(f"w8a8sc-tp{tp}", "compress", str(out), "--tp", str(tp))
        rebuilt, _, _ = bench.graphq(f"w8a8sc-tp{tp}-rebuilt", "load-artifacts", str(compressed))
        identical[tp] = bool(np.array_equal(OrtCausalLM(rebuilt).logits(window), reference))
    tp2 = subprocess.run([PY, "-m", "graphq", "compress", str(out), "-o", str(work / "w8a8sc-tp2"), "--tp", "2"],
                         capture_output=True, text=True, cwd=REPO)

    if not args.skip_llmc and LLMC_PY.is_file():
        from graphq.calibration_data import calibration_samples
        from graphq.tokenizer import load_tokenizer
        from graphq.model_io import model_context_length

        samples = calibration_samples(load_tokenizer(float_dir), path=str(args.calib), texts=None,
                                      num_samples=args.num_samples, seq_len=args.seq_len, seed=0, text_field="text",
                                      max_context=model_context_length(float_dir))
        np.save(work / "calib.npy", np.stack(samples).astype(np.int64))
        hf_dir = args.hf_dir or work / "hf"
        if not (hf_dir / "config.json").is_file():
            from graphq.default_model import ensure_default_model
            from graphq.export import gguf_to_checkpoint

            gguf_to_checkpoint(ensure_default_model(), hf_dir)
        exported, _, _ = bench.graphq("hf-dense-onnx", "export", str(hf_dir))
        dense = bench.evaluator.measure("hf dense", exported, None).ppl
        note = "" if abs(dense - bench.float_ppl) < 1e-3 else f"(its dense export: ppl {dense:.3f})"
        for modifier in ("sparsegpt", "wanda"):
            for tag, structure in (("50%", "0:0"), ("2:4", "2:4")):
                key = f"llmc-{modifier}-{structure.replace(':', 'of')}"
                target = work / key
                if not (target / "done.json").is_file():
                    seconds, peak = bench.run(key, [str(LLMC_PY), str(REPO / "bench" / "llmc_sparse.py"), str(hf_dir),
                                                    str(work / "calib.npy"), str(target), "--modifier", modifier,
                                                    "--structure", structure])
                    result = json.loads((work / f"{key}.log").read_text().strip().splitlines()[-1])
                    (target / "done.json").write_text(json.dumps({**result, "wall": seconds, "peak": peak}))
                result = json.loads((target / "done.json").read_text())
                onnx_dir, _, _ = bench.graphq(f"{key}-onnx", "export", str(target))
                label = {"sparsegpt": "SparseGPTModifier", "wanda": "WandaPruningModifier"}[modifier]
                bench.add(Row(f"llm-compressor {label} {tag}, float", seconds=result["seconds"],
                              peak_rss_mib=result["peak"], sparsity=result["sparsity"],
                              note=f"oneshot time (process wall {result['wall']:.0f}s) {note}"), onnx_dir)

    header = (f"# bench.sparse — {started} to {time.strftime('%H:%M UTC', time.gmtime())}\n\n"
              f"Command: `.venv/bin/python -m bench.sparse` (graphq {args.num_samples} samples x {args.seq_len} tokens "
              f"of {args.calib.name}, seed 0; eval {args.eval_text.name}, first {args.max_tokens} tokens, windows of "
              f"{args.ctx}). Float model: {float_dir}.\n\n"
              f"W8A8SC round trip on SmolLM2-135M: load-artifacts logits bit-identical to the W8A8S model: "
              f"tp 1 {identical[1]}, tp 3 {identical[3]}; tp 2: {tp2.stderr.strip().splitlines()[-1] if tp2.stderr else tp2.returncode}")
    args.results.write_text(markdown(bench, header) + "\n")
    print(markdown(bench, header))


if __name__ == "__main__":
    main()
