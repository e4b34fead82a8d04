"""Interest management: what each player sees, as per-tick differences (sans-io).

The core keeps its records in square cells (``Replication.cells``). Around
every player it *watches* the cells within the view radius plus one ring
(workers report every change there on the tick it happens), so the records
a view is built from are exact. A :class:`Viewer` remembers which record of
each entity it last sent; a view update is then ``enter`` (new in view, full
item), ``update`` (in view, record changed) and ``leave`` (ids gone).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import attrs

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


def visible(
    me: list[Any],
    records: Mapping[int, list[Any]],
    cells: Mapping[tuple[int, int], set[int]],
    cell: float,
    radius: float,
    cap: int,
) -> list[int]:
    """Ids within ``radius`` of record ``me``, nearest first (``me`` first), at most ``cap``."""
    x, y = me[2], me[3]
    reach = math.ceil(radius / cell)
    cx, cy = int(x // cell), int(y // cell)
    r2 = radius * radius
    found = []
    for gx in range(cx - reach, cx + reach + 1):
        for gy in range(cy - reach, cy + reach + 1):
            for entity_id in cells.get((gx, gy), ()):
                record = records[entity_id]
                d2 = (record[2] - x) ** 2 + (record[3] - y) ** 2
                if d2 <= r2:
                    found.append((d2, entity_id != me[0], entity_id))
    found.sort()
    return [entity_id for _d2, _not_me, entity_id in found[:cap]]


def update_view(
    viewer: Viewer,
    ids: list[int],
    records: Mapping[int, list[Any]],
    item: Callable[[list[Any]], Item],
) -> tuple[list[Item], list[Item], list[int]]:
    """(enter, update, leave) for ``viewer`` now seeing ``ids``; remembers what it sent."""
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
            update.append(item(record))
    leave = [entity_id for entity_id in sent if entity_id not in now]
    viewer.sent = now
    return enter, update, leave
