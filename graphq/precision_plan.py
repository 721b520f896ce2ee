"""Sensitivity-ranked precision for ``quantize``: ``--disable-level N`` and ``--target-bits B``.

The ranking comes from a sensitivity file (``graphq analyze``) or, without one, from an analysis run on the
calibration data right before quantizing. ``--disable-level N`` keeps the N most sensitive linears float (or moves
them to ``--fallback-scheme``); ``--target-bits B`` moves the most sensitive linears to the higher-precision scheme
(``--fallback-scheme``, default w8a16) while the average bits per weight of the planned linears stays within B.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from graphq.algorithms.mixed_precision import WeightGrid, bits_budget_plan, fallback_plan
from graphq.config import QuantConfig
from graphq.errors import GraphqError
from graphq.linear_layers import LinearLayer

DEFAULT_UPGRADE = "w8a16"


@dataclass
class PrecisionPlan:
    """Linear name -> the scheme it gets instead of the base one ("float": left unquantized)."""

    kind: str
    changes: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    bits_per_weight: float | None = None
    source: str = ""

    def report(self) -> dict:
        data = {"kind": self.kind, "source": self.source, "layers": dict(self.changes)}
        if self.bits_per_weight is not None:
            data["bits_per_weight"] = round(self.bits_per_weight, 4)
        return data


def needs_plan(config: QuantConfig) -> bool:
    return bool(config.disable_level) or config.target_bits is not None


def _grid(config: QuantConfig, scheme: str) -> WeightGrid:
    sub = config.for_scheme(scheme)
    return WeightGrid(sub.bits, sub.group_size, sub.is_symmetric)


def _check_budget(config: QuantConfig, planned: list[tuple[LinearLayer, str]]) -> None:
    upgrade = config.fallback_scheme or DEFAULT_UPGRADE
    if len({scheme for _, scheme in planned}) != 1:
        raise GraphqError("--target-bits plans one base scheme: drop scheme_overrides or use --disable-level")
    base, upgraded = _grid(config, config.scheme), _grid(config, upgrade)
    if upgraded.bits <= base.bits:
        raise GraphqError(f"--target-bits moves linears from {config.scheme} to a higher precision, but "
                          f"{upgrade} has no more bits: choose --fallback-scheme w8a16")
    shapes = {layer.name: (layer.in_features, layer.out_features) for layer, _ in planned}
    try:
        bits_budget_plan([], shapes, base, upgraded, config.target_bits)
    except ValueError as exc:
        raise GraphqError(f"--target-bits {config.target_bits}: {exc}") from exc


def plan_precision(
    model_path: str | Path, config: QuantConfig, planned: list[tuple[LinearLayer, str]], progress: bool, pool=None
) -> PrecisionPlan:
    """The plan for ``planned`` (each linear with the scheme the config gives it) from the config's ranking."""
    from graphq.sensitivity import SensitivityReport, analyze

    if config.target_bits is not None:  # before the analysis: a budget the plan cannot meet is refused up front
        _check_budget(config, planned)
    if config.sensitivity_file:
        report = SensitivityReport.load(config.sensitivity_file)
        source = str(config.sensitivity_file)
        if report.scheme != config.scheme:
            raise GraphqError(
                f"{config.sensitivity_file} ranks linears under {report.scheme}, but this run quantizes {config.scheme}: "
                f"rerun 'graphq analyze --scheme {config.scheme}'"
            )
    else:
        import dataclasses

        analysis_config = dataclasses.replace(config, method="rtn", disable_level=0, target_bits=None)
        report = analyze(model_path, analysis_config, num_windows=config.sensitivity_windows, progress=progress,
                         pool=pool)
        source = f"analysis of {report.windows} calibration windows"
    names = {layer.name for layer, _ in planned}
    kl = {entry.name: entry.kl for entry in report.layers}
    ranking = [name for name in report.ranking if name in names]
    missing = sorted(names - set(ranking))
    if missing:
        raise GraphqError(f"the sensitivity ranking has no entry for {missing[0]}: it was made for another model or "
                          "other exclusions; rerun 'graphq analyze' with the same options")
    if config.disable_level:
        target = config.fallback_scheme or "float"
        chosen = fallback_plan(ranking, config.disable_level)
        plan = PrecisionPlan("disable_level", source=source)
        for rank, name in enumerate(chosen, 1):
            plan.changes[name] = target
            plan.reasons[name] = f"disable_level {config.disable_level}: sensitivity rank {rank} (KL {kl[name]:.3g})"
        return plan
    upgrade = config.fallback_scheme or DEFAULT_UPGRADE
    shapes = {layer.name: (layer.in_features, layer.out_features) for layer, _ in planned}
    chosen, reached = bits_budget_plan(ranking, shapes, _grid(config, config.scheme), _grid(config, upgrade),
                                       config.target_bits, costs=kl)
    plan = PrecisionPlan("target_bits", bits_per_weight=reached, source=source)
    for name in chosen:
        plan.changes[name] = upgrade
        plan.reasons[name] = f"target_bits {config.target_bits}: sensitivity rank {ranking.index(name) + 1} (KL {kl[name]:.3g})"
    print(f"graphq: --target-bits {config.target_bits}: {len(chosen)} of {len(ranking)} linears to {upgrade}, "
          f"{reached:.3f} bits per weight", file=sys.stderr)
    return plan
