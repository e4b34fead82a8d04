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

import numpy as np
from scipy.spatial import cKDTree


def watch_cells(positions: np.ndarray, radius: float, cell: float) -> list[list[int]]:
    """Cells within ``radius`` of any position, plus one ring for a tick of movement.

    ``positions``: (n, 2). Sorted ``[cx, cy]`` pairs; the cell of a point is
    :func:`~meshd.mesh.layout.cell_of`'s (``floor(x / cell)``). Vectorised:
    a thousand players spread over the world watch tens of thousands of cells.
    """
    if not len(positions):
        return []
    reach = math.ceil(radius / cell) + 1
    centres = np.floor_divide(positions, cell).astype(np.int64)
    span = np.arange(-reach, reach + 1, dtype=np.int64)
    around = np.stack(np.meshgrid(span, span, indexing="ij"), axis=-1).reshape(-1, 2)
    cells = (_unique_rows(centres)[:, None, :] + around[None, :, :]).reshape(-1, 2)
    return _unique_rows(cells).tolist()


def _unique_rows(cells: np.ndarray) -> np.ndarray:
    """The distinct rows of an (n, 2) int64 array, sorted by x then y."""
    # One 64-bit key per cell, each coordinate shifted to be non-negative
    # (cell coordinates stay far inside 30 bits), so keys sort as the pairs do.
    keys = np.unique(((cells[:, 0] + _HALF) << 32) + (cells[:, 1] + _HALF))
    return np.stack([(keys >> 32) - _HALF, (keys & 0xFFFFFFFF) - _HALF], axis=-1)


_HALF = 1 << 30


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
