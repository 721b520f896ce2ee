"""graphq's tokenizer (the `tokenizers` library alone) encodes exactly as transformers' AutoTokenizer does."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from graphq import GraphqError
from graphq.tokenizer import TextTokenizer, load_tokenizer

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune!"


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_same_ids_and_special_tokens_as_transformers(tiny_models, kind):
    folder = tiny_models[kind]["onnx"]
    ours, theirs = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    assert isinstance(ours, TextTokenizer)
    assert ours(TEXT, add_special_tokens=False)["input_ids"] == theirs(TEXT, add_special_tokens=False)["input_ids"]
    assert (ours.bos_token_id, ours.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id)
    ids = ours(TEXT, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids)


def test_loading_does_not_import_transformers(tiny_models):
    # The point of the wrapper: quantize's memory budget has no room for transformers + torch (~300 MB).
    code = (
        "import sys; from graphq.tokenizer import load_tokenizer; "
        f"load_tokenizer({str(tiny_models['llama']['onnx'])!r}); print('transformers' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_folder_without_tokenizer_is_refused(tiny_models, tmp_path):
    shutil.copy(tiny_models["llama"]["onnx"] / "config.json", tmp_path / "config.json")
    with pytest.raises(GraphqError, match="no usable tokenizer"):
        load_tokenizer(tmp_path)
