"""Pareto fronts over (cost, quality) points."""

from __future__ import annotations

from collections.abc import Sequence


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated by another (lower cost and higher quality win).

    Sorted by increasing cost. A point dominates another when its cost is no higher and its
    quality no lower, and it is strictly better in one of the two.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best = float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front
