"""Choosing one option per item (a width per layer) under a total cost budget with the least summed error.

A multiple-choice knapsack, solved the way rate-distortion allocation usually is: every item starts at its cheapest
option, then the upgrade with the largest error saved per unit of cost is taken while it fits. Upgrades walk each
item's lower convex hull of (cost, error), so the greedy order is the Lagrangian-optimal one; once the best upgrade no
longer fits, smaller upgrades that still fit are taken, so little budget is left unused.
"""
from __future__ import annotations

import heapq
from collections.abc import Sequence


class AllocationError(ValueError):
    """A budget that no choice of options meets."""


def lower_hull(costs: Sequence[float], errors: Sequence[float]) -> list[int]:
    """Indices of the options on the lower convex hull of (cost, error), by increasing cost: the options worth
    choosing (an option costing more without a proportionally lower error is never the best use of the budget)."""
    order = sorted(range(len(costs)), key=lambda j: (costs[j], errors[j]))
    hull: list[int] = []
    for j in order:
        if hull and costs[j] == costs[hull[-1]]:
            continue  # same cost, larger or equal error
        if hull and errors[j] >= errors[hull[-1]]:
            continue  # costs more, saves nothing
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment a-j: drop it
            if (errors[b] - errors[a]) * (costs[j] - costs[a]) >= (errors[j] - errors[a]) * (costs[b] - costs[a]):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def allocate(costs: Sequence[Sequence[float]], errors: Sequence[Sequence[float]], budget: float) -> list[int]:
    """For each item i the chosen option index into costs[i] / errors[i], with sum of costs <= budget."""
    if len(costs) != len(errors) or any(len(c) != len(e) or not c for c, e in zip(costs, errors)):
        raise ValueError("costs and errors must list the same, non-empty options for every item")
    hulls = [lower_hull(c, e) for c, e in zip(costs, errors)]
    position = [0] * len(hulls)
    spent = sum(c[h[0]] for c, h in zip(costs, hulls))
    if spent > budget * (1 + 1e-12):
        raise AllocationError(f"the cheapest options already cost {spent:.6g}, over the budget {budget:.6g}")

    def upgrade(i: int) -> tuple[float, int, float] | None:
        h, p = hulls[i], position[i]
        if p + 1 >= len(h):
            return None
        a, b = h[p], h[p + 1]
        d_cost = costs[i][b] - costs[i][a]
        return (-(errors[i][a] - errors[i][b]) / d_cost, i, d_cost)

    heap = [u for u in map(upgrade, range(len(hulls))) if u is not None]
    heapq.heapify(heap)
    while heap:
        _, i, d_cost = heapq.heappop(heap)
        if spent + d_cost > budget * (1 + 1e-12):
            continue  # does not fit; a cheaper upgrade elsewhere may
        spent += d_cost
        position[i] += 1
        nxt = upgrade(i)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    return [h[p] for h, p in zip(hulls, position)]
