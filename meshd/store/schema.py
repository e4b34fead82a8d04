"""The on-disk format of ``world.db``: tables, schema version and migrations (pure SQL).

Tables:

- ``entity(id, kind, x, y, z, state)``: one row per entity; ``state`` is the
  canonical CBOR of its state as a field-name map (:mod:`meshd.store.codec`),
  readable without the plugins and robust to added fields;
- ``meta(key, value)``: CBOR values under ``format`` (the row encoding, 1),
  ``tick``, ``seed``, ``next_id``, ``events`` (pending events for ``tick + 1``)
  and ``quarantined`` (frozen entity ids);
- ``player(name, salt, hash, entity, kdf, disabled)``: accounts; ``kdf``
  names the hashing parameters (``"scrypt:N:r:p"``; ``''``: the configured
  ``gateway.hash_cost``), ``entity`` is :data:`NO_ENTITY` until the player's
  entity is written with a tick, ``disabled`` 1 for an account an operator
  disabled.

``PRAGMA user_version`` holds the schema version. A database written before
versions were kept reads as version 0. Each migration is a function from one
version to the next, run in one transaction when a writer opens the database.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import cbor2

FORMAT = 1
"""How entity rows and meta values are encoded (``meta.format``)."""
SCHEMA_VERSION = 2
NO_ENTITY = 0
"""``player.entity`` of a name claimed before its entity reached the database."""

TABLES = """
CREATE TABLE entity (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    x REAL NOT NULL,
    y REAL NOT NULL,
    z REAL NOT NULL,
    state BLOB NOT NULL
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE player (
    name TEXT PRIMARY KEY,
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,
    entity INTEGER NOT NULL,
    kdf TEXT NOT NULL DEFAULT '',
    disabled INTEGER NOT NULL DEFAULT 0
);
"""


class StoreError(Exception):
    """The database is unreadable, from an incompatible version, or does not fit the plugins."""


def columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _to_1(db: sqlite3.Connection) -> None:
    """Version 0 -> 1: accounts keep their hashing parameters; every world has ``quarantined``.

    Version 0 is every database written before versions were kept: some
    have no ``player`` table (before players), no ``kdf`` column (before
    per-account parameters) or no ``quarantined`` meta key.
    """
    db.execute(
        "CREATE TABLE IF NOT EXISTS player (name TEXT PRIMARY KEY, salt BLOB NOT NULL, "
        "hash BLOB NOT NULL, entity INTEGER NOT NULL)"
    )
    if "kdf" not in columns(db, "player"):
        db.execute("ALTER TABLE player ADD COLUMN kdf TEXT NOT NULL DEFAULT ''")
    if db.execute("SELECT 1 FROM meta WHERE key = 'tick'").fetchone():
        db.execute("INSERT OR IGNORE INTO meta VALUES ('quarantined', ?)", (cbor2.dumps([]),))


def _to_2(db: sqlite3.Connection) -> None:
    """Version 1 -> 2: an operator may disable an account (``meshd accounts disable``)."""
    if "disabled" not in columns(db, "player"):
        db.execute("ALTER TABLE player ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0")


MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {0: _to_1, 1: _to_2}
"""From version N to N + 1."""


def version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def prepare(db: sqlite3.Connection) -> None:
    """Create the tables of a new database, or bring an older one to ``SCHEMA_VERSION``.

    Raises :class:`StoreError` for a database written by a newer meshd.
    """
    current = version(db)
    if current > SCHEMA_VERSION:
        raise StoreError(
            f"the database has schema version {current}; this meshd knows up to "
            f"{SCHEMA_VERSION}: use a newer meshd"
        )
    if current == SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        if not columns(db, "entity"):  # a new database: the tables as they are now
            for statement in TABLES.split(";"):
                if statement.strip():
                    db.execute(statement)
        else:
            for step in range(current, SCHEMA_VERSION):
                MIGRATIONS[step](db)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
