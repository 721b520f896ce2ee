"""Weight methods (rtn, awq, gptq, ...) as registered objects, and the per-decoder-layer driver that runs them.

Adding a method: a module here with a ``WeightMethod`` subclass and ``register_weight_method(...)``, imported
below; ``--method name`` (and sequences such as ``awq+name``) then work in the CLI, YAML and API.
"""

from graphq.weight_methods.base import LayerResult, RegionWork, WeightMethod
from graphq.weight_methods.registry import (
    WEIGHT_METHODS,
    register_weight_method,
    resolve_methods,
    rounding_method,
    statistics_needed,
)

# The built-in methods register themselves on import.
from graphq.weight_methods import awq, gptq, kd, lut, magnitude, rtn, sparsegpt, wanda  # noqa: E402,F401

from graphq.weight_methods.region import RegionResult, quantize_region, relative_output_error  # noqa: E402

__all__ = [
    "LayerResult", "RegionResult", "RegionWork", "WEIGHT_METHODS", "WeightMethod", "quantize_region",
    "register_weight_method", "relative_output_error", "resolve_methods", "rounding_method", "statistics_needed",
]
