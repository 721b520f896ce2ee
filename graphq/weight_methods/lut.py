"""lut: codebook (lookup-table) weights, data-free or weighted by the layer-wise statistics (issue 11).

``--weight-format`` picks the table (``graphq.algorithms.codebook``): ``lut`` learns one table per output channel
(``--group-size -1``) or per group of input channels by 1-D k-means; ``nf4`` and ``iq4nl`` are the fixed
NormalFloat-4 and llama.cpp IQ4_NL tables scaled per group; ``shared`` learns one table per matrix with per-group
scales (NF4's storage). Without data (``--method lut``) every weight counts alike; with ``--calib`` (or after AWQ,
``--method awq+lut``) the layer-wise engine runs and each weight is weighted by its input channel's squared norm,
the diagonal of the Hessian X^T X of the input the linear reads now (SqueezeLLM's sensitivity-weighted k-means).
The fixed tables (nf4, iq4nl) take no weights: calibrated, they only see AWQ's scaled weights.
"""

from __future__ import annotations

import numpy as np

from graphq.algorithms.codebook import (
    CodebookWeight,
    codebook_relative_mse,
    iq4nl_quantize,
    lut_quantize,
    nf4_quantize,
    shared_lut_quantize,
)
from graphq.algorithms.gptq import HessianAccumulator
from graphq.errors import GraphqError
from graphq.linear_layers import LinearLayer
from graphq.weight_methods.base import LayerResult, RegionWork, WeightMethod
from graphq.weight_methods.registry import register_weight_method

#: --weight-format values that are codebooks, and the bit widths each serves.
CODEBOOK_FORMATS = {"lut": (3, 4), "shared": (3, 4), "nf4": (4,), "iq4nl": (4,)}
WEIGHT_FORMATS = ("uniform", *CODEBOOK_FORMATS)


def codebook_quantize(weight_kn: np.ndarray, config, importance: np.ndarray | None = None) -> CodebookWeight:
    """The config's codebook of one [K, N] weight (importance: [K] per input channel, or None)."""
    fmt = config.weight_format
    group_size = config.group_size_for(weight_kn.shape[0])
    if fmt == "lut":
        return lut_quantize(weight_kn, config.bits, group_size, importance=importance, table_dtype=config.lut_table_dtype)
    if fmt == "shared":
        return shared_lut_quantize(weight_kn, config.bits, group_size, importance=importance)
    if group_size == -1:
        raise GraphqError(f"--weight-format {fmt} scales its fixed table per group: give --group-size (e.g. 64)")
    if fmt == "nf4":
        return nf4_quantize(weight_kn, group_size)
    if fmt == "iq4nl":
        return iq4nl_quantize(weight_kn, group_size)
    raise GraphqError(f"--method lut needs a codebook --weight-format ({', '.join(CODEBOOK_FORMATS)}), not {fmt}")


def table_description(cw: CodebookWeight, fmt: str) -> str:
    """What the report says about a layer's tables, e.g. '16-entry float16 table per output channel'."""
    levels = cw.table.shape[-1]
    where = "per output channel" if cw.per_channel else f"per {cw.group_size} inputs"
    if cw.table.shape[:2] == (1, 1):
        return f"one {levels}-entry {cw.table.dtype} {fmt} table, float16 scale {where}"
    scaled = ", float16 scale per table" if cw.table_scales is not None else ""
    return f"{levels}-entry {cw.table.dtype} table {where}{scaled}"


def codebook_entry(cw: CodebookWeight, weight: np.ndarray, config, importance: np.ndarray | None) -> dict:
    entry = {
        "weight_format": config.weight_format,
        "lut_table": table_description(cw, config.weight_format),
        "lut_table_shape": list(cw.table.shape),
        "lut_table_bytes": int(cw.table.nbytes + (0 if cw.table_scales is None else cw.table_scales.size * 2)),
        "bits_per_weight": round(cw.bits_per_weight(), 4),
        "weight_relative_mse": codebook_relative_mse(weight, cw),
    }
    if importance is not None:
        entry["weighted_relative_mse"] = codebook_relative_mse(weight, cw, importance)
    if cw.fallback_rows:
        entry["warnings"] = [
            f"{cw.fallback_rows} table(s) had fewer distinct weights than {1 << cw.bits} entries: "
            "they hold those distinct values"
        ]
    return entry


def codebook_summary(config, entries: list[dict]) -> dict | None:
    """report.json's ``codebook``: the method, the table format and size over the codebook layers (None if none)."""
    layers = [e for e in entries if e.get("format") == "lut"]
    if not layers:
        return None
    weights = sum(e["in_features"] * e["out_features"] for e in layers)
    return {
        "method": config.method,
        "weight_format": config.weight_format,
        "data_aware": config.needs_calibration,
        "tables": sorted({e["lut_table"] for e in layers}),
        "table_entries": 1 << config.bits,
        "table_bytes": sum(e["lut_table_bytes"] for e in layers),  # tables and their scales, all layers
        "layers": len(layers),
        "bits_per_weight": round(sum(e["bits_per_weight"] * e["in_features"] * e["out_features"] for e in layers)
                                 / weights, 4),
        "fallback_layers": sum(1 for e in layers if e.get("warnings")),
    }


class Lut(WeightMethod):
    """Data-free by itself (``calibrated = False``); with calibration data the engine runs and supplies the
    Hessian whose diagonal weights the k-means (``uses_data``: quantize calibrates when data is given)."""

    name = "lut"
    statistics = {"hessian": HessianAccumulator}
    calibrated = False
    uses_data = True
    rounds = True

    def round_data_free(self, layer: LinearLayer, weight: np.ndarray, config) -> LayerResult:
        cw = codebook_quantize(weight, config)
        return LayerResult(cw, codebook_entry(cw, weight, config, None))

    def round_group(self, work: RegionWork, input_name: str, group: list[LinearLayer]) -> dict[str, LayerResult]:
        config = work.config
        s = work.input_scale[input_name]
        stats = work.stats[input_name]
        if hasattr(stats, "hessian"):
            importance = np.diag(stats.hessian.hessian()).astype(np.float64) / (s.astype(np.float64) ** 2)
        else:  # no statistics: the squared norms of the token sample the linears read now
            importance = np.square(work.current_input(input_name).astype(np.float64)).sum(axis=0)
        importance = np.maximum(importance, 0.0)
        if not importance.any():
            importance = None
        results = {}
        for layer in group:
            weight = layer.weight_kn()
            cw = codebook_quantize(weight, config, importance)
            results[layer.name] = LayerResult(cw, codebook_entry(cw, weight, config, importance))
        return results


register_weight_method(Lut())
