"""Which linears leave the base scheme, from a sensitivity ranking (pure arithmetic, no graph).

- ``fallback_plan``: msModelSlim's disable_level: the N most sensitive linears stay float or take a fallback scheme.
- ``bits_budget_plan``: mixed precision under an average bits-per-weight budget: the most sensitive linears are
  moved to the higher-precision scheme, in ranking order, while the average over every planned weight (integers,
  scales and zero points as stored) stays within the budget. A linear whose move would overshoot is passed over
  and the next (smaller) one is tried, so the budget is used as fully as the ranking allows.
"""

from __future__ import annotations

from dataclasses import dataclass

SCALE_BITS = 32  # graphq stores weight scales as float32


@dataclass(frozen=True)
class WeightGrid:
    """What one linear costs under a scheme: bits per integer, the group along K (-1: per channel), zero points."""

    bits: int
    group_size: int
    symmetric: bool

    def storage_bits(self, in_features: int, out_features: int) -> int:
        groups = 1 if self.group_size == -1 or self.group_size >= in_features else -(-in_features // self.group_size)
        per_group = SCALE_BITS + (0 if self.symmetric else self.bits)
        return in_features * out_features * self.bits + groups * out_features * per_group


def fallback_plan(ranking: list[str], count: int) -> list[str]:
    """The ``count`` most sensitive linears (ranking is most sensitive first)."""
    if count < 0:
        raise ValueError("count must be >= 0")
    return list(ranking[:count])


def bits_budget_plan(
    ranking: list[str],
    shapes: dict[str, tuple[int, int]],
    base: WeightGrid,
    upgrade: WeightGrid,
    target_bits: float,
) -> tuple[list[str], float]:
    """Linears to move from ``base`` to ``upgrade`` (most sensitive first) and the average bits per weight reached.

    ``shapes``: (in_features, out_features) of every planned linear; linears absent from ``ranking`` stay at base.
    Raises ValueError when the base scheme alone already exceeds the budget.
    """
    weights = sum(k * n for k, n in shapes.values())
    total = sum(base.storage_bits(k, n) for k, n in shapes.values())
    if total / weights > target_bits + 1e-12:
        raise ValueError(
            f"the base scheme already takes {total / weights:.3f} bits per weight, more than the target {target_bits}"
        )
    chosen = []
    for name in ranking:
        if name not in shapes:
            continue
        k, n = shapes[name]
        extra = upgrade.storage_bits(k, n) - base.storage_bits(k, n)
        if (total + extra) / weights <= target_bits + 1e-12:
            chosen.append(name)
            total += extra
    return chosen, total / weights
