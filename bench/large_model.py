"""A model over 2 GB: a random-weight Llama with TinyLlama-1.1B's shape, quantized with RTN, AWQ and GPTQ.

    .venv/bin/python -m bench.large_model [--work out/bench] [--methods rtn awq gptq] [--num-samples 8] [--seq-len 128]

The model is built from its config, no download: hidden 2048, 22 decoder layers, intermediate 5632, 32 heads,
4 key/value heads, SmolLM2's tokenizer and vocabulary (49152) so the calibration text tokenizes: 1.16 G parameters,
4.6 GB of fp32 weights, exported by optimum with external data. Each method is one `graphq quantize` process under
/usr/bin/time -v (its peak RSS), with its report's time per decoder layer. Random weights make no accuracy claim;
the numbers are memory and time. Goal (issue 14): peak RSS <= 2x the float model plus one layer's calibration
activations. The extrapolation scales the time per decoder layer by the weights per layer (the searches and the
slice runs are linear in them at a fixed token count) and the layer count; on N Ray workers (--workers N) the
capture part divides by N, the search part does not.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from bench.common import DATA, bench_arguments, float_export

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, max_position_embeddings=2048)
# (hidden, intermediate, layers, kv heads / heads) of the models users bring
TARGETS = {"Llama-2-7B": (4096, 11008, 32, 1.0), "Llama-2-13B": (5120, 13824, 40, 1.0), "Llama-2-70B": (8192, 28672, 80, 0.125)}


def layer_weights(hidden: int, intermediate: int, kv_ratio: float) -> float:
    return 2 * hidden * hidden + 2 * hidden * hidden * kv_ratio + 3 * hidden * intermediate


def build(work: Path) -> Path:
    """The random model's ONNX export (reused when present)."""
    from graphq.export import export

    onnx_dir = work / "large" / "fp32"
    if (onnx_dir / "model.onnx").is_file():
        return onnx_dir
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer_dir = float_export(work)
    hf = work / "large" / "hf"
    if not (hf / "model.safetensors.index.json").is_file() and not (hf / "model.safetensors").is_file():
        torch.manual_seed(0)
        config = LlamaConfig(**SHAPE, vocab_size=49152, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        model = AutoModelForCausalLM.from_config(config).eval()
        model.save_pretrained(hf, safe_serialization=True)
        del model
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(tokenizer_dir / name, hf / name)
    export(hf, onnx_dir, overwrite=True)
    return onnx_dir


def peak_rss_mib(time_output: str) -> float:
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_output)
    return int(match.group(1)) / 1024 if match else float("nan")


def main() -> None:
    parser = bench_arguments(__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=["rtn", "awq", "gptq"])
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    model = build(args.work)
    weights = sum(p.stat().st_size for p in model.iterdir() if p.name.startswith("model.onnx"))
    print(f"float model: {weights / 2**30:.2f} GiB ({model})", flush=True)
    rows = []
    for method in args.methods:
        out = args.work / "large" / method
        command = [sys.executable, "-m", "graphq", "quantize", str(model), "-o", str(out), "--overwrite", "--quiet",
                   "--method", method, "--group-size", "128", "--calib", str(DATA / "sensesensibility.txt"),
                   "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len), "--save-format", "onnx"]
        done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"{method} failed")
        report = json.loads((out / "report.json").read_text())
        per_layer = report.get("seconds_per_decoder_layer", {})
        capture = sum(t["capture"] for t in per_layer.values()) / max(len(per_layer), 1)
        search = sum(t["search"] for t in per_layer.values()) / max(len(per_layer), 1)
        rows.append((method, report["elapsed_seconds"], peak_rss_mib(done.stderr), report["peak_rss_bytes"] / 2**20,
                     capture, search, report["model_bytes_after"] / 2**20))
        shutil.rmtree(out / "stages", ignore_errors=True)
        print(f"  {method}: {report['elapsed_seconds']:.0f} s, peak {rows[-1][2]:.0f} MiB", flush=True)
    print(f"\nRandom Llama, TinyLlama-1.1B shape, {weights / 2**30:.2f} GiB fp32; calibration {args.num_samples} x "
          f"{args.seq_len} tokens of Sense and Sensibility; W4A16 g128 asym; lm_head float.\n")
    print("| method | quantize s | peak RSS MiB (time -v) | VmHWM MiB (report) | peak / float | capture s/layer | "
          "search s/layer | output MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for method, seconds, rss, hwm, capture, search, size in rows:
        print(f"| {method} | {seconds:.0f} | {rss:.0f} | {hwm:.0f} | {rss * 2**20 / weights:.2f}x | {capture:.1f} | "
              f"{search:.1f} | {size:.0f} |")
    base = layer_weights(SHAPE["hidden_size"], SHAPE["intermediate_size"],
                         SHAPE["num_key_value_heads"] / SHAPE["num_attention_heads"])
    print("\nExtrapolation (hours on this machine, and with the capture part on N Ray workers), from the rows above:\n")
    print("| model | method | 1 machine h | 4 workers h | 16 workers h |")
    print("|---|---|---:|---:|---:|")
    for name, (hidden, intermediate, layers, kv) in TARGETS.items():
        scale = layer_weights(hidden, intermediate, kv) / base
        for method, _, _, _, capture, search, _ in rows:
            if not capture and not search:
                continue
            hours = [layers * scale * (capture / n + search) / 3600 for n in (1, 4, 16)]
            print(f"| {name} | {method} | {hours[0]:.1f} | {hours[1]:.1f} | {hours[2]:.1f} |")


if __name__ == "__main__":
    main()
