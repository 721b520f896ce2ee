"""The per-layer plan file: every quantizable tensor with the precision it gets, in Huawei dopt's layout.

``graphq plan`` writes it from the command line's (or YAML's) defaults; the user edits it; ``graphq quantize
--plan`` honours it entry by entry, and writes the plan it actually used beside its report so the run can be
repeated. The layout is dopt's ``dopt_config.json``::

    {"layer_strategy": {"model.layers.0.self_attn.q_proj": {
        "type": "Linear", "quant_strategy": "Quant_act_weight_eco",
        "weight": {"bit": 4, "group_size": 128, "symmetric": false, "method": "rtn"}, "input": {"bit": 16}}, ...}}

``weight.bit`` 16 keeps the tensor float. Weight and input bits name a scheme (4/16: w4a16, 8/8: w8a8,
``input.dynamic: true``: the per-token variant); extra keys are kept and ignored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graphq.errors import GraphqError

PLAN_FILE = "plan.json"
FLOAT_BITS = 16
LINEAR_STRATEGY, LM_HEAD_STRATEGY, EMBEDDING_STRATEGY = "Quant_act_weight_eco", "Quant_lm_head", "Quant_Embed_MinMax"
_SCHEME_NAME = re.compile(r"^w(\d+)a(\d+)(-dynamic)?$")


@dataclass(frozen=True)
class LayerSetting:
    """What the plan gives one tensor: a scheme (or 'float') and the weight grid."""

    scheme: str
    group_size: int
    symmetric: bool
    method: str


def scheme_bits() -> dict[tuple[int, int, bool], str]:
    """(weight bits, input bits, dynamic) -> scheme, for every scheme named w<bits>a<bits>[-dynamic]."""
    from graphq.config import SCHEMES

    table = {}
    for scheme in SCHEMES:
        match = _SCHEME_NAME.match(scheme)
        if match:
            table[(int(match.group(1)), int(match.group(2)), bool(match.group(3)))] = scheme
    return table


def entry_for(kind: str, strategy: str, scheme: str, group_size: int, symmetric: bool, method: str) -> dict:
    """One plan entry; ``scheme`` 'float' writes weight bit 16."""
    if scheme == "float":
        return {"type": kind, "quant_strategy": strategy, "weight": {"bit": FLOAT_BITS}, "input": {"bit": FLOAT_BITS}}
    bits = {v: k for k, v in scheme_bits().items()}.get(scheme)
    named = bits is None  # a scheme the bits do not name (w8a8s: sparse W8A8) is named by an extra key
    if named:
        bits = scheme_bits_of(scheme)
    return {"type": kind, "quant_strategy": strategy, **({"scheme": scheme} if named else {}),
            "weight": {"bit": bits[0], "group_size": group_size, "symmetric": symmetric, "method": method},
            "input": {"bit": bits[1], **({"dynamic": True} if bits[2] else {})}}


def scheme_bits_of(scheme: str) -> tuple[int, int, bool]:
    """(weight bits, input bits, dynamic) of any scheme, named by the bits or not."""
    from graphq.config import ACTIVATION_SCHEMES, DYNAMIC_ACTIVATION_SCHEMES, SCHEMES

    return SCHEMES[scheme], 8 if scheme in ACTIVATION_SCHEMES else FLOAT_BITS, scheme in DYNAMIC_ACTIVATION_SCHEMES


def default_plan(model_path: str | Path, config) -> dict:
    """The plan the config implies for the model: every linear, lm_head and the token embedding."""
    from graphq.embedding_quantize import BITS
    from graphq.linear_layers import find_linear_layers
    from graphq.model_io import load_model
    from graphq.passes.embedding import find_embedding
    from graphq.selection import skip_reason

    model = load_model(model_path)
    layers = find_linear_layers(model)
    if not layers:
        raise GraphqError(f"{model_path} has no quantizable linear layers (MatMul/Gemm with a constant weight)")
    strategy: dict[str, dict] = {}
    embedding = find_embedding(model)
    if embedding is not None:
        bits = BITS.get(config.quantize_embeddings) if config.quantize_embeddings else None
        scheme = "float" if bits is None else ("w4a16" if bits == 4 else "w8a16")
        symmetric = config.embedding_symmetric if config.embedding_symmetric is not None else bits == 8
        strategy[embedding.name] = entry_for("Embedding", EMBEDDING_STRATEGY, scheme, config.embedding_group_size,
                                             symmetric, config.embedding_method)
    for layer in layers:
        scheme = "float" if skip_reason(layer, config.exclude, config.quantize_lm_head) else config.scheme_for(layer.name)
        sub = config.for_scheme(scheme) if scheme != "float" else config
        strategy[layer.name] = entry_for("Linear", LM_HEAD_STRATEGY if layer.role == "lm_head" else LINEAR_STRATEGY,
                                         scheme, sub.group_size_for(layer.in_features), sub.is_symmetric, sub.method)
    return {"layer_strategy": strategy}


def plan_from_report(layer_entries: list[dict], embedding: dict | None, embedding_name: str | None) -> dict:
    """The plan a finished run used (its report's layers), to repeat the run with ``--plan``."""
    strategy: dict[str, dict] = {}
    if embedding_name is not None:
        if embedding:
            strategy[embedding_name] = entry_for("Embedding", EMBEDDING_STRATEGY,
                                                 "w4a16" if embedding["bits"] == 4 else "w8a16",
                                                 embedding["group_size"], embedding["symmetric"], embedding["method"])
        else:
            strategy[embedding_name] = entry_for("Embedding", EMBEDDING_STRATEGY, "float", -1, True, "rtn")
    for entry in layer_entries:
        quantized = "skipped" not in entry
        strategy[entry["name"]] = entry_for(
            "Linear", LM_HEAD_STRATEGY if entry["role"] == "lm_head" else LINEAR_STRATEGY,
            entry["scheme"] if quantized else "float", entry.get("group_size", -1), entry.get("symmetric", True),
            entry.get("method", "rtn"))
    return {"layer_strategy": strategy}


def read_plan(path: str | Path) -> dict[str, dict]:
    """The plan's ``layer_strategy`` mapping, its layout checked (one line naming the bad entry)."""
    path = Path(path)
    if not path.is_file():
        raise GraphqError(f"plan file {path} does not exist: write one with 'graphq plan MODEL -o {path.name}'")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GraphqError(f"plan file {path} is not valid JSON ({exc})".splitlines()[0]) from None
    strategy = data.get("layer_strategy") if isinstance(data, dict) else None
    if not isinstance(strategy, dict) or not strategy:
        raise GraphqError(f"plan file {path} has no 'layer_strategy' mapping of tensor name to entry")
    for name, entry in strategy.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("weight"), dict) \
                or not isinstance(entry["weight"].get("bit"), int) or isinstance(entry["weight"]["bit"], bool):
            raise GraphqError(f"plan entry '{name}' needs \"weight\": {{\"bit\": N, ...}} (N = 4, 8, ... or 16 for float)")
        if "input" in entry and not (isinstance(entry["input"], dict) and isinstance(entry["input"].get("bit", 16), int)):
            raise GraphqError(f"plan entry '{name}': \"input\" must be {{\"bit\": 8 or 16}}")
    return strategy


def setting_for(name: str, entry: dict, config, in_features: int) -> LayerSetting:
    """The entry as a scheme and grid, or a one-line error naming it (unknown bits, impossible group)."""
    from graphq.config import ACTIVATION_SCHEMES, PER_CHANNEL, W4A8_SCHEMES
    from graphq.weight_methods import resolve_methods

    weight, given_input = entry["weight"], entry.get("input", {})
    if weight["bit"] == FLOAT_BITS:
        return LayerSetting("float", PER_CHANNEL, True, "rtn")
    input_bit = given_input.get("bit", FLOAT_BITS)
    table = scheme_bits()
    key = (weight["bit"], input_bit, bool(given_input.get("dynamic", False)))
    scheme = table.get(key)
    named = entry.get("scheme")
    if named is not None:  # graphq's extra key for schemes the bits do not name (w8a8s)
        from graphq.config import SCHEMES

        if named not in SCHEMES or scheme_bits_of(named) != key:
            raise GraphqError(f"plan entry '{name}': scheme {named!r} does not match weight bit {weight['bit']} / "
                              f"input bit {input_bit}: fix one of them or drop \"scheme\"")
        scheme = named
    if scheme is None:
        pairs = ", ".join(f"{w}/{a}{' dynamic' if d else ''}" for w, a, d in sorted(table))
        raise GraphqError(f"plan entry '{name}': weight bit {weight['bit']} with input bit {input_bit} is no scheme "
                          f"graphq emits (weight/input bits: {pairs}; weight bit 16 keeps it float)")
    sub = config.for_scheme(scheme)
    group_size = weight.get("group_size", sub.group_size)
    if not isinstance(group_size, int) or isinstance(group_size, bool) or (
            group_size != PER_CHANNEL and (group_size < 16 or group_size & (group_size - 1))):
        raise GraphqError(f"plan entry '{name}': group_size {group_size!r} is not a power of two >= 16 or -1")
    symmetric = weight.get("symmetric", sub.is_symmetric)
    method = weight.get("method", sub.method)
    if not isinstance(symmetric, bool) or not isinstance(method, str):
        raise GraphqError(f"plan entry '{name}': symmetric must be true/false and method a string")
    if scheme in ACTIVATION_SCHEMES and scheme not in W4A8_SCHEMES:
        if (group_size != PER_CHANNEL and group_size < in_features) or not symmetric or method != "rtn":
            raise GraphqError(f"plan entry '{name}': {scheme} weights are symmetric int8 per channel by rtn "
                              "(group_size -1, symmetric true, method rtn)")
    resolve_methods(method)
    return LayerSetting(scheme, group_size, symmetric, method)


def check_names(strategy: dict[str, dict], known: list[str]) -> None:
    """Every entry names a tensor of the model."""
    missing = [name for name in strategy if name not in known]
    if missing:
        raise GraphqError(f"plan entry '{missing[0]}' names no tensor of the model ({len(missing)} such entries; "
                          f"names look like {known[-1]}): write the plan for this model with 'graphq plan'")


def embedding_options(entry: dict, name: str) -> dict[str, Any]:
    """The config fields a plan's embedding entry sets (quantize_embeddings and its grid)."""
    weight = entry["weight"]
    if weight["bit"] == FLOAT_BITS:
        return {"quantize_embeddings": None}
    if weight["bit"] not in (4, 8) or entry.get("input", {}).get("bit", FLOAT_BITS) != FLOAT_BITS:
        raise GraphqError(f"plan entry '{name}': an embedding takes weight bit 4, 8 or 16 and input bit 16")
    options = {"quantize_embeddings": f"int{weight['bit']}"}
    for key, field in (("group_size", "embedding_group_size"), ("symmetric", "embedding_symmetric"),
                       ("method", "embedding_method")):
        if key in weight:
            options[field] = weight[key]
    return options
