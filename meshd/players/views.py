"""From the core's records to the bytes of every player's ``View`` (pure).

Two halves, one on each side of the core-gateway link:

- :class:`Publisher` (in the core): for each gateway, the records in the
  cells it watches that changed since its last :class:`Publish`, found by
  identity (records are replaced, never mutated) and each state encoded once
  a tick however many gateways get it.
- :class:`Mirror` (in a gateway): the records its players can see, as sorted
  numpy arrays of ids and positions plus each entity's encoded kind and
  state; :meth:`Mirror.views` builds every player's view update at once.
  One k-d tree query answers every player; the items of entities that moved
  are packed by numpy into one table a tick (fixed width: a 4- or 8-byte id
  and single-precision x, y, z, 21 or 25 bytes) and spliced into each frame.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import cbor2
import numpy as np

from meshd.players.interest import nearest_rows
from meshd.players.messages import Publish
from meshd.players.protocol import view_frame, view_head

_MOVE_32 = np.dtype(
    [("head", "u1"), ("id_head", "u1"), ("id", ">u4")]
    + [(f"{axis}_head", "u1") if i % 2 == 0 else (axis, ">f4") for axis in "xyz" for i in (0, 1)]
)
_MOVE_64 = np.dtype(
    [("head", "u1"), ("id_head", "u1"), ("id", ">u8")]
    + [(f"{axis}_head", "u1") if i % 2 == 0 else (axis, ">f4") for axis in "xyz" for i in (0, 1)]
)
_FLOAT32 = 0xFA
_ID_HEADS = {4: 0x1A, 8: 0x1B}
_ARRAY_4, _ARRAY_6 = b"\x84", b"\x86"


def _pack_items(ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``[id, x, y, z]`` per row as CBOR, fixed width (single-precision floats)."""
    wide = bool(len(ids)) and int(ids.max()) >= 1 << 32
    table = np.empty(len(ids), dtype=_MOVE_64 if wide else _MOVE_32)
    table["head"] = _ARRAY_4[0]
    table["id_head"] = _ID_HEADS[8 if wide else 4]
    table["id"] = ids
    for column, axis in enumerate("xyz"):
        table[f"{axis}_head"] = _FLOAT32
        table[axis] = positions[:, column]
    return table


class Publisher:
    """The core's side: what each gateway holds, and what to send it after a tick."""

    def __init__(self, to_dict: Callable[[str, Any], dict[str, Any]]) -> None:
        self._to_dict = to_dict
        self._held: dict[int, dict[int, list[Any]]] = {}
        """Per gateway: id -> the record object it was last sent."""
        self._encoded: dict[int, bytes] = {}
        self._encoded_tick = -1

    def forget(self, gateway: int) -> None:
        """A gateway process is gone: its successor starts from nothing."""
        self._held.pop(gateway, None)

    def publish(
        self,
        gateway: int,
        tick: int,
        records: Mapping[int, list[Any]],
        watched: Iterable[int],
    ) -> tuple[bytes, bytes, list[list[Any]], bytes]:
        """``(ids, positions, states, gone)`` of a :class:`Publish` for ``gateway``.

        ``watched``: the ids in the cells around its players now.
        """
        if tick != self._encoded_tick:
            self._encoded, self._encoded_tick = {}, tick
        held = self._held.setdefault(gateway, {})
        now = set(watched)
        gone = list(held.keys() - now)
        for entity_id in gone:
            del held[entity_id]
        ids: list[int] = []
        positions: list[float] = []
        states: list[list[Any]] = []
        for entity_id in now:
            record = records[entity_id]
            before = held.get(entity_id)
            if before is record:
                continue
            held[entity_id] = record
            ids.append(entity_id)
            positions.extend(record[2:5])
            if before is None or before[1] != record[1] or before[5] != record[5]:
                states.append([entity_id, record[1], self._state_bytes(record)])
        return (
            np.array(ids, dtype=np.int64).tobytes(),
            np.array(positions, dtype=np.float64).tobytes(),
            states,
            np.array(gone, dtype=np.int64).tobytes(),
        )

    def _state_bytes(self, record: list[Any]) -> bytes:
        found = self._encoded.get(record[0])
        if found is None:
            found = self._encoded[record[0]] = cbor2.dumps(self._to_dict(record[1], record[5]))
        return found


class Mirror:
    """A gateway's copy of the records its players can see, and their views."""

    def __init__(self) -> None:
        self.ids = np.empty(0, dtype=np.int64)
        """Every id held, ascending; ``positions`` row by row."""
        self.positions = np.empty((0, 3), dtype=np.float64)
        self.kinds: dict[int, bytes] = {}
        self.states: dict[int, bytes] = {}
        self.tick = 0
        self._moved = np.zeros(1, dtype=bool)
        """Per row (and one for "no entity"): moved since the last tick, state the same."""
        self._restated = np.zeros(1, dtype=bool)
        """Per row: state changed (or new) since the last tick: sent whole."""
        self._viewers = np.empty(0, dtype=np.int64)
        self._shown_rows = np.empty((0, 0), dtype=np.int64)
        self._shown_ids = np.empty(0, dtype=np.int64)
        """The viewers of the last :meth:`views`, what each was shown (rows of
        ``_shown_ids``, the ids then, -1 last for padding)."""
        self._fresh: set[int] = set()

    def apply(self, publish: Publish) -> None:
        """Take the changes of one tick."""
        gone = np.frombuffer(publish.gone, dtype=np.int64)
        changed = np.frombuffer(publish.ids, dtype=np.int64)
        moved = np.frombuffer(publish.positions, dtype=np.float64).reshape(-1, 3)
        keep = ~np.isin(self.ids, np.concatenate([gone, changed]))
        ids = np.concatenate([self.ids[keep], changed])
        positions = np.concatenate([self.positions[keep], moved])
        order = np.argsort(ids, kind="stable")
        self.ids, self.positions = ids[order], positions[order]
        for entity_id in gone.tolist():
            self.kinds.pop(entity_id, None)
            self.states.pop(entity_id, None)
        restated = []
        for entity_id, kind, state in publish.states:
            self.kinds[entity_id] = cbor2.dumps(kind)
            self.states[entity_id] = state
            restated.append(entity_id)
        self.tick = publish.tick
        count = len(self.ids)
        self._moved = np.zeros(count + 1, dtype=bool)
        self._moved[np.searchsorted(self.ids, changed)] = True
        self._restated = np.zeros(count + 1, dtype=bool)
        self._restated[np.searchsorted(self.ids, np.array(restated, dtype=np.int64))] = True
        self._moved &= ~self._restated

    def restart_view(self, entity_id: int) -> None:
        """The next view of ``entity_id``'s player starts over (everything enters)."""
        self._fresh.add(entity_id)

    def views(self, viewers: list[int], acks: list[int], radius: float, cap: int) -> list[bytes]:
        """The ``View`` frame of this tick for each viewer entity (which must be held).

        All viewers at once: the k-d tree query, which entities entered,
        stayed in or left each view (against the views of the last call),
        and the items of entities that only moved (cut from one packed
        table) are numpy operations over the whole gateway; what remains per
        viewer is joining its bytes.
        """
        players = len(viewers)
        if not players:
            return []
        count = len(self.ids)
        entities = np.array(viewers, dtype=np.int64)
        own = np.searchsorted(self.ids, entities)
        rows = nearest_rows(self.positions[:, :2], self.positions[own, :2], own, radius, cap)
        before, before_rows = self._before(entities, cap)
        stayed, kept = _shared(rows, before_rows, count)
        entering = (rows < count) & ~stayed
        leaving = (before >= 0) & ~kept
        moving = stayed & self._moved[rows]
        restating = stayed & self._restated[rows]
        self._viewers, self._shown_rows, self._shown_ids = entities, rows, np.append(self.ids, -1)
        table = _pack_items(self.ids, self.positions)
        width = table.itemsize
        # Rows taken as opaque bytes: ten times faster than as structured records.
        moves = np.take(table.view(f"V{width}"), rows[moving]).tobytes()
        packed = table.tobytes()
        # Per viewer, from flat (viewer-major) lists: where its moves, enters,
        # whole updates and leaves end.
        move_counts = moving.sum(axis=1)
        move_ends = (np.cumsum(move_counts) * width).tolist()
        move_counts = move_counts.tolist()
        enters, enter_ends = self._items(rows, entering, packed, width)
        wholes, whole_ends = self._items(rows, restating, packed, width)
        leaves = before[leaving].tolist()
        leave_ends = np.cumsum(leaving.sum(axis=1)).tolist()
        head = view_head(self.tick)
        moves_view = memoryview(moves)
        frames = []
        move_start = enter_start = whole_start = leave_start = 0
        for index in range(players):
            move_end, enter_end = move_ends[index], enter_ends[index]
            whole_end, leave_end = whole_ends[index], leave_ends[index]
            update, updates = moves_view[move_start:move_end], move_counts[index]
            if whole_end != whole_start:
                update = b"".join((update, *wholes[whole_start:whole_end]))
                updates += whole_end - whole_start
            frames.append(
                view_frame(
                    head,
                    acks[index],
                    enters[enter_start:enter_end],
                    updates,
                    update,
                    leaves[leave_start:leave_end],
                )
            )
            move_start, enter_start, whole_start, leave_start = (
                move_end,
                enter_end,
                whole_end,
                leave_end,
            )
        return frames

    def _items(
        self, rows: np.ndarray, chosen: np.ndarray, packed: bytes, width: int
    ) -> tuple[list[bytes], list[int]]:
        """The full items of ``rows[chosen]`` (viewer-major) and where each viewer's end.

        ``packed``: the tick's ``[id, x, y, z]`` items, ``width`` bytes a
        row; a full item is the same id and position around its kind and state.
        """
        unique, where = np.unique(rows[chosen], return_inverse=True)
        ids, kinds, states = self.ids, self.kinds, self.states
        items = []
        for row in unique.tolist():
            entity_id = int(ids[row])
            moved = packed[row * width : (row + 1) * width]
            items.append(
                b"".join((_ARRAY_6, moved[1:-15], kinds[entity_id], moved[-15:], states[entity_id]))
            )
        return [items[i] for i in where.tolist()], np.cumsum(chosen.sum(axis=1)).tolist()

    def _before(self, entities: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
        """What each viewer was shown by the last call: its ids (-1 padded) and their
        rows now (``len(ids)`` pads, ``len(ids) + 1`` for an entity since let go).

        A new viewer, or one whose view restarts, was shown nothing.
        """
        count = len(self.ids)
        before = np.full((len(entities), cap), -1, dtype=np.int64)
        before_rows = np.full((len(entities), cap), count, dtype=np.int64)
        last = self._viewers
        if len(last) and self._shown_rows.shape[1] == cap:
            order = np.argsort(last)
            at = order[np.searchsorted(last, entities, sorter=order).clip(max=len(last) - 1)]
            known = last[at] == entities
            if self._fresh:
                known &= ~np.isin(entities, list(self._fresh))
            old_ids = self._shown_ids
            # Where each entity of the last call's mirror is now (its padding row stays padding).
            moved_to = np.searchsorted(self.ids, old_ids).clip(max=count)
            moved_to[np.append(self.ids, -2)[moved_to] != old_ids] = count + 1
            moved_to[-1] = count
            old_rows = self._shown_rows[at[known]]
            before[known] = old_ids[old_rows]
            before_rows[known] = moved_to[old_rows]
        self._fresh.clear()
        return before, before_rows

    def held(self, entity_ids: list[int]) -> list[bool]:
        """Whether each of ``entity_ids`` is held (its view can be built)."""
        rows = np.searchsorted(self.ids, entity_ids).clip(max=len(self.ids))
        return (np.append(self.ids, -1)[rows] == entity_ids).tolist()


TABLE_BYTES = 1 << 22
"""Scratch a membership table may take: players are done in blocks that fit."""


def _shared(rows: np.ndarray, before_rows: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per viewer: which of ``rows`` are in its ``before_rows``, and which of those in ``rows``.

    Rows are small integers (``count`` pads ``rows``, ``count + 1`` marks
    an entity let go), so a boolean table of (viewer, row) answers both in
    linear time, a block of viewers at a time.
    """
    players = len(rows)
    width = count + 2
    stayed = np.zeros(rows.shape, dtype=bool)
    kept = np.zeros(rows.shape, dtype=bool)
    block = max(1, TABLE_BYTES // width)
    for first in range(0, players, block):
        part = slice(first, first + block)
        shift = (np.arange(min(block, players - first), dtype=np.int64) * width)[:, None]
        now_keys, before_keys = rows[part] + shift, before_rows[part] + shift
        table = np.zeros(len(shift) * width, dtype=bool)
        table[before_keys] = True
        stayed[part] = table[now_keys]
        table[:] = False
        table[now_keys] = True
        kept[part] = table[before_keys]
    stayed &= rows < count
    kept &= before_rows < count
    return stayed, kept
