"""Failover: workers crash at any tick and the world comes out bit-identical."""

from __future__ import annotations

import os
import random
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from conftest import (
    TAVERN,
    inspect,
    meshd,
    meshd_json,
    run_world,
    start_daemon,
    stored_world,
    terminate,
    wait_for_status,
    wait_gone,
    write_config,
)
from inprocess import InProcessMesh, new_world, plugins_for
from test_sim import FAULTY, SPACE_WORLD, TAVERN_WORLD, assert_one_owner_each

from meshd.common.wire import CONVERTER
from meshd.mesh.layout import Layout
from meshd.mesh.messages import WorldParams
from meshd.mesh.plugins import load_plugins


def fault_schedule(seed: int, ticks: int, workers: int) -> dict[int, frozenset[int]]:
    """Reproducible crashes: tick -> workers that die during it."""
    rng = random.Random(seed)
    schedule = {}
    for tick in range(1, ticks + 1):
        if rng.random() < 0.25:
            schedule[tick] = frozenset(rng.sample(range(workers), rng.randint(1, 2)))
    return schedule


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize(
    ("name", "settings", "world"),
    [
        ("tavern", {"npcs": 250, "throw_chance": 0.05, "drop_chance": 0.01}, TAVERN_WORLD),
        ("space", {"ships": 60, "fire_chance": 0.05}, SPACE_WORLD),
    ],
)
def test_crashing_workers_change_nothing(name, settings, world, seed) -> None:
    plugins = plugins_for(name, **settings)
    ticks, persist_every, workers = 45, 7, 4
    layout = Layout.grid(world.size, world.halo, 4, workers)
    clean = InProcessMesh(plugins, world, layout, new_world(plugins, world))
    clean.run(ticks, persist_every)

    faulty = InProcessMesh(plugins, world, layout, new_world(plugins, world))
    schedule = fault_schedule(seed, ticks, workers)
    assert schedule == fault_schedule(seed, ticks, workers)  # the same seed, the same faults
    population = len(faulty.replication.owner)
    for tick in range(1, ticks + 1):
        checkpoint = tick == ticks or tick % persist_every == 0
        report = faulty.tick(checkpoint, kill=schedule.get(tick, frozenset()))
        assert faulty.replication.tick == tick  # contiguous, none skipped
        assert_one_owner_each(faulty)
        population += report.spawned - report.despawned
        assert len(faulty.replication.owner) == population  # nothing lost or duplicated
    assert sum(len(k) for k in schedule.values()) >= 5
    assert faulty.replication.hash() == clean.replication.hash()


PILLARS = textwrap.dedent(
    """
    import math
    import attrs
    from meshd import Kind, Plugin

    @attrs.frozen
    class Walker:
        heading: float = 0.0
        seen: int = 0

    @attrs.frozen
    class Pillar:
        pass

    def walk(me, ctx):
        pillars = ctx.nearby(3.0, "pillar")
        heading = me.state.heading + ctx.rng.uniform(-0.5, 0.5)
        me.x += math.cos(heading) * 0.9
        me.y += math.sin(heading) * 0.9
        me.state = Walker(heading, me.state.seen + len(pillars))

    def create_world(world):
        for i in range(200):
            world.spawn("pillar", world.rng.uniform(0, 100), world.rng.uniform(0, 100))
        for i in range(100):
            world.spawn("walker", world.rng.uniform(0, 100), world.rng.uniform(0, 100))

    plugin = Plugin(
        name="pillars",
        kinds={
            "walker": Kind(Walker, systems=(walk,), max_speed=20.0, radius=3.0),
            "pillar": Kind(Pillar),
        },
        create_world=create_world,
    )
    """
)


def test_replacements_see_ghosts_that_never_change(tmp_path: Path) -> None:
    """Static entities are sent as ghosts once; a replacement must get them from the checkpoint."""
    (tmp_path / "pillars.py").write_text(PILLARS)
    plugins = load_plugins(["pillars"], [tmp_path], {}, CONVERTER)
    world = WorldParams(size=100.0, seed=5, dt=0.05, halo=4.0)
    layout = Layout.grid(100.0, 4.0, 8, 4)
    clean = InProcessMesh(plugins, world, layout, new_world(plugins, world))
    clean.run(30, 5)
    faulty = InProcessMesh(plugins, world, layout, new_world(plugins, world))
    for tick in range(1, 31):
        faulty.tick(
            tick == 30 or tick % 5 == 0,
            kill=frozenset({tick % 4}) if tick % 3 == 0 else frozenset(),
        )
    assert faulty.replication.hash() == clean.replication.hash()


# -- real processes ---------------------------------------------------------


def _worker_pids(config: Path) -> dict[int, int]:
    return {w["id"]: w["pid"] for w in inspect(config, "workers")}


def test_a_killed_and_a_hung_worker_process_change_nothing(tmp_path: Path) -> None:
    """Worker 1 is killed, then worker 2 hangs (SIGSTOP): each slot gets a new process."""
    folder = tmp_path / "faulty"
    folder.mkdir()
    config = write_config(folder, TAVERN)
    # No --ticks: the daemon runs until the checks are done, however slow the machine.
    daemon = start_daemon(config, "--rate", "50", "--seed", "7", "--workers", "3")
    try:
        status = wait_for_status(config, lambda s: s["tick"] >= 30, daemon=daemon)
        stats = inspect(config, "stats")
        assert stats["mode"] == "static" and stats["plans"] == 0  # --workers: a fixed mesh
        assert stats["peak_workers"] == 3 and stats["leaves"] == 16
        for failovers, (victim, how) in enumerate([(1, signal.SIGKILL), (2, signal.SIGSTOP)], 1):
            before = _worker_pids(config)
            os.kill(before[victim], how)
            since = status["tick"]
            status = wait_for_status(
                config,
                lambda s, n=failovers, t=since: s["failovers"] >= n and s["tick"] >= t + 50,
                daemon=daemon,
            )
            replaced = _worker_pids(config)
            assert replaced[victim] != before[victim]
            assert {w: pid for w, pid in replaced.items() if w != victim} == {
                w: pid for w, pid in before.items() if w != victim
            }
            assert inspect(config, "workers")[victim]["epoch"] == 2
            assert wait_gone([before[victim]]) == []  # a hung worker is killed, not left behind
            assert status["workers"] == 3 and status["failovers"] >= failovers
        assert terminate(config, daemon, timeout=60) == 0, daemon.stderr.read()
    finally:
        daemon.kill()
    world = stored_world(config, with_hash=True)
    straight = run_world(
        tmp_path / "straight", TAVERN, "--workers", "3", "--ticks", str(world["tick"])
    )
    assert world == straight


def test_kill_9_of_the_core_leaves_a_whole_tick_to_continue_from(tmp_path: Path) -> None:
    ticks = 300
    heavy = {**TAVERN, "tick": {"persist_every": 1}}
    expected = run_world(tmp_path / "straight", heavy, "--ticks", str(ticks))["hash"]

    folder = tmp_path / "crashing"
    folder.mkdir()
    config = write_config(folder, heavy)
    rng = random.Random(11)
    stored_ticks = [0]
    for _ in range(3):
        remaining = str(ticks - stored_ticks[-1])
        daemon = start_daemon(config, "--rate", "30", "--seed", "7", "--ticks", remaining)
        try:
            wait_for_status(config, lambda s: s["tick"] > stored_ticks[-1], daemon=daemon)
            time.sleep(rng.uniform(0.05, 0.6))
        finally:
            daemon.kill()  # SIGKILL, mid-tick or mid-transaction
            daemon.wait(timeout=10)
        with sqlite3.connect(folder / "data" / "world.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored_ticks.append(stored_world(config)["tick"])
    assert stored_ticks == sorted(stored_ticks) and stored_ticks[-1] < ticks
    meshd("serve", "--config", str(config), "--rate", "0", "--ticks", str(ticks - stored_ticks[-1]))
    world = stored_world(config, with_hash=True)
    assert world["tick"] == ticks
    assert world["hash"] == expected


def test_an_entity_that_keeps_failing_is_quarantined_everywhere_alike(tmp_path: Path) -> None:
    (tmp_path / "faulty.py").write_text(FAULTY)
    plugins = load_plugins(["faulty"], [tmp_path], {}, CONVERTER)
    world = WorldParams(size=100.0, seed=1, dt=0.05, halo=5.0)
    hashes = set()
    for grid, workers, kill_at in [(1, 1, None), (2, 2, 6), (4, 4, 2)]:
        layout = Layout.grid(100.0, 5.0, grid, workers)
        mesh = InProcessMesh(plugins, world, layout, new_world(plugins, world), quarantine_after=3)
        quarantined_at = {}
        for tick in range(1, 13):
            crashed = frozenset(range(workers)) if tick == kill_at else frozenset()
            report = mesh.tick(tick % 4 == 0 or tick == 12, kill=crashed)
            quarantined_at.update({entity: tick for entity in report.quarantined})
            if tick > 3:
                assert report.errors == []  # frozen: no longer run
        assert quarantined_at == {2: 3, 3: 3}
        assert mesh.replication.quarantined == {2, 3}
        assert mesh.replication.records[1][2] == pytest.approx(16.0)  # the healthy one walked on
        hashes.add(mesh.replication.hash())
    assert len(hashes) == 1


def test_a_partition_taken_down_freezes_while_the_rest_ticks_on() -> None:
    plugins = plugins_for("tavern", npcs=300, throw_chance=0.05, drop_chance=0.01)
    world = TAVERN_WORLD
    layout = Layout.grid(world.size, world.halo, 2, 2)
    mesh = InProcessMesh(plugins, world, layout, new_world(plugins, world))
    mesh.run(12, persist_every=5)
    repl = mesh.replication
    assert repl.take_down(0) == ["1/0/0", "1/0/1"]
    frozen = {i: repl.records[i] for i, owner in repl.owner.items() if owner == 0}
    live = {i: repl.records[i] for i, owner in repl.owner.items() if owner == 1}
    population = len(repl.owner)
    for tick in range(13, 53):
        report = mesh.tick(checkpoint=tick % 5 == 0 or tick == 52)
        population += report.spawned - report.despawned
        assert repl.tick == tick and len(repl.owner) == population
        assert set(repl.owner) == set(repl.records)
        arriving = {record[0] for record, _targets in repl.outboxes[1].acquire}
        held = set(mesh.sims[1].entities) | arriving
        assert held == {i for i, w in repl.owner.items() if w == 1}
        for entity_id, owner in repl.owner.items():  # every entity where its position says
            record = repl.records[entity_id]
            assert owner == repl.layout.owner_of(record[2], record[3])
    assert all(repl.records[i] is record for i, record in frozen.items())
    moved = [i for i, record in live.items() if i in repl.records and repl.records[i] != record]
    assert len(moved) > len(live) // 2
    arrived = {i for i, w in repl.owner.items() if w == 0} - set(frozen)
    assert arrived, "someone walked into the frozen half and stayed there"


BOMB = textwrap.dedent(
    """
    import os
    import attrs
    from meshd import Kind, Plugin

    @attrs.frozen
    class Walker:
        steps: int = 0

    @attrs.frozen
    class Bomb:
        pass

    def walk(me, ctx):
        me.y = (me.y + 0.5) % 100.0
        me.state = Walker(me.state.steps + 1)

    def tick_tock(me, ctx):
        if ctx.tick >= 20:
            os._exit(3)  # takes the whole worker down, every time it gets here

    def create_world(world):
        world.spawn("bomb", 10.0, 50.0)
        for i in range(20):
            world.spawn("walker", 5.0 + 5.0 * i, 1.0)

    plugin = Plugin(
        name="bomb",
        kinds={
            "walker": Kind(Walker, systems=(walk,), max_speed=20.0, radius=1.0),
            "bomb": Kind(Bomb, systems=(tick_tock,)),
        },
        create_world=create_world,
    )
    """
)


def test_a_slot_that_keeps_dying_is_quarantined_and_the_rest_ticks_on(tmp_path: Path) -> None:
    (tmp_path / "bomb.py").write_text(BOMB)
    config = write_config(
        tmp_path,
        {
            "world": {"size": 100.0, "halo": 2.0},
            "mesh": {"grid": 2},
            "supervise": {"max_restarts": 2, "restart_window": 120.0},
            "plugins": {"load": ["bomb"], "dirs": [str(tmp_path)]},
        },
    )
    daemon = start_daemon(config, "--rate", "25", "--workers", "2")
    try:
        status = wait_for_status(config, lambda s: s["quarantined_partitions"], daemon=daemon)
        assert status["quarantined_partitions"] == ["1/0/0", "1/0/1"]
        assert status["failovers"] == 3  # two restarts, then the budget is spent
        workers = inspect(config, "workers")
        assert [(w["id"], w["state"]) for w in workers] == [(0, "quarantined"), (1, "running")]
        frozen_walker = inspect(config, "entity", entity=2)
        live_walker = inspect(config, "entity", entity=21)
        later = wait_for_status(config, lambda s: s["tick"] >= status["tick"] + 20, daemon=daemon)
        assert later["quarantined_partitions"] == status["quarantined_partitions"]
        assert inspect(config, "entity", entity=2) == frozen_walker
        assert inspect(config, "entity", entity=21) != live_walker
        assert terminate(config, daemon) == 0, daemon.stderr.read()
        assert "partitions quarantined" in daemon.stderr.read()
    finally:
        daemon.kill()
    world = stored_world(config)
    assert world["tick"] > later["tick"] and world["entities"] == 21


class LockedDatabase:
    """Another process holds the database's write lock."""

    error = "database is locked"

    def __init__(self, folder: Path, _daemon: subprocess.Popen[str]) -> None:
        self.blocker = sqlite3.connect(folder / "data" / "world.db", isolation_level=None)

    def start(self) -> None:
        self.blocker.execute("BEGIN EXCLUSIVE")

    def end(self) -> None:
        self.blocker.execute("ROLLBACK")
        self.blocker.close()


class FullDisk:
    """Every write past the first KiB of a file fails (EFBIG), as on a full disk."""

    error = "disk I/O error"

    def __init__(self, _folder: Path, daemon: subprocess.Popen[str]) -> None:
        self.pid = daemon.pid

    def start(self) -> None:
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))

    def end(self) -> None:
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)


def test_a_failing_database_delays_persistence_but_not_the_world(tmp_path: Path) -> None:
    """The database is locked by another process, then the disk is full: twice, ticking goes
    on, nothing is written meanwhile, and once the fault ends everything is."""
    folder = tmp_path / "failing"
    folder.mkdir()
    failing_world = {**TAVERN, "tick": {"persist_every": 2}}
    config = write_config(folder, failing_world)
    daemon = start_daemon(config, "--rate", "40", "--seed", "7", "--workers", "2")
    try:
        ok = wait_for_status(config, lambda s: s["persisted_tick"] >= 4, daemon=daemon)
        for fault in (LockedDatabase, FullDisk):
            storage = fault(folder, daemon)
            storage.start()
            failing = wait_for_status(
                config,
                lambda s, n=ok["persist_failures"]: s["persist_failures"] >= n + 2,
                daemon=daemon,
            )
            later = wait_for_status(config, lambda s, t=failing["tick"]: s["tick"] >= t + 40)
            assert later["persisted_tick"] <= failing["tick"]  # nothing written, ticking goes on
            storage.end()
            ok = wait_for_status(
                config, lambda s, t=later["tick"]: s["persisted_tick"] > t, daemon=daemon
            )
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        logged = daemon.stderr.read()
        failed = [line for line in logged.splitlines() if "persist failed" in line]
        for fault in (LockedDatabase, FullDisk):
            assert any(fault.error in line for line in failed), (fault.error, logged[-3000:])
    finally:
        daemon.kill()
    with sqlite3.connect(folder / "data" / "world.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    final = stored_world(config, with_hash=True)
    assert run_world(tmp_path / "straight", failing_world, "--ticks", str(final["tick"])) == final


def test_sigterm_during_a_failover_still_writes_the_final_tick(tmp_path: Path) -> None:
    config = write_config(tmp_path, TAVERN)
    daemon = start_daemon(config, "--rate", "25", "--workers", "3")
    try:
        before = wait_for_status(config, lambda s: s["tick"] >= 30, daemon=daemon)
        pids = list(_worker_pids(config).values())
        os.kill(pids[2], signal.SIGKILL)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, daemon.stderr.read()
    finally:
        daemon.kill()
    assert wait_gone(pids) == []
    world = stored_world(config)
    assert world["tick"] > before["tick"]


FLAKY = (
    BOMB.replace('name="bomb"', 'name="flaky"')
    .replace("import os\n", "import os\nfrom pathlib import Path\nHERE = Path(__file__).parent\n")
    # Two bugs, each "fixed" by removing its file: walker 2 raises, the bomb kills its worker.
    .replace("if ctx.tick >= 20:", 'if (HERE / "bomb-bug").exists():')
    # Walkers pace on the spot: however long the test takes, nobody wraps round the world.
    .replace("me.y = (me.y + 0.5) % 100.0", "me.y = 1.0 + me.state.steps % 2 * 0.5")
    .replace(
        "def walk(me, ctx):\n",
        'def walk(me, ctx):\n    if me.id == 2 and (HERE / "walker-bug").exists():\n'
        '        raise RuntimeError("tripped")\n',
    )
)


def test_an_operator_releases_what_was_quarantined_without_a_restart(tmp_path: Path) -> None:
    (tmp_path / "flaky.py").write_text(FLAKY)
    config = write_config(
        tmp_path,
        {
            "world": {"size": 100.0, "halo": 2.0},
            "mesh": {"grid": 2},
            "supervise": {"max_restarts": 1, "quarantine_after": 3},
            "plugins": {"load": ["flaky"], "dirs": [str(tmp_path)]},
        },
    )
    (tmp_path / "walker-bug").touch()
    daemon = start_daemon(config, "--rate", "25", "--workers", "2")
    try:
        wait_for_status(config, lambda s: s["quarantined"] == [2], daemon=daemon)
        (tmp_path / "bomb-bug").touch()
        down = wait_for_status(config, lambda s: s["quarantined_partitions"], daemon=daemon)
        assert down["quarantined_partitions"] == ["1/0/0", "1/0/1"]
        frozen = inspect(config, "entity", entity=2)
        refused = meshd("release", "--config", str(config), check=False)
        assert refused.returncode == 2 and "nothing to release" in refused.stderr
        for bug in ("walker-bug", "bomb-bug"):  # the plugin's author fixes both bugs
            (tmp_path / bug).unlink()
        released = meshd_json("release", "--entity", "2", "--config", str(config))
        assert released == {"entities": [2], "partitions": []}
        released = meshd_json("release", "--partitions", "--config", str(config))
        assert released == {"entities": [], "partitions": ["1/0/0", "1/0/1"]}
        since = inspect(config, "status")["tick"]  # both releases are done by this tick
        after = wait_for_status(config, lambda s: s["tick"] > since + 40, daemon=daemon)
        assert after["quarantined"] == [] and after["quarantined_partitions"] == []
        workers = inspect(config, "workers")
        assert [(w["id"], w["state"]) for w in workers] == [(0, "running"), (1, "running")]
        walker = inspect(config, "entity", entity=2)
        assert walker["state"]["steps"] > frozen["state"]["steps"] + 20  # it walks again
        assert terminate(config, daemon) == 0
        log = daemon.stderr.read()
    finally:
        daemon.kill()
    released_lines = [line for line in log.splitlines() if "operator released" in line]
    assert len(released_lines) == 2 and '"uid": ' in released_lines[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_only_the_daemons_own_user_may_use_the_admin_socket(tmp_path: Path) -> None:
    # Open the way on purpose: the file modes are the first guard, this tests the second.
    reachable = Path(tempfile.mkdtemp(prefix="meshd-uid-"))
    reachable.chmod(0o711)
    data = reachable / "data"
    config = write_config(tmp_path, {**TAVERN, "data": {"dir": str(data)}})
    daemon = start_daemon(config, "--rate", "20", "--workers", "1")
    try:
        wait_for_status(config, daemon=daemon)
        socket_path = data / "meshd.sock"
        data.chmod(0o711)
        socket_path.chmod(0o666)
        ask = textwrap.dedent(
            f"""
            import os
            from meshd.ops import admin
            os.setgid(65534)
            os.setuid(65534)
            path = {str(socket_path)!r}
            for request in (admin.AdminRequest("status"),
                            admin.AdminRequest("release", all_entities=True),
                            admin.AdminRequest("reload")):
                try:
                    admin.request(path, request)
                except admin.AdminError as exc:
                    print(exc)
            """
        )
        other = subprocess.run(
            [sys.executable, "-c", ask], capture_output=True, text=True, timeout=60
        )
    finally:
        daemon.kill()
        daemon.wait(timeout=10)
        shutil.rmtree(reachable)
    assert other.returncode == 0, other.stderr
    # Issue #14: the views too (before, anyone who could reach the socket could look).
    assert (
        other.stdout.splitlines()
        == [
            "the admin socket answers only the daemon's own user (uid 0), and uid 65534 is not "
            "it (admin.group may name a group whose members may look too)"
        ]
        * 3
    )
