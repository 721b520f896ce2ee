"""quant_model_description_<scheme>.json: the model's quantization type and a type per tensor.

Layout (MindIE / msModelSlim style): ``{"model_quant_type": "W4A16", "kv_cache_type": "C8" (only with an int8 KV
cache), "<tensor name>": "W4A16" | "FLOAT" | "C8", ...}``. Every tensor of the safetensors is listed, and only those.
"""

from __future__ import annotations

import json
from pathlib import Path

from graphq.errors import GraphqError

FLOAT = "FLOAT"
KV_CACHE_TYPE = "C8"  # int8 KV cache, as MindIE names it
META_KEYS = ("model_quant_type", "kv_cache_type", "version")


def file_tag(scheme: str) -> str:
    return scheme.replace("-", "_")


def description_name(scheme: str) -> str:
    return f"quant_model_description_{file_tag(scheme)}.json"


def weight_stem(scheme: str) -> str:
    return f"quant_model_weight_{file_tag(scheme)}"


def write_description(
    path: Path, scheme: str, tensor_types: dict[str, str], kv_cache: bool, version: str, model_type: str | None = None
) -> None:
    from graphq.artifacts.layout import TYPES

    data = {"model_quant_type": model_type or TYPES[scheme], "version": version}
    if kv_cache:
        data["kv_cache_type"] = KV_CACHE_TYPE
    data.update(tensor_types)
    path.write_text(json.dumps(data, indent=2) + "\n")


def read_description(path: Path) -> tuple[str, dict[str, str], str | None]:
    """-> (graphq scheme, tensor name -> type, kv_cache_type or None)."""
    from graphq.artifacts.layout import SCHEME_OF_TYPE

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GraphqError(f"{path} is not a readable JSON description ({exc}): write the artifacts again") from exc
    if not isinstance(data, dict) or not isinstance(data.get("model_quant_type"), str):
        raise GraphqError(f"{path} has no model_quant_type: it is not a quant_model_description file")
    scheme = SCHEME_OF_TYPE.get(data["model_quant_type"])
    if scheme is None:
        raise GraphqError(
            f"{path.name}: model_quant_type {data['model_quant_type']} is not one of {', '.join(SCHEME_OF_TYPE)}"
        )
    types = {k: v for k, v in data.items() if k not in META_KEYS}
    bad = next((k for k, v in types.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise GraphqError(f"{path}: the type of {bad} is not a string")
    return scheme, types, data.get("kv_cache_type")


def find_descriptions(directory: Path) -> list[Path]:
    return sorted(directory.glob("quant_model_description_*.json"))
