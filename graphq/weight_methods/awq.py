"""awq: activation-aware channel scales folded into the producer of each input, then a clip search per group.

The scales of every input group of the layer are searched on the captured float inputs and folded before anything
is rounded, because the fold for down_proj rewrites up_proj's output columns. The fold is ``passes.fold``'s, the
same as smoothing's: every linear reading the input is rescaled (quantized under this scheme or not), and a group
whose input nothing can absorb keeps scale 1 (reported as ``awq_skipped``).
"""

from __future__ import annotations

import numpy as np

from graphq.algorithms.awq import (
    ChannelMagnitude, ChannelRange, ClipRanges, InputGram, quantize_with_clip, search_awq_clip, search_awq_scales,
)
from graphq.algorithms.rtn import QuantizedWeight, quantize_rtn
from graphq.config import STATIC_ACTIVATION_SCHEMES
from graphq.linear_layers import LinearLayer
from graphq.passes.fold import apply_fold, fold_target, input_readers
from graphq.weight_methods.base import LayerResult, RegionWork, WeightMethod
from graphq.weight_methods.registry import register_weight_method


#: Static W4A8: SmoothQuant's scales at these alphas join AWQ's candidates (scored on both grids).
STATIC_SMOOTH_ALPHAS = tuple(round(0.1 * i, 1) for i in range(1, 11))


class ActivationAwareScaling(WeightMethod):
    name = "awq"
    # The Gram matrix of each (narrow) input lets both searches score candidates over every calibration token, at
    # less cost than over the token sample.
    statistics = {"magnitude": ChannelMagnitude, "range": ChannelRange, "gram": InputGram}
    rounds = True
    float_inputs_suffice = True  # AutoAWQ's and NNCF's way; as accurate here over 5 calibration draws (awq_speed.md)

    def transform(self, work: RegionWork) -> None:
        config = work.config
        readers, every_linear = input_readers(work.model, work.known_layers or work.layers)
        readers_by_input = dict(readers)
        # Static W4A8: the scales are scored with the input on its per-tensor int8 grid too (the range of x / s over
        # all calibration tokens), since they move the activation range as much as the weights' grid.
        static = config.scheme in STATIC_ACTIVATION_SCHEMES
        for input_name, group in work.groups.items():
            weights = [layer.weight_kn() for layer in group]
            group_size = config.group_size_for(group[0].in_features)
            # Each weight group's own error, on the Gram's diagonal blocks: K x group per candidate on any input, where
            # the whole Gram costs K^2 (a wide input's token sample 2048 K). SmolLM2, 32 x 512, five calibration
            # draws: mean delta +11.38% against the whole Gram's +10.90%, inside its 2.7-point spread
            # (bench/results/awq_speed.md).
            blocks = None if static else work.original_gram_blocks(input_name, group_size)
            scales, info = search_awq_scales(
                work.samples[input_name], weights, config.bits, group_size,
                config.is_symmetric, x_magnitude=work.stats[input_name].magnitude.mean(),
                act_range=work.stats[input_name].range.ranges() if static else None,
                smooth_alphas=STATIC_SMOOTH_ALPHAS if static else (), gram_blocks=blocks,
            )
            searched = info["ratio"] not in (0.0, None) or info["smooth_alpha"] is not None
            skipped = None
            if searched:
                everyone = readers_by_input.get(input_name, group)
                target = fold_target(everyone, every_linear)
                if target["kind"] == "none":
                    skipped = target["reason"]
                else:
                    apply_fold(work.model, everyone, target, np.zeros_like(scales), scales)
                    work.input_scale[input_name] = work.input_scale[input_name] * scales.astype(np.float32)
                    if target["kind"] == "linear":
                        work.rescaled[target["upstream"].name] = f"AWQ scales of {group[0].name}"
            for layer in group:
                work.notes[layer.name]["awq_ratio"] = info["ratio"] if searched and skipped is None else 0.0
                if static:
                    work.notes[layer.name]["awq_scored_activations"] = "int8 per tensor, static (range of x / s)"
                    if info["smooth_alpha"] is not None and searched and skipped is None:
                        work.notes[layer.name]["awq_smooth_alpha"] = info["smooth_alpha"]
                if skipped is not None:
                    work.notes[layer.name]["awq_skipped"] = skipped

    def round_group(self, work: RegionWork, input_name: str, group: list[LinearLayer]) -> dict[str, LayerResult]:
        config = work.config
        results = {}
        for layer in group:
            if config.awq_clip:
                qw, clip = clipped_rounding(work, input_name, layer)
            else:
                clip = None
                qw = quantize_rtn(layer.weight_kn(), config.bits, config.group_size_for(layer.in_features),
                                  config.is_symmetric)
            results[layer.name] = LayerResult(qw, clip=clip)
        return results


def clipped_rounding(work: RegionWork, input_name: str, layer: LinearLayer) -> tuple[QuantizedWeight, ClipRanges]:
    """AWQ's clip search on the linear's current weight and input (x / s), and RTN within the clip ranges found."""
    config = work.config
    weight = layer.weight_kn()
    group_size = config.group_size_for(layer.in_features)
    clip, _ = search_awq_clip(work.current_input(input_name), weight, config.bits, group_size, config.is_symmetric,
                              gram_blocks=work.current_gram_blocks(input_name, group_size))
    return quantize_with_clip(weight, clip, config.bits, group_size, config.is_symmetric), clip


register_weight_method(ActivationAwareScaling())
