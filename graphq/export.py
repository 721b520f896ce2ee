"""Export a Hugging Face causal LM (folder or GGUF file) to ONNX with optimum (text-generation-with-past)."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import onnx_ir as ir

from graphq.errors import GraphqError
from graphq.model_io import MODEL_FILENAME, atomic_output_dir

TASK = "text-generation-with-past"
# The legacy SentencePiece file written when a tokenizer comes from GGUF is a full copy of the GGUF file;
# the fast tokenizer (tokenizer.json) is all an export needs.
_GGUF_TOKENIZER_COPY = "tokenizer.model"


def gguf_to_checkpoint(gguf_path: Path, target_dir: Path) -> None:
    """Dequantize a GGUF file into a plain float32 Hugging Face checkpoint (safetensors) with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GraphqError(f"cannot read GGUF file {gguf_path}: {first_line}") from exc
    model.save_pretrained(str(target_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(target_dir))
    copy = target_dir / _GGUF_TOKENIZER_COPY
    if copy.exists() and (target_dir / "tokenizer.json").exists():
        copy.unlink()


def move_weights_to_external_data(model_file: Path) -> None:
    """Keep weights in model.onnx.data beside the graph, so later steps map them lazily instead of parsing them."""
    data_file = model_file.with_name(model_file.name + ".data")
    if data_file.exists():
        return
    model = ir.load(model_file)
    rewritten = model_file.with_name(".rewrite." + model_file.name)
    ir.save(model, rewritten, external_data=data_file.name)
    del model
    os.replace(rewritten, model_file)


def round_export_to_dtype(model_file: Path, dtype: str) -> None:
    """Round the exported weights to the serving dtype (kept float32 in the ONNX: onnxruntime's CPU kernels run
    float32, and fp16 graphs on CPU are partial and slow) and record it as config.json ``torch_dtype``, which
    ``quantize`` takes as its default ``--dtype``."""
    import json

    from graphq.artifacts.dtypes import TORCH_NAMES
    from graphq.passes.serving_dtype import round_initializers

    model = ir.load(model_file)
    round_initializers(model, dtype)
    # Written into a side folder under the same file names (the graph's external-data location is relative),
    # then moved over the originals: the data file being read lazily is never overwritten while in use.
    side = model_file.parent / ".dtype-rewrite"
    side.mkdir()
    data_name = model_file.name + ".data"
    ir.save(model, side / model_file.name, external_data=data_name)
    del model
    os.replace(side / data_name, model_file.with_name(data_name))
    os.replace(side / model_file.name, model_file)
    side.rmdir()
    config_file = model_file.parent / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        config["torch_dtype"] = TORCH_NAMES[dtype]
        if "dtype" in config:
            config["dtype"] = TORCH_NAMES[dtype]
        config_file.write_text(json.dumps(config, indent=2) + "\n")


def export(source: str | Path, output_dir: str | Path, opset: int | None = None, overwrite: bool = False,
           dtype: str = "fp32") -> Path:
    """Export ``source`` (a Hugging Face model folder or a .gguf file) to OUT_DIR/model.onnx with tokenizer and config.

    ``dtype`` fp16 / bf16 rounds the weights to that dtype (the graph keeps computing in float32) and writes it
    as config.json torch_dtype."""
    from graphq.artifacts.dtypes import numpy_dtype

    numpy_dtype(dtype)  # refuse an unknown dtype before exporting
    source = Path(source)
    if not source.exists():
        raise GraphqError(f"source model {source} does not exist: pass a Hugging Face model folder or a .gguf file")
    if source.is_file() and source.suffix != ".gguf":
        raise GraphqError(f"{source} is neither a model folder nor a .gguf file")
    if source.is_dir() and not (source / "config.json").is_file():
        raise GraphqError(f"{source} has no config.json: it is not a Hugging Face model folder")
    from optimum.exporters.onnx import main_export

    started = time.perf_counter()
    with atomic_output_dir(output_dir, overwrite=overwrite, inputs=[source]) as staging, tempfile.TemporaryDirectory(
        prefix="graphq-export-"
    ) as scratch:
        checkpoint = source
        if source.is_file():
            print(f"graphq: converting {source.name} to a float checkpoint", file=sys.stderr)
            checkpoint = Path(scratch) / "checkpoint"
            gguf_to_checkpoint(source, checkpoint)
        print(f"graphq: exporting {checkpoint} to ONNX ({TASK})", file=sys.stderr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("optimum").setLevel(logging.ERROR)
            try:
                main_export(
                    str(checkpoint),
                    output=str(staging),
                    task=TASK,
                    opset=opset,
                    do_validation=False,
                    device="cpu",
                )
            except GraphqError:
                raise
            except Exception as exc:
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise GraphqError(f"optimum could not export {source}: {first_line}") from exc
        if not (staging / MODEL_FILENAME).is_file():
            raise GraphqError(f"optimum wrote no {MODEL_FILENAME} for {source}")
        move_weights_to_external_data(staging / MODEL_FILENAME)
        if dtype != "fp32":
            round_export_to_dtype(staging / MODEL_FILENAME, dtype)
    print(f"graphq: exported {source} to {output_dir} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return Path(output_dir) / MODEL_FILENAME
