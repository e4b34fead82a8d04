"""The persisted form of the world and its hash (pure).

A stored entity row is ``(id, kind, x, y, z, state)`` with ``state`` the
canonical CBOR of the state as a field-name map, so the database stays
readable without the plugins and survives added fields. The world hash is
computed over exactly these rows plus what tick ``T+1`` needs (next id,
pending events, quarantine), so a live daemon and an offline database hash
alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import attrs
import cattrs
import cbor2

from meshd.common.wire import CONVERTER
from meshd.store.schema import StoreError

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
    timers: list[list[Any]] = attrs.field(factory=list)
    """Events sent for a later tick: ``[due tick, target, sender, seq, name, data]``."""
    code: str = ""
    """The plugins' code digest when the world was last written ("" before meshd kept it)."""
    world: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    """Each plugin's world state, as a field map."""
    converted: list[int] = attrs.field(factory=list)
    """Entities to store (again) before the first tick: converted to their kind's class on
    loading (the class changed, or the world is from before meshd kept the classes), or
    every entity of a world just created."""
    classes: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    """The state classes' signatures the world was written under (``PluginSet.classes``;
    empty before meshd kept them)."""


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
    timers: list[list[Any]] = attrs.field(factory=list)
    code: str = ""
    """The plugins' code digest (``PluginSet.code_digest``)."""
    world: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    """Each plugin's world state, as a field map."""
    players: list[tuple[str, int]] = attrs.field(factory=list)
    """Players' new entities: (name, entity id); their accounts are already stored."""
    classes: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    """The state classes' signatures the states are in (``PluginSet.classes``)."""


class StateCodec(Protocol):
    """What decoding needs of a kind's state class (``meshd.mesh.plugins.KindCodec``)."""

    @property
    def cls(self) -> type: ...

    @property
    def fields(self) -> tuple[str, ...]: ...

    @property
    def signature(self) -> list[list[str]]: ...

    @property
    def migrate(self) -> Callable[[dict[str, Any]], dict[str, Any]] | None: ...

    def from_dict(
        self, data: Mapping[str, Any], converter: cattrs.Converter
    ) -> tuple[Any, ...]: ...


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
    timers: Sequence[Sequence[Any]] = (),
    world: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """SHA-256 over the rows (in id order), the id counter, pending events, quarantine,
    timers and world state (a world without the last two hashes as before they existed)."""
    digest = hashlib.sha256()
    for entity_id, kind, x, y, z, state in rows:
        digest.update(cbor2.dumps([entity_id, kind, x, y, z], canonical=True))
        digest.update(state)
    digest.update(
        cbor2.dumps([next_id, sorted(list(e) for e in events), sorted(quarantined)], canonical=True)
    )
    if timers:
        digest.update(cbor2.dumps(sorted(list(timer) for timer in timers), canonical=True))
    if world:
        digest.update(cbor2.dumps(world, canonical=True))
    return digest.hexdigest()


def decode_state(
    entity_id: int, kind: str, data: Any, codec: StateCodec
) -> tuple[tuple[Any, ...], bool]:
    """A stored entity's state converted to its kind's class as it is now, and whether it
    was migrated; what to do if it cannot be.

    The values are converted to the class's field types; a state that does
    not fit the class as it is goes through the kind's ``migrate``, if it has
    one. (A state stored under the same class is not converted: see
    :func:`restore_state`.)
    """
    entity = f"stored entity {entity_id} (kind {kind!r})"
    try:
        return _fit(data, codec), False
    except _Misfit as misfit:
        if codec.migrate is None:
            raise StoreError(f"{entity} {misfit}; or declare Kind(migrate=...)") from None
    try:
        return _fit(codec.migrate(dict(data)), codec), True
    except _Misfit as misfit:
        raise StoreError(f"{entity}, migrated by its kind's migrate, {misfit}") from None
    except Exception as exc:
        raise StoreError(f"{entity}: its kind's migrate failed: {exc!r}") from None


def restore_state(data: Any, codec: StateCodec, stored_signature: Any) -> tuple[Any, ...] | None:
    """A stored state exactly as the plugin wrote it (an ``int`` in a ``float`` field stays an
    ``int``), if it was stored under a class with the same signature; else None (convert it
    with :func:`decode_state`). So a restart continues the very world that stopped."""
    if stored_signature != codec.signature or not isinstance(data, Mapping):
        return None
    if data.keys() != set(codec.fields):
        return None
    return tuple(data[name] for name in codec.fields)


class _Misfit(Exception):
    """A stored state that the state class does not take as it is (the message says why)."""


def _fit(data: Any, codec: StateCodec) -> tuple[Any, ...]:
    cls = codec.cls.__name__
    if not isinstance(data, Mapping):
        raise _Misfit(f"is not a field map but {type(data).__name__}")
    gone = sorted(set(data) - set(codec.fields))
    if gone:
        raise _Misfit(
            f"has field(s) {', '.join(gone)}, which state class {cls} no longer defines: put "
            f"them back in {cls} (a default is enough) to load this world"
        )
    try:
        return codec.from_dict(data, CONVERTER)
    except Exception as exc:
        details = "; ".join(cattrs.transform_error(exc, path=cls))
        raise _Misfit(
            f"does not fit state class {cls}: {details}; give new fields a default, "
            "and keep stored fields' types"
        ) from None
