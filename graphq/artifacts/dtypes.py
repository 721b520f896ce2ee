"""Serving dtypes: the float type a runtime computes in, which the artifacts' float tensors and scales are written in.

onnxruntime on CPU computes graphq's ONNX models in float32 (its fp16 kernels on CPU are partial and slow, bf16 is
missing for most ops), so a fp16/bf16 serving dtype changes the *stored* values (rounded to that dtype) and the
names runtimes read (config.json ``torch_dtype``), not the ONNX compute type.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from graphq.errors import GraphqError

#: --dtype value -> numpy dtype (bfloat16 from ml_dtypes, which onnx and onnx_ir already use).
SERVING_DTYPES: dict[str, np.dtype] = {
    "fp32": np.dtype(np.float32),
    "fp16": np.dtype(np.float16),
    "bf16": np.dtype(ml_dtypes.bfloat16),
}
#: --dtype value -> the name transformers and MindIE read in config.json ``torch_dtype``.
TORCH_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_OF_TORCH_NAME = {name: key for key, name in TORCH_NAMES.items()}


def numpy_dtype(dtype: str) -> np.dtype:
    if dtype not in SERVING_DTYPES:
        raise GraphqError(f"unknown dtype '{dtype}': choose one of {', '.join(SERVING_DTYPES)}")
    return SERVING_DTYPES[dtype]


def dtype_of_numpy(dtype: np.dtype) -> str:
    """np.float16 -> 'fp16' (float64 and anything else float -> 'fp32')."""
    for key, value in SERVING_DTYPES.items():
        if np.dtype(dtype) == value:
            return key
    return "fp32"


def dtype_of_config(config: dict) -> str | None:
    """The serving dtype a Hugging Face config.json names (``torch_dtype``, or ``dtype`` in newer transformers)."""
    name = config.get("torch_dtype") or config.get("dtype")
    return _OF_TORCH_NAME.get(name) if isinstance(name, str) else None


def cast(array: np.ndarray, dtype: str) -> np.ndarray:
    """Round ``array`` to the serving dtype (round to nearest even, as torch's .to() does)."""
    return np.ascontiguousarray(np.asarray(array).astype(numpy_dtype(dtype)))


def resolve_serving_dtype(explicit: str | None, source_config: dict, onnx_dtype: np.dtype, accepted: tuple[str, ...],
                          target_name: str) -> tuple[str, str | None]:
    """-> (serving dtype, warning or None): ``--dtype``, else the source's config.json torch_dtype (set by
    'graphq export --dtype'), else the ONNX float type. A default the target's runtime does not accept is kept
    (changing a default's numerics silently would surprise more) but warned about; an explicit one was refused
    by QuantConfig.validate already."""
    if explicit is not None:
        return explicit, None
    dtype = dtype_of_config(source_config) or dtype_of_numpy(onnx_dtype)
    if dtype_of_numpy(onnx_dtype) == "fp16" and dtype == "fp32":
        dtype = "fp16"  # an fp16 ONNX model serves fp16 whatever its copied config.json says
    warning = None
    if dtype not in accepted:
        warning = (f"--target {target_name}'s runtime serves {' or '.join(accepted)}, but the artifacts are {dtype}: "
                   f"pass --dtype {accepted[0]} (or export with --dtype {accepted[0]})")
    return dtype, warning
