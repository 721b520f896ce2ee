"""Attention fused into GroupQueryAttention: the same function as the exported attention, prefill, cached decode,
chunked continuation and right-padded batches; wired through quantize and load-artifacts; bad input refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from graphq import QuantConfig, quantize
from graphq.artifacts.rebuild import load_artifacts
from graphq.errors import GraphqError
from graphq.model_io import load_model, save_model
from graphq.passes.fuse_attention import attention_spec, fuse_attention
from graphq.runtimes.ort import OrtCausalLM


def _fused_copy(source, target):
    model = load_model(source / "model.onnx")
    before = len(list(model.graph))
    fused = fuse_attention(model, attention_spec(json.loads((source / "config.json").read_text())))
    save_model(model, target / "model.onnx")
    for side in source.iterdir():
        if side.suffix == ".json":
            shutil.copy2(side, target / side.name)
    return fused, before, model


def _run(session: OrtCausalLM, ids, mask, past=None):
    feeds = session._feeds(ids, past, 0 if past is None else next(iter(past.values())).shape[2])
    feeds["attention_mask"] = mask
    names = ["logits", *session._present_for.values()]
    outputs = session.session.run(names, feeds)
    return outputs[0], dict(zip(session._past_specs, outputs[1:]))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fused_attention_computes_what_the_export_computes(tiny_models, tmp_path, kind):
    source = tiny_models[kind]["onnx"]
    fused, before, model = _fused_copy(source, tmp_path)
    assert fused == 2  # both layers
    assert sum(node.op_type == "GroupQueryAttention" for node in model.graph) == 2
    assert len(list(model.graph)) < before / 2
    original, rewritten = OrtCausalLM(source), OrtCausalLM(tmp_path)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 90, size=(1, 23))
    ones = np.ones((1, 23), dtype=np.int64)
    want, want_past = _run(original, ids, ones)
    got, got_past = _run(rewritten, ids, ones)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    for name in want_past:
        np.testing.assert_allclose(got_past[name], want_past[name], atol=1e-5, rtol=1e-5)
    # A chunk of 5 tokens on top of the 23 cached ones, then a single token (the decode step).
    for new in (5, 1):
        more = rng.integers(3, 90, size=(1, new))
        mask = np.ones((1, want_past[next(iter(want_past))].shape[2] + new), dtype=np.int64)
        want, want_past = _run(original, more, mask, want_past)
        got, got_past = _run(rewritten, more, mask, got_past)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    prompt = ids[0, :9]
    assert original.greedy_decode(prompt, 12) == rewritten.greedy_decode(prompt, 12)


def test_right_padded_rows_get_their_own_lengths(tiny_models, tmp_path):
    source = tiny_models["llama"]["onnx"]
    _fused_copy(source, tmp_path)
    original, rewritten = OrtCausalLM(source), OrtCausalLM(tmp_path)
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 90, size=(2, 12))
    mask = np.ones((2, 12), dtype=np.int64)
    mask[1, 7:] = 0  # the second row is 7 tokens, padded on the right
    want, _ = _run(original, ids, mask)
    got, _ = _run(rewritten, ids, mask)
    np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got[1, :7], want[1, :7], atol=1e-4, rtol=1e-4)
    alone, _ = _run(original, ids[1:, :7], np.ones((1, 7), dtype=np.int64))
    np.testing.assert_allclose(got[1, :7], alone[0], atol=1e-4, rtol=1e-4)


def test_rotary_tables_follow_transformers_rope_scaling():
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=500000.0, rope_scaling=scaling)
    spec = attention_spec(config.to_dict())
    positions = torch.arange(256)[None]
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, 256, 16), positions)
    assert (spec.num_heads, spec.kv_heads, spec.head_dim) == (4, 2, 16)
    np.testing.assert_allclose(spec.rotary_cos, cos[0, :, :8].numpy(), atol=1e-5)
    np.testing.assert_allclose(spec.rotary_sin, sin[0, :, :8].numpy(), atol=1e-5)
    assert spec.scale == pytest.approx(0.25)


def test_quantize_and_load_artifacts_write_the_fused_model(tiny_models, tmp_path):
    source = tiny_models["qwen2"]["onnx"]
    plain = quantize(source, QuantConfig(), tmp_path / "plain", progress=False).output_dir
    fused = quantize(source, QuantConfig(fuse_attention=True), tmp_path / "fused", progress=False).output_dir
    report = json.loads((fused / "report.json").read_text())
    assert report["attention_fused_layers"] == 2 and "attention_fused_layers" not in json.loads(
        (plain / "report.json").read_text())
    ids = np.arange(3, 40)
    np.testing.assert_allclose(OrtCausalLM(fused).logits(ids), OrtCausalLM(plain).logits(ids), atol=1e-4, rtol=1e-4)
    rebuilt = load_artifacts(fused, tmp_path / "rebuilt").parent  # fuses as the quantize run did
    assert sum(n.op_type == "GroupQueryAttention" for n in load_model(rebuilt / "model.onnx").graph) == 2
    np.testing.assert_array_equal(OrtCausalLM(rebuilt).logits(ids), OrtCausalLM(fused).logits(ids))
    unfused = load_artifacts(fused, tmp_path / "unfused", fuse=False).parent
    assert not any(n.op_type == "GroupQueryAttention" for n in load_model(unfused / "model.onnx").graph)


def test_bad_input_is_refused_before_any_work(tiny_models, tmp_path):
    source = tiny_models["llama"]["onnx"]
    with pytest.raises(GraphqError, match="--kv-cache"):
        QuantConfig(fuse_attention=True, kv_cache="int8", scheme="w8a8").validate()
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    for side in source.iterdir():
        if side.name != "config.json":
            shutil.copy2(side, no_config / side.name)
    with pytest.raises(GraphqError, match="config.json"):
        quantize(no_config, QuantConfig(fuse_attention=True), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    config = json.loads((source / "config.json").read_text())
    with pytest.raises(GraphqError, match="rope type 'dynamic'"):
        attention_spec({**config, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})


def _family_export(kind: str, tiny_models, root):
    import torch
    from transformers import AutoModelForCausalLM, GemmaConfig, Phi3Config, Qwen3Config, StableLmConfig

    from graphq.export import export

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    config = {"phi3": lambda: Phi3Config(**common, pad_token_id=0),  # fused qkv_proj and gate_up_proj
              "gemma": lambda: GemmaConfig(**common, head_dim=16),  # (1 + w) norms, scaled embedding
              "qwen3": lambda: Qwen3Config(**common, head_dim=16),  # q/k norms per head
              "stablelm": lambda: StableLmConfig(**common)}[kind]()  # LayerNorm with biases, partial rotary
    torch.manual_seed(0)
    hf = root / f"{kind}-hf"
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(hf)
    for side in tiny_models["llama"]["hf"].glob("*token*"):
        shutil.copy2(side, hf / side.name)
    return export(hf, root / f"{kind}-onnx").parent


@pytest.mark.parametrize("kind", ["phi3", "gemma"])
def test_other_decoder_families_fuse_to_the_same_function(tiny_models, tmp_path, kind):
    source = _family_export(kind, tiny_models, tmp_path)
    target = tmp_path / "fused"
    target.mkdir()
    assert _fused_copy(source, target)[0] == 2
    ids = np.arange(3, 40)
    original, rewritten = OrtCausalLM(source), OrtCausalLM(target)
    np.testing.assert_allclose(rewritten.logits(ids), original.logits(ids), atol=1e-4, rtol=1e-4)
    assert original.greedy_decode(ids[:9], 8) == rewritten.greedy_decode(ids[:9], 8)


@pytest.mark.parametrize("kind, reason", [("qwen3", "q/k norms"), ("stablelm", "partial rotary")])
def test_attention_the_op_cannot_compute_is_refused(tiny_models, tmp_path, kind, reason):
    source = _family_export(kind, tiny_models, tmp_path)
    with pytest.raises(GraphqError, match=reason):
        quantize(source, QuantConfig(fuse_attention=True), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, reason", [({"sliding_window": 64}, "sliding window"),
                                           ({"attention_multiplier": 0.1}, "attention_multiplier"),
                                           ({"attn_logit_softcapping": 50.0}, "softcapping")])
def test_attention_variants_of_the_config_are_refused(tiny_models, extra, reason):
    config = json.loads((tiny_models["llama"]["onnx"] / "config.json").read_text())
    with pytest.raises(GraphqError, match=reason):
        attention_spec({**config, **extra})
