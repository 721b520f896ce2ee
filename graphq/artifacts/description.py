"""quant_model_description JSON: the model's quantization type and a type per tensor (msModelSlim's layouts).

V0 (MindIE): ``quant_model_description_<t>.json`` = ``{"model_quant_type": "W4A16", "kv_cache_type": "C8" (only
with an int8 KV cache), "<tensor name>": "W4A16" | "FLOAT" | "C8", ...}``. ascendV1 (vllm-ascend):
``quant_model_description.json`` with ``"version": "1.0.0"``, ``group_size`` (an integer) and, from msModelSlim's
V1 CLI, ``metadata`` / ``optional`` (objects). Every tensor of the safetensors is listed, and only those; header
keys are every key whose value is not a tensor type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from graphq.errors import GraphqError

FLOAT = "FLOAT"
KV_CACHE_TYPE = "C8"  # int8 KV cache, as MindIE names it
META_KEYS = ("model_quant_type", "kv_cache_type", "kv_quant_type", "version", "group_size", "metadata", "optional")
V1_DESCRIPTION = "quant_model_description.json"


def file_tag(scheme: str) -> str:
    """graphq's scheme -> MindIE's name, used in file names and config.json quantize (w8a8-dynamic -> w8a8_dynamic)."""
    return scheme.replace("-", "_")


def description_name(scheme: str) -> str:
    return f"quant_model_description_{file_tag(scheme)}.json"


def weight_stem(scheme: str) -> str:
    return f"quant_model_weight_{file_tag(scheme)}"


def write_description(path: Path, scheme: str, tensor_types: dict[str, str], kv_cache: bool, version: str | None = None) -> None:
    """The V0 description (kept for callers of graphq's older API; the targets write their own headers).
    ``version`` is ignored: the key is msModelSlim's format version, not graphq's."""
    from graphq.artifacts.layout import TYPES

    data = {"model_quant_type": TYPES[scheme]}
    if kv_cache:
        data["kv_cache_type"] = KV_CACHE_TYPE
        data["kv_quant_type"] = KV_CACHE_TYPE
    data.update(tensor_types)
    path.write_text(json.dumps(data, indent=2) + "\n")


@dataclass
class Description:
    path: Path
    scheme: str  # graphq's
    types: dict[str, str]  # tensor name -> type
    kv_cache_type: str | None
    header: dict = field(default_factory=dict)  # every non-tensor key

    @property
    def is_v1(self) -> bool:
        return self.path.name == V1_DESCRIPTION or self.header.get("version") == "1.0.0"

    @property
    def group_size(self) -> int | None:
        value = self.header.get("group_size")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def parse_description(path: Path, data: object) -> Description:
    from graphq.artifacts.layout import MODEL_TYPES

    if not isinstance(data, dict) or not isinstance(data.get("model_quant_type"), str):
        raise GraphqError(f"{path} has no model_quant_type: it is not a quant_model_description file")
    scheme = MODEL_TYPES.get(data["model_quant_type"])
    if scheme is None:
        raise GraphqError(
            f"{path.name}: model_quant_type {data['model_quant_type']} is not one of {', '.join(MODEL_TYPES)}"
        )
    header = {k: v for k, v in data.items() if k in META_KEYS}
    types = {k: v for k, v in data.items() if k not in META_KEYS}
    bad = next((k for k, v in types.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise GraphqError(f"{path}: the type of {bad} is not a string")
    kv = header.get("kv_cache_type") or header.get("kv_quant_type")
    return Description(path, scheme, types, kv if isinstance(kv, str) else None, header)


def load_description(path: Path) -> Description:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GraphqError(f"{path} is not a readable JSON description ({exc}): write the artifacts again") from exc
    return parse_description(path, data)


def read_description(path: Path) -> tuple[str, dict[str, str], str | None]:
    """-> (graphq scheme, tensor name -> type, kv_cache_type or None)."""
    description = load_description(path)
    return description.scheme, description.types, description.kv_cache_type


def find_descriptions(directory: Path) -> list[Path]:
    """V0 descriptions (one per scheme) and the V1 one."""
    found = sorted(directory.glob("quant_model_description_*.json"))
    if (directory / V1_DESCRIPTION).is_file():
        found.append(directory / V1_DESCRIPTION)
    return found
