"""The persisted form of the world, and its hash.

A stored entity row is ``(id, kind, x, y, z, state)`` with ``state`` the
canonical CBOR of the state as a field-name map, so the database stays
readable without the plugins and survives added fields. The world hash is
computed over exactly these rows plus what tick ``T+1`` needs (next id,
pending events), so a live daemon and an offline database hash alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
import cbor2

Row = tuple[int, str, float, float, float, bytes]


@attrs.define
class WorldSnapshot:
    """Everything tick ``tick + 1`` needs."""

    tick: int
    seed: int
    next_id: int
    records: list[list[Any]]
    events: list[list[Any]]
    quarantined: list[int] = attrs.field(factory=list)


@attrs.define
class Delta:
    """One whole tick's changes, written in one transaction."""

    tick: int
    seed: int
    next_id: int
    events: list[list[Any]]
    upserts: list[list[Any]]
    deletes: list[int]
    quarantined: list[int] = attrs.field(factory=list)
    players: list[tuple[str, int]] = attrs.field(factory=list)
    """Players' new entities: (name, entity id); their accounts are already stored."""


def encode_state(fields: Sequence[str], values: Sequence[Any]) -> bytes:
    return cbor2.dumps(dict(zip(fields, values, strict=True)), canonical=True)


def to_row(record: Sequence[Any], schema: Mapping[str, Sequence[str]]) -> Row:
    entity_id, kind, x, y, z, state = record
    return (entity_id, kind, x, y, z, encode_state(schema[kind], state))


def world_hash(
    rows: Iterable[Row],
    next_id: int,
    events: Sequence[Sequence[Any]],
    quarantined: Iterable[int] = (),
) -> str:
    """SHA-256 over the rows (in id order), the id counter, pending events and quarantine."""
    digest = hashlib.sha256()
    for entity_id, kind, x, y, z, state in rows:
        digest.update(cbor2.dumps([entity_id, kind, x, y, z], canonical=True))
        digest.update(state)
    digest.update(
        cbor2.dumps([next_id, sorted(list(e) for e in events), sorted(quarantined)], canonical=True)
    )
    return digest.hexdigest()
