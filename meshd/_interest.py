"""Interest management: what each player sees, as per-tick differences (sans-io).

The core keeps its records in square cells (``Replication.cells``). Around
every player it *watches* the cells within the view radius plus one ring
(workers report every change there on the tick it happens), so the records
a view is built from are exact; :func:`nearest` picks each player's view
from the records in watched cells. A :class:`Viewer` remembers which record of
each entity it last sent; a view update is then ``enter`` (new in view, full
item), ``update`` (in view, record changed: just the position when the
state is the same) and ``leave`` (ids gone).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import attrs
import numpy as np
from scipy.spatial import cKDTree

Item = TypeVar("Item")
"""How the caller renders an entity for the wire (its pre-encoded bytes, say)."""


@attrs.define(eq=False)
class Viewer:
    """One connected player's side of the view stream."""

    entity: int
    sent: dict[int, list[Any]] = attrs.field(factory=dict)
    """Entity id -> the record last sent (records are replaced, never mutated)."""


def watch_cells(
    positions: Iterable[tuple[float, float]], radius: float, cell: float
) -> list[list[int]]:
    """Cells within ``radius`` of any position, plus one ring for a tick of movement."""
    reach = math.ceil(radius / cell) + 1
    cells = set()
    for x, y in positions:
        cx, cy = int(x // cell), int(y // cell)
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
    if not candidates:
        return [[centre[0]] for centre in centres]
    ids = np.fromiter((record[0] for record in candidates), dtype=np.int64, count=len(candidates))
    points = np.array([(record[2], record[3]) for record in candidates], dtype=np.float64)
    k = min(cap, len(candidates))
    distances, found = cKDTree(points).query(
        np.array([(centre[2], centre[3]) for centre in centres], dtype=np.float64),
        k=k,
        distance_upper_bound=radius,
    )
    if k == 1:
        distances, found = distances[:, None], found[:, None]
    views = []
    for centre, row_distances, row in zip(centres, distances, found, strict=True):
        view = ids[row[np.isfinite(row_distances)]].tolist()
        own = centre[0]
        if not view or view[0] != own:
            if own in view:
                view.remove(own)
            view = [own, *view][:cap]
        views.append(view)
    return views


def update_view(
    viewer: Viewer,
    ids: list[int],
    records: Mapping[int, list[Any]],
    item: Callable[[list[Any]], Item],
    moved: Callable[[list[Any]], Item],
) -> tuple[list[Item], list[Item], list[int]]:
    """(enter, update, leave) for ``viewer`` now seeing ``ids``; remembers what it sent.

    An entity whose state is unchanged since it was last sent and that only
    moved is sent as ``moved(record)`` (its position alone), otherwise as
    ``item(record)``.
    """
    sent = viewer.sent
    enter, update = [], []
    now = {}
    for entity_id in ids:
        record = records[entity_id]
        now[entity_id] = record
        last = sent.get(entity_id)
        if last is None:
            enter.append(item(record))
        elif last is not record:
            update.append(moved(record) if last[5] == record[5] else item(record))
    leave = [entity_id for entity_id in sent if entity_id not in now]
    viewer.sent = now
    return enter, update, leave
