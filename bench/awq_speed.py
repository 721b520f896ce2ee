"""AWQ speed: graphq AWQ (this tree and a baseline checkout), GPTQ and AWQ+GPTQ next to NNCF's AWQ / scale estimation
and onnxruntime's GPTQ, W4A16 g128 asym, lm_head float, on one float ONNX model and one set of calibration tokens.

    .venv/bin/python -m bench.awq_speed [--baseline-tree PATH] [--num-samples 32] [--seq-len 512]
        [--ort-gptq-samples 8] [--ort-gptq-seq-len 512] [--only KEY ...] [--skip-nncf] [--float DIR] [--work DIR]
        [--with-g64] [--from-log]

The question (AWQ speed issue): graphq AWQ no slower than NNCF's AWQ, and >= 3x faster than today's graphq (the
``--baseline-tree`` checkout) at the same accuracy. Calibration: ``--num-samples`` x ``--seq-len`` tokens of Sense and
Sensibility drawn by graphq's own sampler (graphq.calibration_data.load_calibration_samples, seed 0); the very same
ids go to NNCF as calib.npy. Evaluation: every output in onnxruntime, graphq's perplexity on Pride and Prejudice
(first 4096 tokens, windows of 512: bench.common.Evaluator).

Each quantization runs alone in its own process, and its time and peak RSS (that process's VmHWM) are its own:
graphq rows of this tree and onnxruntime rows in bench.awq_gptq's spawn child (run_isolated), the baseline row in a
child interpreter with PYTHONPATH=--baseline-tree running that tree's own bench.awq_gptq child, the NNCF rows in
bench/.nncf-venv (bench/nncf_awq.py; make it with ``bash bench/setup_peer.sh nncf``). graphq / onnxruntime seconds
are the whole quantize call (load, quantize, save); NNCF seconds are load + compress_weights + save in its process
(the note gives compress_weights alone and the process wall time, imports included).

onnxruntime's GPTQ is slow (its time grows with samples x tokens x linears) and gets fewer samples
(``--ort-gptq-samples``, same sampler); it runs symmetric unless ``--ort-gptq-asym``: onnxruntime 1.32's GPTQ packs
4-bit zero points across rows and cannot store K=576 at group 128 (5 blocks per row; bench/results/awq_gptq.md).
NNCF cannot use group 128 where K=576 (SmolLM2's hidden size) and uses 64 there; ``--with-g64`` adds graphq AWQ and
NNCF AWQ + scale estimation at group 64 on every linear, a like-for-like pair. Every finished row is appended to WORK/awq_speed/rows.jsonl; a rerun reuses a finished quantization (its done.json)
unless ``--fresh``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bench.awq_gptq import calibration_feeds, delta_percent, run_isolated
from bench.common import DATA, REPO, Evaluator, bench_arguments, float_export

GROUP = 128
NNCF_PY = REPO / "bench" / ".nncf-venv" / "bin" / "python"
NNCF_SCRIPT = REPO / "bench" / "nncf_awq.py"


@dataclass
class Variant:
    key: str  # output folder and --only target
    label: str
    tool: str  # graphq | baseline | nncf | ort
    method: str = ""  # graphq: awq|gptq|awq+gptq; ort: gptq
    nncf_args: list[str] = field(default_factory=list)
    symmetric: bool = False
    group_size: int = GROUP
    propagate: str | None = None  # graphq: --propagate (None: the default, auto)


@dataclass
class Row:
    key: str
    label: str
    ppl: float | None = None
    seconds: float | None = None
    peak_rss_mib: float | None = None
    note: str = ""
    failure: str | None = None
    load: str = ""
    outcome: dict = field(default_factory=dict)


def short_commit(tree: Path) -> str:
    done = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    commit = done.stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no", "graphq"],
                           capture_output=True, text=True).stdout.strip()
    return commit + ("+uncommitted graphq changes" if dirty else "")


def variants(args) -> list[Variant]:
    here = short_commit(REPO)
    out = [Variant("graphq-awq", f"graphq AWQ ({here}, this tree; --propagate auto = float)", "graphq", "awq"),
           Variant("graphq-awq-quantized", f"graphq AWQ --propagate quantized ({here})", "graphq", "awq",
                   propagate="quantized")]
    if args.baseline_tree is not None:
        out.append(Variant("graphq-awq-baseline", f"graphq AWQ (baseline {short_commit(args.baseline_tree)})",
                           "baseline", "awq"))
    common = ["--mode", "int4_asym", "--group-size", str(GROUP), "--ratio", "1.0"]
    nncf = [
        Variant("nncf-awq-se", "NNCF AWQ + scale estimation", "nncf", nncf_args=[*common, "--awq", "--scale-estimation"]),
        Variant("nncf-awq", "NNCF AWQ", "nncf", nncf_args=[*common, "--awq", "--no-scale-estimation"]),
        Variant("nncf-rtn", "NNCF RTN (data-free)", "nncf", nncf_args=[*common, "--data-free"]),
    ]
    # The rows the question is about first (this tree's AWQ, NNCF's), then the baseline, then GPTQ: on a loaded
    # machine an interrupted run still answers the main question (--from-log renders what finished).
    out = out[:2] + nncf + out[2:]
    out += [
        Variant("graphq-gptq", f"graphq GPTQ ({here})", "graphq", "gptq"),
        Variant("graphq-awq-gptq", f"graphq AWQ+GPTQ ({here})", "graphq", "awq+gptq"),
    ]
    if args.with_g64:  # like for like with NNCF's adjusted groups: group 64 on every linear, both tools
        out += [
            Variant("graphq-awq-g64", f"graphq AWQ g64 ({here})", "graphq", "awq", group_size=64),
            Variant("nncf-awq-se-g64", "NNCF AWQ + scale estimation g64", "nncf",
                    nncf_args=["--mode", "int4_asym", "--group-size", "64", "--ratio", "1.0", "--awq",
                               "--scale-estimation"], group_size=64),
        ]
    scheme = "asym" if args.ort_gptq_asym else "sym"
    out.append(Variant(f"ort-gptq-{scheme}", f"onnxruntime GPTQ {scheme}", "ort", "gptq", symmetric=not args.ort_gptq_asym))
    return out


def selected(key: str, only: list[str] | None, keys: list[str]) -> bool:
    """--only: a string naming a key exactly selects that key; any other string selects the keys containing it."""
    if not only:
        return True
    return any(key == s if s in keys else s in key for s in only)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------------------------------------------------------
# One quantization per process.

_BASELINE_CHILD = (
    "import json, sys\n"
    "import graphq\n"
    "from bench.awq_gptq import _child\n"
    "result = _child('graphq', json.loads(sys.argv[1]))\n"
    "result['graphq_file'] = graphq.__file__\n"
    "print('AWQ_SPEED_RESULT ' + json.dumps(result))\n"
)


def run_baseline(tree: Path, kwargs: dict) -> dict:
    """The baseline tree's own graphq (and its own bench.awq_gptq child) in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", _BASELINE_CHILD, json.dumps(kwargs)], cwd=tree, env=env,
                          capture_output=True, text=True)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("AWQ_SPEED_RESULT "):
            result = json.loads(line.split(" ", 1)[1])
            if "graphq_file" in result and not Path(result["graphq_file"]).resolve().is_relative_to(tree.resolve()):
                return {"error": f"the baseline child imported graphq from {result['graphq_file']}, not {tree}"}
            return result
    tail = (done.stderr or done.stdout).strip().splitlines()
    return {"error": f"baseline child exited {done.returncode}: {tail[-1][:200] if tail else 'no output'}"}


def run_nncf(float_dir: Path, calib_npy: Path, out_dir: Path, extra: list[str], log: Path) -> dict:
    started = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run([str(NNCF_PY), str(NNCF_SCRIPT), str(float_dir), str(calib_npy), str(out_dir),
                               "--overwrite", *extra], stdout=subprocess.PIPE, stderr=handle, text=True)
    wall = time.perf_counter() - started
    with open(log, "a") as handle:  # NNCF logs its phases (statistics, AWQ, scale estimation) on stdout
        handle.write(done.stdout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = log.read_text().strip().splitlines()
        return {"error": f"nncf_awq.py exited {done.returncode}: {tail[-1][:200] if tail else 'no output'} (see {log})"}
    result = json.loads(lines[-1])
    result["parent_wall_seconds"] = wall
    result["peak_rss_bytes"] = result["peak_rss_mib"] * 2**20
    return result


# ---------------------------------------------------------------------------------------------------------------


def markdown_table(rows: list[Row], reference: float) -> str:
    lines = [
        "| model | perplexity | delta vs fp32 | quantization s | peak RSS MiB | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if row.failure is not None:
            lines.append(f"| {row.label} | failed | - | - | - | {row.failure} |")
            continue
        seconds = "-" if row.seconds is None else f"{row.seconds:.1f}"
        rss = "-" if row.peak_rss_mib is None else f"{row.peak_rss_mib:.0f}"
        lines.append(f"| {row.label} | {row.ppl:.3f} | {delta_percent(row.ppl, reference):+.2f}% | {seconds} | {rss} "
                     f"| {row.note} |")
    return "\n".join(lines)


def summary(rows: list[Row], reference: float) -> str:
    by_key = {row.key: row for row in rows if row.ppl is not None and row.seconds is not None}
    lines = []
    base = by_key.get("graphq-awq-baseline")
    nncf = [by_key[k] for k in ("nncf-awq", "nncf-awq-se") if k in by_key]
    for ours in [by_key[k] for k in ("graphq-awq", "graphq-awq-float") if k in by_key]:
        for peer in nncf:
            ratio = ours.seconds / peer.seconds
            lines.append(f"{ours.label} takes {ratio:.2f}x the time of {peer.label} ({ours.seconds:.0f}s vs "
                         f"{peer.seconds:.0f}s; goal <= 1: {'met' if ratio <= 1 else 'NOT met'}); delta "
                         f"{delta_percent(ours.ppl, reference):+.2f}% vs {delta_percent(peer.ppl, reference):+.2f}%.")
        if base:
            speedup = base.seconds / ours.seconds
            lines.append(f"{ours.label} is {speedup:.2f}x as fast as the baseline ({ours.seconds:.0f}s vs "
                         f"{base.seconds:.0f}s; goal >= 3x: {'met' if speedup >= 3 else 'NOT met'}); delta "
                         f"{delta_percent(ours.ppl, reference):+.2f}% vs {delta_percent(base.ppl, reference):+.2f}%.")
    return "\n".join(lines)


def render_log(log: Path) -> None:
    """The table of a (possibly interrupted) run from its rows.jsonl: the last row of each key, in log order."""
    latest: dict[str, Row] = {}
    for line in log.read_text().splitlines():
        data = json.loads(line)
        data.pop("time", None)
        latest[data["key"]] = Row(**data)
    rows = list(latest.values())
    reference = latest["fp32"].ppl
    print(markdown_table(rows, reference))
    print()
    print(summary(rows, reference))


def main() -> None:
    parser = bench_arguments(__doc__.splitlines()[0])
    parser.set_defaults(decode_tokens=0)
    parser.add_argument("--float", type=Path, default=None, help="float export folder (default: WORK/fp32)")
    parser.add_argument("--calib", type=Path, default=DATA / "sensesensibility.txt", help="calibration text")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-tree", type=Path, default=None,
                        help="checkout of today's graphq (e.g. git worktree add ../wt-base 0abdd17)")
    parser.add_argument("--ort-gptq-samples", type=int, default=8)
    parser.add_argument("--ort-gptq-seq-len", type=int, default=512)
    parser.add_argument("--ort-gptq-asym", action="store_true")
    parser.add_argument("--skip-nncf", action="store_true")
    parser.add_argument("--with-g64", action="store_true",
                        help="also graphq AWQ and NNCF AWQ+SE at group 64 everywhere (NNCF cannot do 128 on K=576)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only these variants: exact keys, or parts of keys (graphq-awq, graphq-awq-baseline, "
                             "nncf-awq-se, nncf-awq, nncf-rtn, graphq-gptq, graphq-awq-gptq, ort-gptq-sym|asym, "
                             "with --with-g64 graphq-awq-g64, nncf-awq-se-g64)")
    parser.add_argument("--fresh", action="store_true", help="requantize rows that already have a done.json")
    parser.add_argument("--from-log", action="store_true", help="only render WORK/awq_speed/rows.jsonl (last row per key)")
    args = parser.parse_args()
    args.calib = args.calib.resolve()
    if args.baseline_tree is not None:
        args.baseline_tree = args.baseline_tree.resolve()
        if not (args.baseline_tree / "graphq" / "__init__.py").is_file():
            parser.error(f"--baseline-tree {args.baseline_tree} has no graphq/ package")

    args.work.mkdir(parents=True, exist_ok=True)
    float_dir = (args.float or float_export(args.work)).resolve()
    runs = args.work / "awq_speed"
    runs.mkdir(parents=True, exist_ok=True)
    log = runs / "rows.jsonl"
    if args.from_log:
        render_log(log)
        return

    chosen = [v for v in variants(args) if selected(v.key, args.only, [x.key for x in variants(args)])]
    if args.baseline_tree is None and (not args.only or any("baseline" in s for s in args.only)):
        print("graphq AWQ baseline row skipped: pass --baseline-tree PATH (a checkout of today's graphq)", flush=True)
    if any(v.tool == "nncf" for v in chosen) and (args.skip_nncf or not NNCF_PY.is_file()):
        if not args.skip_nncf:
            print(f"NNCF rows skipped: {NNCF_PY.parent.parent} not found; make it with `bash bench/setup_peer.sh nncf`",
                  flush=True)
        chosen = [v for v in chosen if v.tool != "nncf"]

    from graphq import QuantConfig
    from graphq.calibration_data import load_calibration_samples

    config = QuantConfig(scheme="w4a16", group_size=GROUP, symmetric=False, method="awq", calib=str(args.calib),
                         num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed)
    samples = load_calibration_samples(float_dir / "model.onnx", config)  # exactly what quantize() draws
    calib_npy = runs / "calib.npy"
    np.save(calib_npy, np.stack(samples).astype(np.int64))
    print(f"float model {float_dir}; calibration {args.calib.name}: {len(samples)} x {args.seq_len} tokens (seed "
          f"{args.seed}) -> {calib_npy}; eval {args.eval_text.name}, first {args.max_tokens} tokens, windows of "
          f"{args.ctx}; load average {load_average()}", flush=True)

    evaluator = Evaluator(float_dir, args)
    reference = evaluator.measure("fp32", float_dir, None).ppl
    rows = [Row("fp32", "fp32", reference, load=load_average())]
    with open(log, "a") as handle:
        handle.write(json.dumps({**asdict(rows[0]), "time": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    feeds = None

    for variant in chosen:
        out_dir = runs / variant.key
        done_file = runs / f"{variant.key}.done.json"
        row = Row(variant.key, variant.label, load=load_average())
        print(f"{variant.label} ... (load {row.load})", flush=True)
        if done_file.is_file() and (out_dir / "model.onnx").is_file() and not args.fresh:
            outcome = json.loads(done_file.read_text())
            print("  reusing its finished quantization", flush=True)
        else:
            shutil.rmtree(out_dir, ignore_errors=True)
            graphq_kwargs = dict(float_dir=str(float_dir), out_dir=str(out_dir), method=variant.method,
                                 symmetric=variant.symmetric, calib=str(args.calib), num_samples=args.num_samples,
                                 seq_len=args.seq_len, seed=args.seed)
            if variant.group_size != GROUP:
                graphq_kwargs["group_size"] = variant.group_size
            if variant.propagate is not None:
                graphq_kwargs["propagate"] = variant.propagate
            if variant.tool == "graphq":
                outcome = run_isolated("graphq", graphq_kwargs)
            elif variant.tool == "baseline":
                outcome = run_baseline(args.baseline_tree, graphq_kwargs)
            elif variant.tool == "nncf":
                outcome = run_nncf(float_dir, calib_npy, out_dir, variant.nncf_args, runs / f"{variant.key}.log")
            else:
                if feeds is None:
                    feeds = calibration_feeds(float_dir, args.calib, args.ort_gptq_samples, args.ort_gptq_seq_len,
                                              args.seed)
                outcome = run_isolated("ort", dict(float_dir=str(float_dir), out_dir=str(out_dir), method="gptq",
                                                   symmetric=variant.symmetric, gptq_feeds=feeds))
            if "error" not in outcome:
                done_file.write_text(json.dumps(outcome))
        row.outcome = {k: v for k, v in outcome.items() if k != "traceback"}
        if variant.tool == "ort":
            row.note = f"{args.ort_gptq_samples} samples x {args.ort_gptq_seq_len} tokens"
            if variant.symmetric:
                row.note += "; sym: onnxruntime's GPTQ cannot pack asym zero points for K=576 at g128"
            row.note += "; its output does not depend on the calibration data (bench/results/awq_speed.md)"
        elif variant.tool == "nncf" and "error" not in outcome:
            blocks = outcome.get("block_sizes", [])
            row.note = (f"compress_weights {outcome['compress_seconds']:.1f}s, process {outcome['process_seconds']:.0f}s; "
                        f"groups {'/'.join(str(b) for b in blocks)}")
            if len(blocks) > 1:
                row.note += " (NNCF needs K divisible: 64 for K=576)"
            if outcome.get("subset_size"):
                row.note = f"subset_size {outcome['subset_size']}; " + row.note
        if "error" in outcome:
            row.failure = outcome["error"]
            print(f"  failed: {row.failure}", flush=True)
            if outcome.get("traceback"):
                print("    " + outcome["traceback"].strip().splitlines()[-1], flush=True)
        else:
            row.seconds = outcome["seconds"]
            row.peak_rss_mib = outcome["peak_rss_bytes"] / 2**20
            print(f"  quantized in {row.seconds:.1f}s, peak RSS {row.peak_rss_mib:.0f} MiB", flush=True)
            try:
                row.ppl = evaluator.measure(variant.label, out_dir, row.seconds).ppl
            except Exception as exc:  # a model onnxruntime cannot load or run
                row.failure = "evaluation: " + f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:200]
                print(f"  {row.failure}", flush=True)
        rows.append(row)
        with open(log, "a") as handle:
            handle.write(json.dumps({**asdict(row), "time": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")

    print()
    print(f"SmolLM2-135M W4A16 g{GROUP} asym, lm_head and embedding float; calibration {args.calib.name}, "
          f"{len(samples)} x {args.seq_len} tokens (graphq's sampler, seed {args.seed}; NNCF gets the same ids); "
          f"eval {args.eval_text.name}, first {args.max_tokens} tokens, windows of {args.ctx}; load average at the "
          f"end {load_average()}")
    print()
    table = markdown_table(rows, reference)
    print(table)
    print()
    print(summary(rows, reference))
    (runs / "table.md").write_text(table + "\n\n" + summary(rows, reference) + "\n")


if __name__ == "__main__":
    main()
