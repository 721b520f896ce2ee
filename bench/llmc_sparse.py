"""One llm-compressor pruning run, inside bench/.llmc-venv (never imported by graphq or its venv).

    bench/.llmc-venv/bin/python bench/llmc_sparse.py HF_DIR CALIB.npy OUT_DIR --modifier sparsegpt|wanda --structure 0:0|2:4

Loads the float Hugging Face checkpoint, prunes every decoder linear (lm_head left dense) with llm-compressor's
SparseGPTModifier or WandaPruningModifier at 50% (structure "0:0": unstructured, or "2:4") on the calibration token
sequences graphq uses (CALIB.npy: int64 [samples, seq_len], written by bench/sparse.py), saves an uncompressed
checkpoint and prints one JSON line {"seconds": ..., "peak_rss_mib": ...} (the oneshot call; peak = this process).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

# Run as a script, this file's folder (bench/) is sys.path[0], where bench/compressed_tensors.py would shadow the
# compressed_tensors package (llm-compressor imports it) and any other bench module a same-named one: drop it.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dir")
    parser.add_argument("calib")
    parser.add_argument("out_dir")
    parser.add_argument("--modifier", choices=("sparsegpt", "wanda"), required=True)
    parser.add_argument("--structure", default="0:0")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--damp", type=float, default=0.01)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    ids = np.load(args.calib)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
    common = dict(sparsity=args.sparsity, mask_structure=args.structure, targets=["Linear"], ignore=["re:.*lm_head"])
    if args.modifier == "sparsegpt":
        recipe = SparseGPTModifier(**common, dampening_frac=args.damp, block_size=128)
    else:
        recipe = WandaPruningModifier(**common)
    started = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=len(ids), max_seq_length=ids.shape[1],
            tokenizer=tokenizer)
    seconds = time.perf_counter() - started
    model.save_pretrained(args.out_dir, safe_serialization=True)
    tokenizer.save_pretrained(args.out_dir)
    zeros = total = 0
    for name, param in model.named_parameters():
        if name.endswith(".weight") and param.ndim == 2 and "lm_head" not in name and "embed" not in name:
            zeros += int((param == 0).sum())
            total += param.numel()
    print(json.dumps({"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "sparsity": zeros / total}))


if __name__ == "__main__":
    main()
