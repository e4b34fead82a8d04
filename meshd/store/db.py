"""SQLite persistence (a blocking shell, called from threads): whole ticks only.

The tables and their migrations are :mod:`meshd.store.schema`; how rows are
encoded, :mod:`meshd.store.codec`. Each :class:`Delta` is one ``BEGIN
IMMEDIATE ... COMMIT`` transaction that also moves ``meta.tick``, so a reader
always sees a whole tick; a new account is its own small transaction. The
connection is created with ``check_same_thread=False`` because the core
drives it from worker threads; callers must serialise calls (the core holds
one lock for every call).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import cbor2

from meshd.store.codec import (
    Delta,
    Row,
    StateCodec,
    WorldSnapshot,
    decode_state,
    restore_state,
    to_row,
)
from meshd.store.schema import FORMAT, NO_ENTITY, StoreError, columns, prepare, version

DB_NAME = "world.db"


class Store:
    """One world database."""

    def __init__(self, path: Path, *, synchronous: str = "normal", readonly: bool = False):
        self.path = path
        try:
            if readonly:
                self.db = sqlite3.connect(
                    f"file:{path}?mode=ro",
                    uri=True,
                    isolation_level=None,
                    check_same_thread=False,
                )
            else:
                # A short busy timeout: the writer retries with backoff rather than block.
                self.db = sqlite3.connect(
                    path, isolation_level=None, check_same_thread=False, timeout=1.0
                )
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute(f"PRAGMA synchronous={synchronous.upper()}")
                prepare(self.db)
            self.version = version(self.db)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open world database {path}: {exc}") from exc

    def close(self) -> None:
        self.db.close()

    def meta(self) -> dict[str, Any]:
        try:
            rows = self.db.execute("SELECT key, value FROM meta").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read {self.path}: {exc}") from exc
        meta = {key: cbor2.loads(value) for key, value in rows}
        if meta and meta.get("format") != FORMAT:
            raise StoreError(
                f"{self.path} has format {meta.get('format')!r}; this meshd reads format {FORMAT}"
            )
        if meta and self.version == 0:  # opened read-only, not migrated: its defaults
            meta.setdefault("quarantined", [])
        return meta

    def rows(self) -> Iterator[Row]:
        """Every stored entity row, in id order."""
        yield from self.db.execute("SELECT id, kind, x, y, z, state FROM entity ORDER BY id")

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM entity").fetchone()[0])

    def row(self, entity_id: int) -> Row | None:
        return self.db.execute(
            "SELECT id, kind, x, y, z, state FROM entity WHERE id = ?", (entity_id,)
        ).fetchone()

    def players(self) -> list[tuple[str, bytes, bytes, int, str, bool]]:
        """Every claimed player name: (name, salt, secret hash, entity id, hashing
        parameters, disabled)."""
        found = columns(self.db, "player")
        if not found:  # version 0 opened read-only: from before players existed
            return []
        kdf = "kdf" if "kdf" in found else "''"
        disabled = "disabled" if "disabled" in found else "0"
        return [
            (name, salt, digest, entity, kdf_text, bool(off))
            for name, salt, digest, entity, kdf_text, off in self.db.execute(
                f"SELECT name, salt, hash, entity, {kdf}, {disabled} FROM player ORDER BY name"
            )
        ]

    def load_world(self, codecs: Mapping[str, StateCodec]) -> WorldSnapshot | None:
        """The stored world as of its last tick (None if nothing was written yet).

        Raises :class:`StoreError` naming the entity when a stored kind or
        state does not fit the plugins' (``codecs``, by kind).
        """
        meta = self.meta()
        if not meta:
            return None
        records, converted = [], []
        classes = meta.get("classes", {})
        stored = classes.get("kinds", {})
        for entity_id, kind, x, y, z, state in self.rows():
            codec = codecs.get(kind)
            if codec is None:
                raise StoreError(
                    f"stored entity {entity_id} has kind {kind!r}, which no plugin defines"
                )
            data = cbor2.loads(state)
            values = restore_state(data, codec, stored.get(kind))
            if values is None:
                values, _migrated = decode_state(entity_id, kind, data, codec)
                converted.append(entity_id)
            records.append([entity_id, kind, x, y, z, values])
        return WorldSnapshot(
            meta["tick"],
            meta["seed"],
            meta["next_id"],
            records,
            meta["events"],
            meta["quarantined"],
            meta.get("timers", []),  # none before timers existed
            meta.get("code", ""),
            meta.get("world", {}),
            converted,
            classes,
        )

    def put_account(self, name: str, salt: bytes, digest: bytes, kdf: str) -> None:
        """Claim ``name`` (or change its secret's hash), durably, in its own transaction.

        A new name gets no entity yet (:data:`NO_ENTITY`); its entity is
        linked with the tick that holds it (``Delta.players``).
        """
        with self._transaction() as db:
            db.execute(
                "INSERT INTO player (name, salt, hash, entity, kdf) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE "
                "SET salt = excluded.salt, hash = excluded.hash, kdf = excluded.kdf",
                (name, salt, digest, NO_ENTITY, kdf),
            )

    def rename_account(self, old: str, new: str) -> None:
        """Give account ``old`` the name ``new`` (its entity and secret stay)."""
        self._change_account("UPDATE player SET name = ? WHERE name = ?", (new, old), old)

    def disable_account(self, name: str, disabled: bool) -> None:
        self._change_account(
            "UPDATE player SET disabled = ? WHERE name = ?", (int(disabled), name), name
        )

    def delete_account(self, name: str) -> None:
        self._change_account("DELETE FROM player WHERE name = ?", (name,), name)

    def _change_account(self, sql: str, values: tuple[Any, ...], name: str) -> None:
        """One statement on one account in its own transaction; ``KeyError`` if there is none."""
        with self._transaction() as db:
            if db.execute(sql, values).rowcount != 1:
                raise KeyError(f"no account {name!r} in {self.path}")

    def write(self, delta: Delta, schema: Mapping[str, Sequence[str]]) -> None:
        """Write one whole tick in one transaction (all or nothing)."""
        rows = [to_row(record, schema) for record in delta.upserts]
        meta = {
            "format": FORMAT,
            "tick": delta.tick,
            "seed": delta.seed,
            "next_id": delta.next_id,
            "events": delta.events,
            "quarantined": delta.quarantined,
            "timers": delta.timers,
            "code": delta.code,
            "world": delta.world,
        }
        if delta.classes:
            meta["classes"] = delta.classes
        with self._transaction() as db:
            db.executemany("INSERT OR REPLACE INTO entity VALUES (?, ?, ?, ?, ?, ?)", rows)
            db.executemany("DELETE FROM entity WHERE id = ?", [(i,) for i in delta.deletes])
            db.executemany(
                "UPDATE player SET entity = ? WHERE name = ?",
                [(entity, name) for name, entity in delta.players],
            )
            db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [(key, cbor2.dumps(value)) for key, value in meta.items()],
            )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE ... COMMIT``, rolled back if anything fails."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            # SQLite has already rolled back after some errors (disk full, I/O).
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
