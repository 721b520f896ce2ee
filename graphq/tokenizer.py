"""The tokenizer beside an export, loaded with the `tokenizers` library alone.

transformers (and through it torch) costs about 300 MB of resident memory on import, which the quantize step cannot
afford when its budget is twice the float model; every export written by optimum carries a tokenizer.json, which is
all that encoding needs. Folders without one fall back to transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

from graphq.errors import GraphqError


class TextTokenizer:
    """The subset of a Hugging Face tokenizer graphq uses: ``tok(text, add_special_tokens=False)["input_ids"]``."""

    def __init__(self, tokenizer_file: Path, bos_token: str | None, eos_token: str | None):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.bos_token_id = self._token_id(bos_token)
        self.eos_token_id = self._token_id(eos_token)

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _special_token(config: dict, key: str) -> str | None:
    token = config.get(key)
    if isinstance(token, dict):  # older tokenizer_config.json files store AddedToken dicts
        token = token.get("content")
    return token if isinstance(token, str) else None


def load_tokenizer(model_dir: str | Path):
    """The tokenizer of an export folder (or of the folder holding a model.onnx)."""
    model_dir = Path(model_dir)
    if model_dir.is_file():
        model_dir = model_dir.parent
    tokenizer_file = model_dir / "tokenizer.json"
    config_file = model_dir / "tokenizer_config.json"
    try:
        if tokenizer_file.is_file():
            config = json.loads(config_file.read_text()) if config_file.is_file() else {}
            return TextTokenizer(tokenizer_file, _special_token(config, "bos_token"), _special_token(config, "eos_token"))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:
        raise GraphqError(
            f"no usable tokenizer beside the model in {model_dir}: keep the export folder's tokenizer files with it"
        ) from exc
