"""W8A8SC on the real SmolLM2-135M (9 attention heads, 3 key/value heads): compress -> load-artifacts gives the W8A8S
model's logits bit for bit for --tp 1 and 3, and --tp 2 is refused naming the heads it does not divide.

The float export is GRAPHQ_FP32 when set (an existing export folder), else the session's smollm2 fixture."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from graphq import QuantConfig, quantize
from graphq.artifacts.reader import open_artifacts
from graphq.artifacts.w8a8sc import compress, open_compressed
from graphq.artifacts.rebuild import load_artifacts
from graphq.errors import GraphqError
from graphq.runtimes.ort import OrtCausalLM

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def fp32(request) -> Path:
    given = os.environ.get("GRAPHQ_FP32")
    if given and (Path(given) / "model.onnx").is_file():
        return Path(given)
    return request.getfixturevalue("smollm2")["onnx"]


def test_w8a8sc_round_trip_on_smollm2(fp32, tmp_path):
    w8a8s = tmp_path / "w8a8s"
    quantize(fp32, QuantConfig(scheme="w8a8s", method="magnitude", sparsity_pattern="2:4", num_samples=2, seq_len=64),
             w8a8s, progress=False)
    original = open_artifacts(w8a8s)
    ids = np.arange(10, 42)
    reference = OrtCausalLM(w8a8s).logits(ids)
    for tp in (1, 3):
        compressed = compress(w8a8s, tmp_path / f"sc{tp}", tp=tp, progress=False)
        merged = open_compressed(compressed)
        assert set(merged.layers) == set(original.layers) and len(merged.layers) == 210
        for name in merged.layers:
            for suffix in ("weight", "deq_scale", "input_scale", "input_offset", "quant_bias"):  # quant_bias last: it frees the layer
                np.testing.assert_array_equal(merged.store.get(f"{name}.{suffix}"), original.store.get(f"{name}.{suffix}"))
    rebuilt = load_artifacts(tmp_path / "sc3", tmp_path / "rebuilt")
    np.testing.assert_array_equal(OrtCausalLM(rebuilt.parent).logits(ids), reference)
    with pytest.raises(GraphqError, match="--tp 2 does not divide the 9 attention heads"):
        compress(w8a8s, tmp_path / "sc2", tp=2, progress=False)
    assert not (tmp_path / "sc2").exists()
