"""Which linears leave the base scheme, from a sensitivity ranking (pure arithmetic, no graph).

- ``fallback_plan``: msModelSlim's disable_level: the N most sensitive linears stay float or take a fallback scheme.
- ``bits_budget_plan``: mixed precision under an average bits-per-weight budget: linears are moved to the
  higher-precision scheme while the average over every planned weight (integers, scales and zero points as stored)
  stays within the budget, in ranking order, or, given each linear's measured cost (its KL alone), by cost per
  extra bit, the greedy answer to the knapsack: a small v_proj with a third of a large down_proj's KL buys more
  per bit. A linear whose move would overshoot is passed over and the next one is tried, so the budget is used as
  fully as the order allows.
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
    costs: dict[str, float] | None = None,
) -> tuple[list[str], float]:
    """Linears to move from ``base`` to ``upgrade`` and the average bits per weight reached.

    ``shapes``: (in_features, out_features) of every planned linear; linears absent from ``ranking`` stay at base.
    Without ``costs`` the ranking's order (most sensitive first) is kept; with them (what each linear costs the
    model at base, e.g. its KL) the linears go by cost per extra stored bit, ties in ranking order.
    Raises ValueError when the base scheme alone already exceeds the budget.
    """
    weights = sum(k * n for k, n in shapes.values())
    total = sum(base.storage_bits(k, n) for k, n in shapes.values())
    if total / weights > target_bits + 1e-12:
        raise ValueError(
            f"the base scheme already takes {total / weights:.3f} bits per weight, more than the target {target_bits}"
        )
    extra_bits = {name: upgrade.storage_bits(*shapes[name]) - base.storage_bits(*shapes[name])
                  for name in ranking if name in shapes}
    order = list(extra_bits)
    if costs is not None:
        order.sort(key=lambda name: -costs[name] / max(extra_bits[name], 1))  # stable: ties keep the ranking's order
    chosen = []
    for name in order:
        extra = extra_bits[name]
        if (total + extra) / weights <= target_bits + 1e-12:
            chosen.append(name)
            total += extra
    return chosen, total / weights
