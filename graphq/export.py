"""Export a Hugging Face causal LM (folder or GGUF file) to ONNX with optimum (text-generation-with-past)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

import onnx_ir as ir

from graphq.errors import GraphqError
from graphq.model_io import MODEL_FILENAME, atomic_output_dir, inline_external_attributes

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


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.h5", "*.msgpack")


def check_weights_are_safetensors(folder: Path) -> None:
    """A Hugging Face folder must hold safetensors weights: graphq never unpickles files from a user's path
    (a pickle runs code when loaded), and TensorFlow/Flax checkpoints would need frameworks graphq does not ship."""
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    others = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
    if others:
        raise GraphqError(
            f"{folder} holds its weights only as {', '.join(others[:3])} (pickle or another framework's format), which "
            "graphq does not load: convert them to safetensors (model.save_pretrained(dir, safe_serialization=True) "
            "where you trust the file) and export that folder"
        )
    if any(folder.glob("*.onnx")):
        raise GraphqError(f"{folder} is already an ONNX export: pass it to 'graphq quantize' (export takes a Hugging Face folder)")
    raise GraphqError(f"{folder} has a config.json but no *.safetensors weights: copy the whole model folder")


def check_opset(opset: int | None) -> None:
    """The opsets torch's ONNX exporter (used by optimum) can write; others fail deep inside it."""
    if opset is None:
        return
    from torch.onnx import _constants

    low, high = _constants.ONNX_MIN_OPSET, _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    if not low <= opset <= high:
        raise GraphqError(f"--opset {opset} is not supported by the exporter: choose an opset from {low} to {high}")


@contextlib.contextmanager
def stdout_silenced() -> Iterator[None]:
    """Send file descriptor 1 to /dev/null: torch's C++ exporter dumps its whole IR graph there on failure, which
    would bury graphq's one error line (and pollute a caller's parsed stdout)."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def move_weights_to_external_data(model_file: Path) -> None:
    """Keep weights in model.onnx.data beside the graph, so later steps map them lazily instead of parsing them."""
    data_file = model_file.with_name(model_file.name + ".data")
    if data_file.exists():
        return
    model = ir.load(model_file)
    inline_external_attributes(model)  # optimum's model.onnx_data (over 2 GB) then holds nothing the graph reads
    sources = {Path(v.const_value.path) for v in model.graph.initializers.values()
               if isinstance(v.const_value, ir.ExternalTensor)}
    rewritten = model_file.with_name(".rewrite." + model_file.name)
    ir.save(model, rewritten, external_data=data_file.name)
    del model
    os.replace(rewritten, model_file)
    for source in sources:  # the exporter's own data file: every tensor of it is in model.onnx.data now
        if source.resolve() != data_file.resolve() and source.parent.resolve() == model_file.parent.resolve():
            source.unlink(missing_ok=True)


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
    if source.is_dir():
        check_weights_are_safetensors(source)
    check_opset(opset)
    from optimum.exporters.onnx import main_export

    started = time.perf_counter()
    with atomic_output_dir(output_dir, overwrite=overwrite, inputs=[source]) as staging:
        # The GGUF's float checkpoint (as large as the model) lives inside the staging folder, so that whatever ends
        # the run (an error, SIGTERM, kill -9 and the next run's stale-staging cleanup) removes it with the folder.
        scratch = staging / ".export-scratch"
        checkpoint = source
        if source.is_file():
            print(f"graphq: converting {source.name} to a float checkpoint", file=sys.stderr)
            checkpoint = scratch / "checkpoint"
            gguf_to_checkpoint(source, checkpoint)
        print(f"graphq: exporting {checkpoint} to ONNX ({TASK})", file=sys.stderr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("optimum").setLevel(logging.ERROR)
            try:
                with stdout_silenced():
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
        shutil.rmtree(scratch, ignore_errors=True)
        if not (staging / MODEL_FILENAME).is_file():
            raise GraphqError(f"optimum wrote no {MODEL_FILENAME} for {source}")
        move_weights_to_external_data(staging / MODEL_FILENAME)
        if dtype != "fp32":
            round_export_to_dtype(staging / MODEL_FILENAME, dtype)
    print(f"graphq: exported {source} to {output_dir} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return Path(output_dir) / MODEL_FILENAME
