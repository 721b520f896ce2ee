"""The sparsity options of QuantConfig checked together (issue 10), so bad input fails before anything is read.

Kept apart from config.py so the pruning rules live in one place: which method sequences prune, which schemes
serve them, and the ranges of the W8A8S and W8A8SC options.
"""

from __future__ import annotations

from typing import Any

from graphq.errors import GraphqError

SIGMA_FACTOR_RANGE = (3.0, 4.0)
FRACTION_RANGE = (0.01, 0.1)


def _pruners(method: str) -> list[str]:
    from graphq.weight_methods import resolve_methods

    return [m.name for m in resolve_methods(method) if getattr(m, "prunes", False)]


def activation_scheme_method_ok(method: str, scheme: str = "w8a8") -> bool:
    """W8A8 schemes round their weights by RTN; a sequence there may only prune (then RTN runs). W8A8S also takes
    gptq after its pruner (its lowbit levels rounded with error feedback, as sparsegpt rounds them)."""
    from graphq.weight_methods import resolve_methods

    allowed = ("rtn", "gptq") if scheme == "w8a8s" else ("rtn",)
    return all(getattr(m, "prunes", False) or m.name in allowed for m in resolve_methods(method))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_sparsity(config: Any) -> None:
    """Raise GraphqError (one line) for sparsity options that cannot work together; normalizes nothing else."""
    from graphq.algorithms.sparsity import parse_pattern, pattern_sparsity

    if not _number(config.sparsity) or not 0 <= config.sparsity < 1:
        raise GraphqError(f"--sparsity must be a fraction in [0, 1), got {config.sparsity!r}")
    try:
        pattern = parse_pattern(config.sparsity_pattern)
    except ValueError as exc:
        raise GraphqError(str(exc)) from exc
    if pattern is not None and config.sparsity and abs(config.sparsity - pattern_sparsity(pattern)) > 1e-9:
        raise GraphqError(
            f"--sparsity {config.sparsity} and --sparsity-pattern {config.sparsity_pattern} disagree: the pattern zeroes "
            f"{pattern_sparsity(pattern):g} of the weights; give one of them"
        )
    pruners = _pruners(config.method)
    wants_zeros = bool(config.sparsity) or pattern is not None
    if len(pruners) > 1:
        raise GraphqError(f"--method {config.method} prunes twice ({' and '.join(pruners)}): keep one pruning method")
    if pruners and not wants_zeros:
        raise GraphqError(f"--method {config.method} prunes: give --sparsity F (e.g. 0.5) or --sparsity-pattern N:M (e.g. 2:4)")
    if wants_zeros and not pruners:
        raise GraphqError(
            "--sparsity/--sparsity-pattern need a pruning method in --method: magnitude (no data), wanda or sparsegpt "
            "(e.g. --method wanda, awq+wanda, wanda+gptq)"
        )
    if "w8a8s" in config.schemes and not pruners:
        raise GraphqError("--scheme w8a8s prunes the weights: add --sparsity F or --sparsity-pattern N:M and a pruning "
                          "--method (magnitude, wanda or sparsegpt)")
    if not _number(config.sigma_factor) or not SIGMA_FACTOR_RANGE[0] <= config.sigma_factor <= SIGMA_FACTOR_RANGE[1]:
        raise GraphqError(f"--sigma-factor must be in [{SIGMA_FACTOR_RANGE[0]:g}, {SIGMA_FACTOR_RANGE[1]:g}], got {config.sigma_factor!r}")
    if not _number(config.fraction) or not FRACTION_RANGE[0] <= config.fraction <= FRACTION_RANGE[1]:
        raise GraphqError(f"--fraction must be in [{FRACTION_RANGE[0]:g}, {FRACTION_RANGE[1]:g}], got {config.fraction!r}")
    if not isinstance(config.tp_size, int) or isinstance(config.tp_size, bool) or config.tp_size < 1:
        raise GraphqError(f"--tp must be a positive integer, got {config.tp_size!r}")
    if config.compress:
        if config.scheme != "w8a8s":
            raise GraphqError(f"--compress writes W8A8SC from W8A8S artifacts: use --scheme w8a8s (not {config.scheme})")
        if "safetensors" not in config.save_format:
            raise GraphqError("--compress reads the W8A8S safetensors: keep safetensors in --save-format")


def check_layers_fit(layers: list, config: Any) -> None:
    """N:M runs along K: every pruned layer's K must be a multiple of M (the error names the first that is not)."""
    from graphq.algorithms.sparsity import check_pattern_fits, parse_pattern

    pattern = parse_pattern(config.sparsity_pattern)
    for layer in layers:
        try:
            check_pattern_fits(pattern, layer.in_features, layer.name)
        except ValueError as exc:
            raise GraphqError(str(exc)) from exc
