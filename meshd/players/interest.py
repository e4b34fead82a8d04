"""Interest management: which cells to watch, and who is near whom (pure).

The core keeps its records in square cells (``Replication.cells``). Around
every player it *watches* the cells within the view radius plus one ring
(workers report every change there on the tick it happens), so the records
a view is built from are exact. :func:`nearest_rows` picks what each player
sees, for all of a gateway's players at once (:mod:`meshd.players.views`
turns that into view updates).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from scipy.spatial import cKDTree

from meshd.mesh.layout import cell_of


def watch_cells(
    positions: Iterable[tuple[float, float]], radius: float, cell: float
) -> list[list[int]]:
    """Cells within ``radius`` of any position, plus one ring for a tick of movement."""
    reach = math.ceil(radius / cell) + 1
    centres = {cell_of(x, y, cell) for x, y in positions}
    cells = set()
    for cx, cy in centres:  # a crowd shares a few cells: expand each once
        for dx in range(-reach, reach + 1):
            for dy in range(-reach, reach + 1):
                cells.add((cx + dx, cy + dy))
    return [list(c) for c in sorted(cells)]


def nearest_rows(
    points: np.ndarray, centres: np.ndarray, own: np.ndarray, radius: float, cap: int
) -> np.ndarray:
    """For each centre, the rows of ``points`` within ``radius``: nearest first, at most ``cap``.

    ``points``: (n, 2) positions; ``centres``: (m, 2); ``own``: the row of
    each centre's own entity in ``points``, which always comes first. The
    answer is (m, cap), padded with ``n`` (no entity). One k-d tree answers
    every centre in one vectorised query, so a crowd costs C loops, not
    Python ones.
    """
    count = len(points)
    rows = np.full((len(centres), cap), count, dtype=np.int64)
    k = min(cap, count)
    if not k or not len(centres):
        return rows
    _distances, found = cKDTree(points).query(centres, k=k, distance_upper_bound=radius)
    rows[:, :k] = found.reshape(len(centres), k)
    # Another entity at the very same spot can come first; such rows are rare.
    for centre in np.nonzero(rows[:, 0] != own)[0].tolist():
        me = int(own[centre])
        others = [row for row in rows[centre].tolist() if row not in (me, count)]
        fixed = [me, *others][:cap]
        rows[centre] = fixed + [count] * (cap - len(fixed))
    return rows
