"""The world on disk: schema versions, migrations, and databases written by older meshd."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
import trio
from conftest import (
    PLUGINS,
    meshd,
    meshd_json,
    start_daemon,
    stored_world,
    terminate,
    write_config,
)
from test_players import gateway_of

from meshd import client
from meshd.common.wire import CONVERTER
from meshd.mesh.plugins import load_plugins
from meshd.ops import admin
from meshd.ops.admin import AdminRequest
from meshd.store.db import Store
from meshd.store.schema import SCHEMA_VERSION, StoreError
from meshd.testing import assert_deterministic

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OLD_WORLDS = {
    # commit of main that wrote it: what its tables lacked (world-895f0de.db, schema
    # version 1 with names that are not canonical: test_names_stored_before_...)
    "world-de19a28.db": "no hashing parameters per account",
    "world-9a026b9.db": "no schema version",
}
FIXTURE_WORLD = {  # how the fixtures were made: 25 patrons, two players, 30 views each
    "world": {"size": 60.0, "seed": 7},
    "gateway": {"hash_cost": 10},
    "plugins": {"load": ["tavern"], "tavern": {"npcs": 25, "drop_chance": 0.05}},
}


def copy_of(name: str, folder: Path) -> Path:
    data = folder / "data"
    data.mkdir()
    shutil.copy(FIXTURES / name, data / "world.db")
    return data / "world.db"


@pytest.mark.parametrize("name", sorted(OLD_WORLDS))
def test_an_older_database_is_migrated_and_loads(tmp_path: Path, name: str) -> None:
    path = copy_of(name, tmp_path)
    with sqlite3.connect(path) as db:
        stored = db.execute("SELECT count(*) FROM entity").fetchone()[0]
        assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    store = Store(path)
    try:
        assert store.version == SCHEMA_VERSION
        accounts = {name: (entity, kdf) for name, _s, _h, entity, kdf, _off in store.players()}
        plugins = load_plugins(["tavern"], [PLUGINS], {"tavern": {"npcs": 25}}, CONVERTER)
        world = store.load_world(plugins.codecs)
    finally:
        store.close()
    assert world is not None and len(world.records) == stored and world.quarantined == []
    assert sorted(accounts) == ["ada", "bea"]
    assert {entity for entity, _kdf in accounts.values()} <= {r[0] for r in world.records}
    expected_kdf = "" if name == "world-de19a28.db" else "scrypt:1024:8:1"
    assert {kdf for _entity, kdf in accounts.values()} == {expected_kdf}


@pytest.mark.parametrize("name", sorted(OLD_WORLDS))
def test_meshd_continues_an_older_world_and_its_players_log_in(tmp_path: Path, name: str) -> None:
    copy_of(name, tmp_path)
    config = write_config(tmp_path, FIXTURE_WORLD)
    before = meshd_json("inspect", "world", "--config", str(config), "--hash")  # read-only
    with sqlite3.connect(tmp_path / "data" / "world.db") as db:
        ada = db.execute("SELECT entity FROM player WHERE name = 'ada'").fetchone()[0]
    daemon = start_daemon(config, "--rate", "30")

    async def log_in() -> int:
        async with await client.connect(*gateway_of(config), "ada", "ada-secret") as me:
            return me.entity

    try:
        assert trio.run(log_in) == ada  # her entity, with her secret
        with pytest.raises(client.ServerError, match="auth"):
            trio.run(client.connect, *gateway_of(config), "bea", "ada-secret")
    finally:
        assert terminate(config, daemon) == 0
    after = stored_world(config)
    assert after["tick"] > before["tick"]


def test_a_database_from_a_newer_meshd_is_refused(tmp_path: Path) -> None:
    path = copy_of("world-9a026b9.db", tmp_path)
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="use a newer meshd"):
        Store(path)
    config = write_config(tmp_path, FIXTURE_WORLD)
    refused = meshd("serve", "--config", str(config), "--ticks", "1", check=False)
    assert refused.returncode == 1 and "use a newer meshd" in refused.stderr


LOOSE = """
import attrs
from meshd import Kind, Plugin


@attrs.frozen
class Loose:
    total: float = 0.0  # the system writes ints here
    count: int = 0  # and a bool here
    either: int | str = 0


def tally(me, ctx):
    total = me.state.total + 1 if ctx.tick % 3 else int(me.state.total)
    either = "odd" if ctx.tick % 2 else ctx.tick
    me.state = attrs.evolve(me.state, total=total, count=ctx.tick % 5 == 0, either=either)
    me.x = (me.x + me.state.total * ctx.dt) % ctx.world_size


def create_world(world):
    for _ in range(12):
        world.spawn("loose", world.rng.uniform(0, world.size), world.rng.uniform(0, world.size))


plugin = Plugin(
    name="loose",
    kinds={"loose": Kind(Loose, systems=(tally,), max_speed=400.0, radius=0.0)},
    create_world=create_world,
)
"""


def test_a_restart_restores_states_exactly_as_the_plugin_wrote_them(tmp_path: Path) -> None:
    """An int in a float field, a bool in an int field, a union: a world stored under the
    same classes comes back as it ran (before, one refused to load, another changed)."""
    (tmp_path / "loose.py").write_text(LOOSE)
    assert_deterministic(["loose"], dirs=[tmp_path], size=50.0, halo=25.0, ticks=24)


CANONICAL = {  # world-895f0de.db, made like the others, with these names and secrets
    "ada": ("ada", "ada-secret", 42),
    "bea": ("bea", "bea-secret", 50),
    "\uff43\uff41\uff52\uff4f\uff4c": ("carol", "carol-secret", 53),  # fullwidth
    " dan ": ("dan", "dan-secret", 55),
    "\uff41\uff44\uff41": ("ada", "fullwidth-ada-secret", 56),  # canonical: ada's name
    "\u0435ve": ("eve", "eve-secret", 57),  # a Cyrillic e: the rule refuses it
}


def test_names_stored_before_names_were_canonical(tmp_path: Path) -> None:
    """Issue #14: names are canonical now. A stored name takes its canonical form where it
    can, and keeps its entity and secret; one that cannot is listed, and an operator
    renames it."""
    path = copy_of("world-895f0de.db", tmp_path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        assert {row[0] for row in db.execute("SELECT name FROM player")} == set(CANONICAL)
    config = write_config(tmp_path, FIXTURE_WORLD)
    daemon = start_daemon(config, "--rate", "30")
    try:
        address = gateway_of(config)
        sock = tmp_path / "data" / "meshd.sock"
        notes = {row["name"]: row["note"] for row in admin.request(sock, AdminRequest("accounts"))}
        assert notes == {
            "ada": "",
            "bea": "",
            "carol": "",
            "dan": "",
            "\uff41\uff44\uff41": "its canonical form 'ada' is another account's name",
            "\u0435ve": "the name rule refuses it: '\u0435ve' mixes scripts (Cyrillic '\u0435', "
            "Latin 'v'): a name's letters are all of one script, so that it cannot pass for "
            "another",
        }
        renamed = admin.request(
            sock, AdminRequest("rename_account", name="\u0435ve", new_name="eve")
        )
        assert renamed == {"name": "eve", "was": "\u0435ve", "entity": 57, "kicked": False}

        async def log_in(name: str, secret: str) -> int:
            async with await client.connect(*address, name, secret) as me:
                return me.entity

        for stored, (name, secret, entity) in CANONICAL.items():
            if stored == "\uff41\uff44\uff41":  # unreachable until renamed: ada logs in
                with pytest.raises(client.ServerError, match="auth"):
                    trio.run(log_in, stored, secret)
                continue
            if stored == "\u0435ve":  # renamed: under its new name only
                with pytest.raises(client.ServerError, match="bad_name"):
                    trio.run(log_in, stored, secret)
            else:
                assert trio.run(log_in, stored, secret) == entity  # as typed then...
            assert trio.run(log_in, name, secret) == entity  # ...or canonical
    finally:
        daemon.terminate()
        assert daemon.wait(timeout=30) == 0
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        stored = dict(db.execute("SELECT name, disabled FROM player"))
    assert stored == dict.fromkeys(["ada", "bea", "carol", "dan", "\uff41\uff44\uff41", "eve"], 0)
