"""Round a float32 graph's parameters to the serving dtype (fp16 / bf16), keeping float32 compute.

onnxruntime's CPU kernels compute graphq's models in float32 (fp16 CPU kernels are partial and slow, bf16 is
missing for most ops), so "fp16 end to end" here means: every float initializer holds exactly the value the fp16
(or bf16) checkpoint holds, stored as float32. Quantization then starts from the served weights, the artifacts'
float tensors are exact casts of the graph's, and perplexity measures what the weights' dtype costs; activations
are still float32 (a runtime computing in fp16 rounds them too, which this does not model).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphq.artifacts.dtypes import numpy_dtype

_FLOAT = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE}


def round_initializers(model: ir.Model, dtype: str) -> int:
    """Round every float initializer (scalars included: fp16 checkpoints hold those too) to ``dtype`` in place,
    keeping its ONNX type; returns how many changed. One initializer is materialised at a time."""
    target = numpy_dtype(dtype)
    changed = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or value.dtype not in _FLOAT or np.dtype(tensor.dtype.numpy()) == target:
            continue
        array = tensor.numpy()
        rounded = array.astype(target).astype(array.dtype)
        if not np.array_equal(rounded, array):
            value.const_value = ir.Tensor(np.ascontiguousarray(rounded), name=value.name)
            changed += 1
    return changed
