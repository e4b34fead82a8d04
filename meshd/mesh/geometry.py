"""Geometry helpers for plugins."""

from __future__ import annotations

from collections.abc import Iterable

from meshd.mesh.step import View


def first_hit(
    x0: float,
    y0: float,
    x1: float,
    y1: float,
    candidates: Iterable[View],
    radius: float,
    skip: int | None = None,
) -> int | None:
    """The id of the candidate first touched by a point moving from (x0, y0) to (x1, y1).

    A candidate is touched when it comes within ``radius`` of the segment;
    ties along the segment go to the lowest id, so the answer does not depend
    on the order of ``candidates``. ``skip`` excludes one id (the shooter).
    """
    dx, dy = x1 - x0, y1 - y0
    length2 = dx * dx + dy * dy or 1e-12
    best: tuple[float, int] | None = None
    for other in candidates:
        if other.id == skip:
            continue
        t = max(0.0, min(1.0, ((other.x - x0) * dx + (other.y - y0) * dy) / length2))
        px, py = x0 + t * dx - other.x, y0 + t * dy - other.y
        if px * px + py * py <= radius * radius and (best is None or (t, other.id) < best):
            best = (t, other.id)
    return None if best is None else best[1]
