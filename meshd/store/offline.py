"""Reading a world database without a daemon (``meshd inspect world`` when none runs).

A blocking shell; it opens the database read-only and never migrates it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshd.store.codec import world_hash
from meshd.store.db import DB_NAME, Store
from meshd.store.schema import StoreError


def offline_world(data_dir: Path, with_hash: bool) -> dict[str, Any]:
    """The ``world`` view read straight from the database (no daemon needed)."""
    path = data_dir / DB_NAME
    if not path.exists():
        raise StoreError(f"no world database at {path}")
    store = Store(path, readonly=True)
    try:
        meta = store.meta()
        if not meta:
            raise StoreError(f"{path} holds no world yet")
        digest = (
            world_hash(
                store.rows(),
                meta["next_id"],
                meta["events"],
                meta["quarantined"],
                meta.get("timers", []),
                meta.get("world", {}),
            )
            if with_hash
            else None
        )
        return {
            "tick": meta["tick"],
            "entities": store.count(),
            "hash": digest,
            "world_state": meta.get("world", {}),
            "offline": True,
        }
    finally:
        store.close()
