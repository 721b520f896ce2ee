"""The anchors graphq is measured against, run in the same process: onnxruntime.quantization's quantizers."""

from __future__ import annotations

import time
from pathlib import Path

import onnx
import onnx_ir as ir

from graphq.linear_layers import find_linear_layers
from graphq.model_io import MODEL_FILENAME, copy_side_files, resolve_model_file


def lm_head_node_names(model_file: Path) -> list[str]:
    return [layer.node.name for layer in find_linear_layers(ir.load(model_file)) if layer.role == "lm_head"]


def _exclude_from_int4_algorithms(quantizer, exclude: list[str]) -> None:
    """Make onnxruntime's GPTQ path honour ``nodes_to_exclude``.

    MatMulNBitsQuantizer marks excluded nodes as "fp32" in the per-node weight config only for RTN and k-quant;
    for GPTQ it builds the same config but never marks them, so lm_head would be quantized regardless.
    """
    generate = quantizer._generate_q4_node_config

    def generate_with_exclusions():
        config = generate()
        for name in exclude:
            config[name] = "fp32"
        return config

    quantizer._generate_q4_node_config = generate_with_exclusions


def save_quantizer_model(model, out_file: Path) -> None:
    """Save what a quantizer produced: an onnxruntime/INC ONNXModel wrapper or a bare ModelProto."""
    if isinstance(model, onnx.ModelProto):
        onnx.save_model(model, str(out_file))
    elif hasattr(model, "save_model_to_file"):
        model.save_model_to_file(str(out_file), use_external_data_format=False)
    elif hasattr(model, "model") and isinstance(model.model, onnx.ModelProto):
        onnx.save_model(model.model, str(out_file))
    else:
        raise TypeError(f"don't know how to save a {type(model).__name__}")


def ort_matmulnbits(
    model_path: str | Path,
    output_dir: str | Path,
    bits: int = 4,
    block_size: int = 128,
    symmetric: bool = False,
    quantize_lm_head: bool = False,
    algo_config=None,
    quant_format: str = "QOperator",
) -> tuple[Path, float]:
    """onnxruntime's MatMulNBitsQuantizer (its default algorithm unless ``algo_config`` names another).

    ``block_size`` is the quantization group size for every algorithm (for GPTQ the algo_config's own block_size is
    GPTQ's column block). Returns the output export folder and the quantization time in seconds (loading included,
    saving excluded).
    """
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model_file = resolve_model_file(model_path)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=False)
    exclude = [] if quantize_lm_head else lm_head_node_names(model_file)
    started = time.perf_counter()
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(model_file)),
        bits=bits,
        block_size=block_size,
        is_symmetric=symmetric,
        nodes_to_exclude=exclude,
        algo_config=algo_config,
        quant_format=getattr(QuantFormat, quant_format),
    )
    _exclude_from_int4_algorithms(quantizer, exclude)
    quantizer.process()
    seconds = time.perf_counter() - started
    save_quantizer_model(quantizer.model, output_dir / MODEL_FILENAME)
    copy_side_files(model_file.parent, output_dir)
    return output_dir, seconds
