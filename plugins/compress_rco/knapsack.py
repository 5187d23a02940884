"""Budget-constrained choice of one candidate per layer: a multiple-choice knapsack by dynamic
programming (IST-DASLab/RCO ``src/search/quant.py``: ``budget_constrained_argmax`` inside the
search, ``round_with_budget_dp`` for the final assignment).

Costs are discretized on a grid of ``units`` steps spanning the budget; the official code uses
500 units per bit inside the search and 10,000 for the final rounding (1,500 and 30,000 at
3.0 bits), which is what ``units`` means here at a 3-bit budget. Costs are rounded to the
nearest unit as there; unlike there, a choice whose real cost exceeds the budget through
that rounding is not returned: the capacity is lowered by the excess and the program rerun.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def knapsack(values: np.ndarray, costs: np.ndarray, capacity: int, exact: bool = False) -> list[int] | None:
    """One index per row maximizing ``Σ values[i, k_i]`` with ``Σ costs[i, k_i] ≤ capacity``.

    ``values`` (rows, choices) are floats, −inf where a row lacks a choice; ``costs`` are
    non-negative integers. With ``exact`` the total cost is the largest reachable one at most
    ``capacity`` first (the budget met as closely as it can be), the value second. None when
    nothing fits.
    """
    rows, choices = values.shape
    best = np.full(capacity + 1, -np.inf)
    best[0] = 0.0
    back = np.zeros((rows, capacity + 1), dtype=np.int32)
    table = np.empty((choices, capacity + 1))
    for i in range(rows):
        table.fill(-np.inf)
        for k in range(choices):
            cost = int(costs[i, k])
            if np.isfinite(values[i, k]) and cost <= capacity:
                table[k, cost:] = best[: capacity + 1 - cost] + values[i, k]
        back[i] = table.argmax(0)  # the first best choice, as the official loop keeps it
        best = table[back[i], np.arange(capacity + 1)]
    reachable = np.flatnonzero(np.isfinite(best))
    if reachable.size == 0:
        return None
    total = int(reachable.max()) if exact else int(np.argmax(best))
    chosen = [0] * rows
    for i in range(rows - 1, -1, -1):
        chosen[i] = int(back[i, total])
        total -= int(costs[i, chosen[i]])
    return chosen


def budget_choice(
    values: torch.Tensor, costs: torch.Tensor, valid: torch.Tensor, budget: float, units: int, exact: bool = False
) -> list[int]:
    """:func:`knapsack` on real ``costs`` (per targeted weight, summing to the configuration's cost)
    against ``budget``, on a grid of ``units`` steps; the chosen configuration costs at most ``budget``."""
    step = budget / units
    masked = values.detach().double().masked_fill(~valid, float("-inf")).cpu().numpy()
    real = costs.detach().double().cpu().numpy()
    grid = np.rint(real / step).astype(np.int64)
    capacity = units
    while capacity >= 0:
        chosen = knapsack(masked, grid, capacity, exact)
        if chosen is None:
            break
        spent = float(sum(real[i, k] for i, k in enumerate(chosen)))
        if spent <= budget * (1 + 1e-12):
            return chosen
        capacity -= max(1, math.ceil((spent - budget) / step))
    raise ValueError(f"no configuration costs at most {budget:.6g} per weight")
