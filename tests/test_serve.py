"""End to end, with real core and worker processes, sockets and SQLite."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest
from conftest import (
    REPO,
    SPACE,
    TAVERN,
    inspect,
    meshd,
    meshd_json,
    run_world,
    start_daemon,
    wait_for_status,
    wait_gone,
    write_config,
)

from meshd.mesh.layout import Layout
from meshd.store.db import DB_NAME, Store


@pytest.mark.parametrize("world", [TAVERN, SPACE], ids=["tavern", "space"])
def test_same_world_with_1_and_4_workers(tmp_path: Path, world: dict) -> None:
    one = run_world(tmp_path / "one", world, "--workers", "1", "--ticks", "200")
    four = run_world(tmp_path / "four", world, "--workers", "4", "--ticks", "200")
    assert one["tick"] == four["tick"] == 200
    assert one["entities"] == four["entities"]
    assert one["hash"] == four["hash"]


def test_restart_continues_the_same_world(tmp_path: Path) -> None:
    straight = run_world(tmp_path / "straight", TAVERN, "--workers", "2", "--ticks", "300")
    config = write_config(tmp_path, TAVERN)
    meshd(
        "serve",
        "--config",
        str(config),
        "--rate",
        "0",
        "--seed",
        "7",
        "--workers",
        "2",
        "--ticks",
        "200",
    )
    assert meshd_json("inspect", "world", "--config", str(config))["tick"] == 200
    with sqlite3.connect(config.parent / "data" / "world.db") as db:
        # as a database written before partitions could be quarantined (version 0)
        db.execute("DELETE FROM meta WHERE key = 'quarantined'")
        db.execute("PRAGMA user_version = 0")
    meshd(
        "serve",
        "--config",
        str(config),
        "--rate",
        "0",
        "--seed",
        "7",
        "--workers",
        "3",
        "--ticks",
        "100",
    )
    resumed = meshd_json("inspect", "world", "--config", str(config), "--hash")
    assert resumed["tick"] == straight["tick"] == 300
    assert resumed["hash"] == straight["hash"]


def _stored(config_dir: Path, kind: str) -> dict[int, tuple[float, float, dict]]:
    with sqlite3.connect(config_dir / "data" / "world.db") as db:
        rows = db.execute("SELECT id, x, y, state FROM entity WHERE kind = ?", (kind,))
        return {i: (x, y, cbor2.loads(state)) for i, x, y, state in rows}


def test_rocket_crossing_three_workers_hits_once(tmp_path: Path) -> None:
    duel = {
        **SPACE,
        "mesh": {"grid": 4},
        "plugins": {"load": ["space"], "space": {"scenario": "duel", "fire_chance": 0.0}},
    }
    layout = Layout.grid(2000.0, 320.0, 4, 3)
    # The rocket starts on worker 0, flies through worker 1 and hits a ship on worker 2.
    assert [layout.owner_of(x, 1000.0) for x in (800.0, 1100.0, 1400.0, 1650.0)] == [0, 1, 1, 2]
    run_world(tmp_path, duel, "--workers", "3", "--ticks", "12")
    ships = _stored(tmp_path, "ship")
    assert ships[1][2]["hits"] == 0
    assert ships[2][2]["hits"] == 1
    assert ships[2][2]["hp"] == 9
    assert _stored(tmp_path, "rocket") == {}


def test_dropped_mugs_stay_put_across_restarts(tmp_path: Path) -> None:
    config = write_config(tmp_path, TAVERN)
    meshd("serve", "--config", str(config), "--rate", "0", "--workers", "2", "--ticks", "100")
    before = _stored(tmp_path, "mug")
    assert len(before) > 10
    meshd("serve", "--config", str(config), "--rate", "0", "--workers", "3", "--ticks", "60")
    after = _stored(tmp_path, "mug")
    assert len(after) > len(before)
    for mug_id, (x, y, state) in before.items():
        assert after[mug_id] == (x, y, state)


def _workers(config: Path) -> list[dict]:
    return meshd_json("inspect", "workers", "--config", str(config))


def test_sigterm_writes_final_tick_and_leaves_no_orphans(tavern_config: Path) -> None:
    daemon = start_daemon(tavern_config, "--workers", "2", "--rate", "50")
    try:
        status = wait_for_status(tavern_config, lambda s: s["tick"] >= 5 and s["spares"])
        pids = [w["pid"] for w in inspect(tavern_config, "workers")] + status["spares"]
        assert len(pids) == 3
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, daemon.stderr.read()
    finally:
        daemon.kill()
    assert wait_gone(pids) == []
    world = meshd_json("inspect", "world", "--config", str(tavern_config))
    assert world["offline"] and world["tick"] >= 5


def test_kill_9_of_the_core_leaves_no_orphans(tavern_config: Path) -> None:
    daemon = start_daemon(tavern_config, "--workers", "3", "--rate", "50")
    try:
        status = wait_for_status(tavern_config, lambda s: s["tick"] >= 3 and s["spares"])
        pids = [w["pid"] for w in inspect(tavern_config, "workers")] + status["spares"]
        assert len(pids) == 4
        daemon.kill()
        daemon.wait(timeout=10)
    finally:
        daemon.kill()
    assert wait_gone(pids) == []
    # The stale socket and lock of the killed core do not block a restart.
    meshd("serve", "--config", str(tavern_config), "--rate", "0", "--ticks", "5")


def test_inspect_without_daemon_or_database_fails_clearly(tmp_path: Path) -> None:
    result = meshd("inspect", "status", "--data", str(tmp_path), check=False)
    assert result.returncode == 1 and "no meshd daemon" in result.stderr
    result = meshd("inspect", "world", "--data", str(tmp_path), check=False)
    assert result.returncode == 1 and "no world database" in result.stderr


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"world": {"size": -5.0}})
    result = meshd("serve", "--config", str(config), check=False)
    assert result.returncode == 2
    assert "world.size" in result.stderr


def test_halo_too_small_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, {**SPACE, "world": {"size": 2000.0, "halo": 50.0}})
    result = meshd("serve", "--config", str(config), "--ticks", "1", check=False)
    assert result.returncode == 2
    assert "world.halo" in result.stderr and "rocket" in result.stderr


def test_a_busy_player_port_is_one_clear_line(tmp_path: Path) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        config = write_config(tmp_path, {**TAVERN, "gateway": {"listen": f"127.0.0.1:{port}"}})
        result = meshd("serve", "--config", str(config), "--ticks", "1", check=False)
    finally:
        taken.close()
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: cannot listen for players on 127.0.0.1:{port}: Address already in use; "
        'set gateway.listen (or serve --listen) to a free HOST:PORT, or "" for none'
    ]


def test_short_runs_print_no_traceback(tmp_path: Path) -> None:
    """A spare worker still starting when the core stops must go quietly."""
    for run in range(3):
        folder = tmp_path / str(run)
        folder.mkdir()
        config = write_config(folder, {**TAVERN, "gateway": {"listen": ""}})
        result = meshd("serve", "--config", str(config), "--rate", "0", "--ticks", "1")
        assert "Traceback" not in result.stderr, result.stderr


def test_a_misspelt_environment_variable_stops_serve(tmp_path: Path) -> None:
    config = write_config(tmp_path, TAVERN)
    env = {**os.environ, "MESHD_WORLD_SED": "9"}
    result = subprocess.run(
        [sys.executable, "-m", "meshd", "serve", "--config", str(config), "--ticks", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2
    assert "MESHD_WORLD_SED names no setting; did you mean MESHD_WORLD_SEED?" in result.stderr


REPEATING = textwrap.dedent(
    """
    import attrs
    from meshd import Kind, Plugin

    @attrs.frozen
    class Walker:
        steps: int = 0

    def helper(me):
        raise RuntimeError(f"boom at step {me.state.steps}")  # a new message every tick

    def walk(me, ctx):
        if me.id == 2:
            helper(me)
        me.x += 100.0 if me.id == 3 else 0.5  # 3 moves too fast: refused every tick

    def create_world(world):
        for i in range(3):
            world.spawn("walker", 10.0 + i, 10.0)

    plugin = Plugin(
        name="repeating",
        kinds={"walker": Kind(Walker, systems=(walk,), max_speed=20.0, radius=1.0)},
        create_world=create_world,
    )
    """
)


def test_a_recurring_plugin_error_is_logged_once_with_its_place(tmp_path: Path) -> None:
    (tmp_path / "repeating.py").write_text(REPEATING)
    config = write_config(
        tmp_path,
        {
            "world": {"size": 100.0},
            "supervise": {"quarantine_after": 1000},
            "plugins": {"load": ["repeating"], "dirs": [str(tmp_path)]},
        },
    )
    result = meshd("serve", "--config", str(config), "--rate", "0", "--ticks", "40")
    logged = [json.loads(line) for line in result.stderr.splitlines() if "plugin error" in line]
    assert [(entry["entity"], entry["kind"]) for entry in logged] == [(2, "walker"), (3, "walker")]
    line = next(i for i, text in enumerate(REPEATING.splitlines(), 1) if "raise Runtime" in text)
    assert logged[0]["where"] == f"walk ({tmp_path / 'repeating.py'}:{line})"
    assert logged[0]["error"] == "RuntimeError: boom at step 0"
    assert logged[1]["where"] is None and "max_speed" in logged[1]["error"]


def _piles_world(folder: Path) -> tuple[Path, Path]:
    """A world of walkers with ``steps`` and ``weight``, two ticks old: (plugin, config)."""
    plugin = folder / "piles.py"
    plugin.write_text(
        REPEATING.replace('"repeating"', '"piles"').replace(
            "steps: int = 0", "steps: int = 0\n    weight: float = 1.0"
        )
    )
    config = write_config(
        folder,
        {"world": {"size": 100.0}, "plugins": {"load": ["piles"], "dirs": [str(folder)]}},
    )
    meshd("serve", "--config", str(config), "--rate", "0", "--ticks", "2")
    return plugin, config


def test_a_removed_state_field_names_the_kind_the_field_and_the_way_out(tmp_path: Path) -> None:
    plugin, config = _piles_world(tmp_path)
    plugin.write_text(plugin.read_text().replace("\n    weight: float = 1.0", ""))
    result = meshd("serve", "--config", str(config), "--ticks", "1", check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: stored entity 1 (kind 'walker') has field(s) weight, which state class Walker "
        "no longer defines: put them back in Walker (a default is enough) to load this world; "
        "or declare Kind(migrate=...)"
    ]


def test_a_declared_migration_loads_an_old_world_and_stores_it_in_the_new_form(
    tmp_path: Path,
) -> None:
    plugin, config = _piles_world(tmp_path)
    # weight is dropped, steps renamed paces (a string now); a migration says how
    renamed = (
        plugin.read_text()
        .replace("steps: int = 0\n    weight: float = 1.0", "paces: str = ''\n    fresh: int = 7")
        .replace("me.state.steps", "me.state.paces")
        .replace(
            "max_speed=20.0, radius=1.0)",
            "max_speed=20.0, radius=1.0, migrate=lambda old: {'paces': str(old['steps'] + 10)})",
        )
    )
    plugin.write_text(renamed.replace("str(old['steps'] + 10)", "old['nope']"))
    failed = meshd("serve", "--config", str(config), "--ticks", "1", check=False)
    assert failed.returncode == 1
    assert failed.stderr.splitlines() == [
        "error: stored entity 1 (kind 'walker'): its kind's migrate failed: KeyError('nope')"
    ]
    plugin.write_text(renamed)
    result = meshd("serve", "--config", str(config), "--rate", "0", "--ticks", "1")
    assert "converted stored states" in result.stderr
    store = Store(tmp_path / "data" / DB_NAME, readonly=True)
    try:
        states = {row[0]: cbor2.loads(row[5]) for row in store.rows()}
    finally:
        store.close()
    assert states[1] == {"paces": "10", "fresh": 7}
    # walker 2 fails every tick, so never changes: only the load stored it in the new form
    assert states[2] == {"paces": "10", "fresh": 7}


def test_each_benchmark_is_a_subcommand_with_only_its_own_options() -> None:
    options = {
        name: set(re.findall(r"--[a-z-]+", meshd("bench", name, "--help").stdout))
        for name in ("sim", "failover", "rush", "players")
    }
    assert options["sim"] == {"--npcs", "--ticks", "--repeat", "--json", "--help"}
    assert options["rush"] == {
        "--npcs",
        "--day-ticks",
        "--rate",
        "--max-workers",
        "--plot",
        "--json",
        "--help",
    }
    assert "--bots" in options["players"] and "--day-ticks" not in options["players"]
    refused = meshd("bench", "sim", "--day-ticks", "5", check=False)
    assert refused.returncode == 2 and "No such option" in refused.stderr


@pytest.mark.parametrize(
    ("mistake", "what"),
    [
        ("clock", "time.time()"),
        ("in_place", "the previous walker.trail changed in place"),
    ],
)
def test_strict_mode_logs_plugin_code_that_breaks_determinism_once(
    tmp_path: Path, mistake: str, what: str
) -> None:
    config = write_config(
        tmp_path,
        {
            "world": {"size": 60.0, "halo": 6.0},
            "plugins": {
                "load": ["sloppy"],
                "dirs": [str(REPO / "tests" / "fixtures" / "plugins")],
                "sloppy": {"mistake": mistake},
            },
        },
    )
    strict = meshd("serve", "--config", str(config), "--strict", "--rate", "0", "--ticks", "20")
    logged = [json.loads(line) for line in strict.stderr.splitlines() if "determinism" in line]
    assert len(logged) == 1, logged  # noticed on every tick, logged once
    assert logged[0]["what"].startswith(what)
    assert logged[0]["where"].startswith("sloppy.py:")
    relaxed = meshd("serve", "--config", str(config), "--rate", "0", "--ticks", "5")
    assert "determinism" not in relaxed.stderr


def test_a_fixed_plugin_heals_its_quarantined_entities_at_restart(tmp_path: Path) -> None:
    """Issue: entities quarantined by a bug stayed frozen after the fix and a restart."""
    plugin = tmp_path / "buggy.py"
    buggy = REPEATING.replace('"repeating"', '"buggy"')
    plugin.write_text(buggy)
    config = write_config(
        tmp_path,
        {
            "world": {"size": 100.0},
            "supervise": {"quarantine_after": 3},
            "plugins": {"load": ["buggy"], "dirs": [str(tmp_path)]},
        },
    )

    def quarantined() -> list[int]:
        store = Store(tmp_path / "data" / DB_NAME, readonly=True)
        try:
            return store.meta()["quarantined"]
        finally:
            store.close()

    meshd("serve", "--config", str(config), "--rate", "0", "--ticks", "10")
    assert quarantined() == [2, 3]
    same = meshd("serve", "--config", str(config), "--rate", "0", "--ticks", "2")
    assert "entities stay quarantined" in same.stderr and quarantined() == [2, 3]
    plugin.write_text(buggy.replace("        helper(me)\n", "        pass  # fixed\n"))
    fixed = meshd("serve", "--config", str(config), "--rate", "0", "--ticks", "10")
    assert "they run again" in fixed.stderr
    assert quarantined() == [3]  # 2 is healed; 3 still moves too fast, so is caught again


def test_world_state_is_stored_shown_and_a_failing_world_event_logged_once(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {
            "world": {"size": 60.0, "halo": 6.0},
            "plugins": {
                "load": ["teams"],
                "dirs": [str(REPO / "tests" / "fixtures" / "plugins")],
                "teams": {"mistake": "green"},
            },
        },
    )
    served = meshd("serve", "--config", str(config), "--rate", "0", "--ticks", "20")
    logged = [json.loads(line) for line in served.stderr.splitlines() if "world event" in line]
    assert len(logged) == 1 and logged[0]["world_event"] == "teams.score"
    assert logged[0]["error"] == "ValueError: no team 'green'"
    first = meshd_json("inspect", "world", "--config", str(config), "--hash")
    scores = first["world_state"]["teams"]
    assert scores["red"] > 0 and scores["blue"] > 0 and first["tick"] == 20
    assert scores["banner"] == "0001"  # bytes, printed as hex
    meshd("serve", "--config", str(config), "--rate", "0", "--ticks", "5")
    later = meshd_json("inspect", "world", "--config", str(config))["world_state"]["teams"]
    assert later["red"] + later["blue"] > scores["red"] + scores["blue"]  # went on from there


# -- one daemon for the tests that only read it --------------------------------


@pytest.fixture(scope="module")
def serving(tmp_path_factory) -> Iterator[Path]:
    """A tavern on 3 workers at 50 Hz, shared by the tests below (the last of this file, so it
    stops as soon as they are done): each only reads it, and one second core is refused."""
    config = write_config(tmp_path_factory.mktemp("serving"), TAVERN)
    daemon = start_daemon(config, "--workers", "3", "--rate", "50")
    try:
        wait_for_status(config, lambda s: s["tick"] >= 3, daemon=daemon)
        yield config
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        finally:
            daemon.kill()


def test_inspect_views_have_the_contract_keys(serving: Path) -> None:
    status = meshd_json("inspect", "status", "--config", str(serving))
    assert {"tick", "entities", "workers", "failovers", "rate_hz", "tick_ms"} <= set(status)
    assert {"p50", "p99"} <= set(status["tick_ms"])
    assert status["workers"] == 3 and status["entities"] >= 300
    workers = _workers(serving)
    for worker in workers:
        assert {"id", "pid", "epoch", "partitions", "entities", "cost_ms"} <= set(worker)
    assert sorted(w["id"] for w in workers) == [0, 1, 2]
    assert all(w["entities"] > 0 and w["epoch"] == 1 for w in workers)
    partitions = meshd_json("inspect", "partitions", "--config", str(serving))
    assert len(partitions) == 16
    for leaf in partitions:
        assert {"id", "bounds", "worker", "entities", "cost_ms"} <= set(leaf)
    entity = meshd_json("inspect", "entity", "1", "--config", str(serving))
    assert {"id", "kind", "x", "y", "owner", "state"} <= set(entity)
    assert entity["kind"] == "patron" and "anger" in entity["state"]
    world = meshd_json("inspect", "world", "--hash", "--config", str(serving))
    assert {"tick", "entities", "hash"} <= set(world) and len(world["hash"]) == 64
    missing = meshd("inspect", "entity", "999999", "--config", str(serving), "--json", check=False)
    assert missing.returncode == 1 and "no entity 999999" in missing.stderr
    human = meshd("inspect", "status", "--config", str(serving))
    assert "tick" in human.stdout


def test_second_core_on_the_same_data_refuses(serving: Path) -> None:
    second = meshd("serve", "--config", str(serving), "--ticks", "1", check=False)
    assert second.returncode == 1
    assert "another meshd is already serving" in second.stderr
    after = inspect(serving, "status")["tick"]
    wait_for_status(serving, lambda s: s["tick"] > after)  # the first one serves on


def test_the_cost_report_counts_entities_crossing_workers(serving: Path) -> None:
    wait_for_status(serving, lambda s: s["tick"] >= 100)
    stats = meshd_json("inspect", "stats", "--config", str(serving))
    assert stats["mode"] == "static" and stats["plans"] == 0 and stats["plan_handoffs"] == 0
    assert stats["handoffs"] > 10 and stats["handoffs_per_s"] > 0
