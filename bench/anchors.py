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

    Returns the output export folder and the quantization time in seconds (saving excluded).
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
    quantizer.process()
    seconds = time.perf_counter() - started
    out_file = output_dir / MODEL_FILENAME
    quantizer.model.save_model_to_file(str(out_file), use_external_data_format=False)
    copy_side_files(model_file.parent, output_dir)
    return output_dir, seconds
