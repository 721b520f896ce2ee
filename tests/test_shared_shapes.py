"""Sharing the decoder layers' shape arithmetic: fewer ops, the same function, bit for bit."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graphq.model_io import load_model, save_model
from graphq.passes.shared_shapes import same_declared_shape, share_layer_shapes
from graphq.runtimes.ort import OrtCausalLM


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_shared_shapes_keep_logits_and_cached_decoding_bit_identical(tiny_models, tmp_path, kind):
    source = tiny_models[kind]["onnx"]
    model = load_model(source / "model.onnx")
    before = len(list(model.graph))
    shapes_before = sum(node.op_type == "Shape" for node in model.graph)
    moved = share_layer_shapes(model)
    after = len(list(model.graph))
    assert moved > 0 and after < before
    assert sum(node.op_type == "Shape" for node in model.graph) < shapes_before
    save_model(model, tmp_path / "model.onnx")
    for side in source.iterdir():
        if side.suffix == ".json" or side.name.startswith("tokenizer"):
            (tmp_path / side.name).write_bytes(side.read_bytes())
    original, shared = OrtCausalLM(source), OrtCausalLM(tmp_path)
    ids = np.arange(3, 40)
    np.testing.assert_array_equal(original.logits(ids), shared.logits(ids))
    assert original.greedy_decode(ids[:9], 12) == shared.greedy_decode(ids[:9], 12)


def test_only_fully_declared_equal_shapes_count_as_the_same():
    batch, past = ir.SymbolicDim("batch"), ir.SymbolicDim("past")

    def value(*dims, dtype=ir.DataType.FLOAT):
        return ir.Value(name="v", shape=ir.Shape(list(dims)), type=ir.TensorType(dtype))

    assert same_declared_shape(value(batch, 2, past, 16), value(ir.SymbolicDim("batch"), 2, ir.SymbolicDim("past"), 16))
    assert not same_declared_shape(value(batch, 2, past, 16), value(batch, 4, past, 16))  # other kv heads
    assert not same_declared_shape(value(batch, 2, ir.SymbolicDim(None), 16), value(batch, 2, ir.SymbolicDim(None), 16))
    assert not same_declared_shape(value(batch, 2, past, 16), value(batch, 2, past, 16, dtype=ir.DataType.FLOAT16))
    assert not same_declared_shape(value(batch, 2, past, 16), value(batch, 2, past))
