"""Shared fixtures: tiny random Llama / Qwen2 exports (fast, no accuracy claims) and the real SmolLM2-135M."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("GRAPHQ_DATA", REPO.parent / "shared" / "data" / "austen"))


def build_tiny_model(kind: str, target: Path, seed: int = 0, kv_heads: int = 2, vocab_size: int = 96) -> Path:
    """Save a tiny random Hugging Face model: 'llama' (no biases) or 'qwen2' (q/k/v biases, tied embeddings).

    kv_heads=4 (as many as attention heads) makes v_proj's outputs line up with o_proj's inputs."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=False)
    elif kind == "qwen2":
        config = Qwen2Config(**common, tie_word_embeddings=True)
    else:
        raise ValueError(kind)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Random norms and biases: zeros/ones would be deduplicated by the exporter and hide bugs.
            if name.endswith("bias") or "norm" in name:
                param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(target, safe_serialization=True)
    # A byte-level-ish word tokenizer over printable characters keeps tests independent of any hub download.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for char in " etaoinshrdlucmfwypvbgkjqxz.,;:!?'ETAOINSHRDLUCMFWYPVBGKJQXZ0123456789-\"()":
        if len(vocab) < common["vocab_size"] and char not in vocab:
            vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """{'llama': {'hf': folder, 'onnx': export folder}, 'qwen2': {...}}, exported once per session."""
    from graphq.export import export

    root = tmp_path_factory.mktemp("tiny")
    result = {}
    for kind in ("llama", "qwen2"):
        hf = build_tiny_model(kind, root / f"{kind}-hf")
        onnx_dir = root / f"{kind}-onnx"
        export(hf, onnx_dir)
        result[kind] = {"hf": hf, "onnx": onnx_dir}
    return result


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    """A short English text for tiny-model perplexity windows."""
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "it", "ran", "far", "away", "home"]
    paragraphs = [" ".join(rng.choice(words, size=60)) + "." for _ in range(20)]
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text("\n\n".join(paragraphs))
    return path


@pytest.fixture(scope="session")
def austen() -> dict[str, Path]:
    paths = {"calib": DATA_DIR / "sensesensibility.txt", "eval": DATA_DIR / "prideprejudice.txt"}
    for path in paths.values():
        if not path.is_file():
            pytest.fail(f"{path} is missing: the Austen texts live in ../shared/data/austen (or set GRAPHQ_DATA)")
    return paths


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> dict[str, Path]:
    """The real SmolLM2-135M: its GGUF file and an ONNX export of it (exported once per session)."""
    from graphq.default_model import ensure_default_model
    from graphq.export import export

    gguf = ensure_default_model()
    onnx_dir = tmp_path_factory.mktemp("smollm2") / "fp32"
    export(gguf, onnx_dir)
    return {"gguf": gguf, "onnx": onnx_dir}
