"""The weight-method registry: names to method objects, and method strings (``awq+gptq``) to sequences."""

from __future__ import annotations

from graphq.errors import GraphqError
from graphq.weight_methods.base import WeightMethod

WEIGHT_METHODS: dict[str, WeightMethod] = {}


def register_weight_method(method: WeightMethod) -> WeightMethod:
    """Make ``method`` available to ``--method`` under ``method.name``."""
    if method.name in WEIGHT_METHODS:
        raise ValueError(f"weight method {method.name!r} is registered twice")
    WEIGHT_METHODS[method.name] = method
    return method


def resolve_methods(spec: str) -> list[WeightMethod]:
    """``"awq+gptq"`` -> [awq, gptq]: known names, each once, and at least one that rounds (a sequence that only
    prunes, ``wanda`` or ``awq+wanda``, is rounded by rtn)."""
    if not isinstance(spec, str) or not spec.strip():
        raise GraphqError(f"--method must name a weight method, got {spec!r}: choose from {', '.join(WEIGHT_METHODS)}")
    names = [part.strip() for part in spec.split("+")]
    unknown = [name for name in names if name not in WEIGHT_METHODS]
    if unknown:
        raise GraphqError(
            f"unknown method '{unknown[0]}' in --method {spec}: choose from {', '.join(WEIGHT_METHODS)}, "
            "joined with + (e.g. awq+gptq)"
        )
    if len(set(names)) != len(names):
        raise GraphqError(f"--method {spec} names a method twice")
    methods = [WEIGHT_METHODS[name] for name in names]
    for method in methods:
        method.check_sequence(names)
    if not any(method.rounds for method in methods) and any(method.prunes for method in methods):
        methods.append(WEIGHT_METHODS["rtn"])  # a pruning method alone: the kept weights are rounded to nearest
    if not any(method.rounds for method in methods):
        raise GraphqError(f"--method {spec} never rounds the weights: end it with one of "
                          f"{', '.join(n for n, m in WEIGHT_METHODS.items() if m.rounds)}")
    return methods


def rounding_method(methods: list[WeightMethod]) -> WeightMethod:
    """The method that produces the quantized weights: the last one in the sequence that rounds."""
    return next(method for method in reversed(methods) if method.rounds)


def statistics_needed(methods: list[WeightMethod]) -> dict:
    """The union of the statistics the sequence declares (name -> accumulator factory)."""
    needed: dict = {}
    for method in methods:
        needed.update(method.statistics)
    return needed
