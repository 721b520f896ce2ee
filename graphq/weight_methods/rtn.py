"""rtn: round to nearest on the weight grid; needs no data (and rounds for ``awq+rtn``, AWQ scales without clip)."""

from __future__ import annotations

import numpy as np

from graphq.algorithms.rtn import quantize_rtn, weight_relative_mse
from graphq.linear_layers import LinearLayer
from graphq.weight_methods.base import LayerResult, RegionWork, WeightMethod
from graphq.weight_methods.registry import register_weight_method


class RoundToNearest(WeightMethod):
    name = "rtn"
    calibrated = False
    rounds = True

    def round_group(self, work: RegionWork, input_name: str, group: list[LinearLayer]) -> dict[str, LayerResult]:
        config = work.config
        return {
            layer.name: LayerResult(quantize_rtn(layer.weight_kn(), config.bits, config.group_size_for(layer.in_features),
                                                 config.is_symmetric))
            for layer in group
        }

    def round_data_free(self, layer: LinearLayer, weight: np.ndarray, config) -> LayerResult:
        qw = quantize_rtn(weight, config.bits, config.group_size_for(layer.in_features), config.is_symmetric)
        return LayerResult(qw, {"weight_relative_mse": weight_relative_mse(weight, qw)})


register_weight_method(RoundToNearest())
