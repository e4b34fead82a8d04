"""Interest management: what each player sees, as per-tick differences (sans-io).

The core keeps its records in square cells (``Replication.cells``). Around
every player it *watches* the cells within the view radius plus one ring
(workers report every change there on the tick it happens), so the records
a view is built from are exact; :func:`nearest` picks each player's view
from the records in watched cells. A :class:`Viewer` remembers which ids it
last showed; given what changed since the last view update, a view update is
``enter`` (new in view, full item), ``update`` (in view and changed: the
caller sends just the position when the state is the same) and ``leave``
(ids gone).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any, TypeVar

import attrs
import numpy as np
from scipy.spatial import cKDTree

from meshd.mesh.layout import cell_of

_position = itemgetter(2, 3)
"""A record's (x, y), in C."""

Item = TypeVar("Item")
"""How the caller renders an entity for the wire (its pre-encoded bytes, say)."""


@attrs.define(eq=False)
class Viewer:
    """One connected player's side of the view stream."""

    entity: int
    shown: set[int] = attrs.field(factory=set)
    """Ids in the view last sent."""


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


def nearest(
    centres: Sequence[list[Any]], candidates: Sequence[list[Any]], radius: float, cap: int
) -> list[list[int]]:
    """For each centre record, the ids of candidate records within ``radius``.

    Nearest first (the centre's own id first), at most ``cap``. One k-d tree
    over the candidates answers every centre in one vectorised query, so a
    crowd of players costs C loops, not Python ones.
    """
    if not candidates or not centres:
        return [[centre[0]] for centre in centres]
    count = len(candidates)
    ids = np.empty(count + 1, dtype=np.int64)  # the last slot answers a miss
    ids[:count] = np.fromiter((record[0] for record in candidates), dtype=np.int64, count=count)
    points = np.array(list(map(_position, candidates)), dtype=np.float64)
    k = min(cap, count)
    distances, found = cKDTree(points).query(
        np.array(list(map(_position, centres)), dtype=np.float64),
        k=k,
        distance_upper_bound=radius,
    )
    if k == 1:
        distances, found = distances[:, None], found[:, None]
    # A miss is reported as index ``count``; results are nearest first, so a
    # row's hits are its first ``within`` columns.
    rows = ids[found].tolist()
    within = np.isfinite(distances).sum(axis=1).tolist()
    views = []
    for centre, row, hits in zip(centres, rows, within, strict=True):
        view = row[:hits]
        own = centre[0]
        if not view or view[0] != own:  # another entity at the very same spot came first
            if own in view:
                view.remove(own)
            view = [own, *view][:cap]
        views.append(view)
    return views


def update_view(
    viewer: Viewer,
    ids: list[int],
    changes: Mapping[int, Item],
    entering: Callable[[int], Item],
) -> tuple[list[Item], list[Item], list[int]]:
    """(enter, update, leave) for ``viewer`` now seeing ``ids``; remembers what it showed.

    ``changes``: for each entity changed since the last view update, what a
    viewer that already sees it is sent; ``entering(id)``: what a viewer new
    to it is sent. Set operations do the per-entity work in C, so a crowd's
    views cost a few Python operations per viewer, not per entity.
    """
    shown = viewer.shown
    now = set(ids)
    enter = [entering(entity_id) for entity_id in ids if entity_id not in shown]
    update = [changes[entity_id] for entity_id in now & shown & changes.keys()]
    leave = list(shown - now)
    viewer.shown = now
    return enter, update, leave
