"""``meshd reload``: new plugin code in a running world, with players on it.

The plugin is written to a folder the test owns, then rewritten while the
daemon runs: version 1 runners step east and count ``trips``; version 2
step west, have a new ``heading`` and count ``laps`` (the field renamed,
with ``Kind(migrate=...)``), and players gain a ``wave`` action. Each
version stamps its number into every state it writes, so a view shows which
code made it. Runner 3 fails in version 1 (quarantined) and not in 2, and
the runners count their waits at the world's edge in the world state, which gains a field.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import trio
from conftest import meshd, meshd_json, start_daemon, wait_for_status, write_config
from test_players import gateway_of

from meshd import client

RELAY = """
import attrs
from meshd import Kind, Plugin, number, takes


@attrs.frozen
class Runner:
    code: int = 0{heading}
    {count}: int = 0


@attrs.frozen
class Tally:
    waits: int = 0{tally}


def wait(tally, data):
    return attrs.evolve(tally, waits=tally.waits + 1)


@attrs.frozen
class Body:
    name: str = ""
    vx: float = 0.0
    vy: float = 0.0
    code: int = 0


def run(me, ctx):{fault}
    x = me.x + {step} * ctx.dt
    at_edge = not 0 <= x < ctx.world_size  # it waits there for the other version
    if at_edge:
        ctx.change_world("wait", {{}})
    else:
        me.x = x
    me.state = attrs.evolve(me.state, code={version}, {count}=me.state.{count} + at_edge)


def body(me, ctx):
    edge = ctx.world_size - 0.001
    me.x = min(max(me.x + me.state.vx * ctx.dt, 0.0), edge)
    me.y = min(max(me.y + me.state.vy * ctx.dt, 0.0), edge)
    if me.state.code != {version}:
        me.state = attrs.evolve(me.state, code={version})


@takes(dx=number(-1, 1, default=0.0), dy=number(-1, 1, default=0.0))
def on_move(me, event, ctx):
    me.state = attrs.evolve(me.state, vx=4 * event.data["dx"], vy=4 * event.data["dy"])


@takes()
def on_wave(me, event, ctx):
    ctx.tell(me.id, "waved")


def new_player(name, world):
    world.spawn("body", world.size / 2, world.size / 2, state=Body(name=name))


def create_world(world):
    for _ in range(60):
        x, y = world.rng.uniform(0, world.size), world.rng.uniform(0, world.size)
        world.spawn("runner", x, y, state=Runner())


plugin = Plugin(
    name="relay",
    kinds={{
        "runner": Kind(Runner, systems=(run,), max_speed=30.0, radius=0.0{migrate}),
        "body": Kind(Body, systems=(body,), max_speed=6.0, radius=0.0),
    }},
    inputs={{"move": on_move{wave}}},
    new_player=new_player,
    create_world=create_world,
    world=Tally,
    world_events={{"wait": wait}},
)
"""

MIGRATE = ", migrate=lambda old: {'code': old['code'], 'laps': old.pop('trips')}"
VERSION_1 = RELAY.format(
    version=1,
    fault="\n    if me.id == 3:\n        raise RuntimeError('runner 3 trips over')",
    step=30,
    heading="",
    count="trips",
    migrate="",
    wave="",
    tally="",
)
VERSION_2 = RELAY.format(
    version=2,
    fault="",
    step=-30,
    heading="\n    heading: float = -1.0",
    count="laps",
    migrate=MIGRATE,
    wave=', "wave": on_wave',
    tally="\n    best: int = 0",
)


def _world(tmp_path: Path, **gateway: object) -> tuple[Path, Path]:
    plugins = tmp_path / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "relay.py").write_text(VERSION_1)
    config = write_config(
        tmp_path,
        {
            "world": {"size": 200.0, "halo": 45.0, "seed": 7},
            "mesh": {"mode": "static", "workers": 2},
            "plugins": {"load": ["relay"], "dirs": [str(plugins)]},
            "gateway": {"listen": "127.0.0.1:0", **gateway} if gateway else {"listen": ""},
        },
    )
    return config, plugins / "relay.py"


def _reload(config: Path) -> subprocess.CompletedProcess[str]:
    return meshd("reload", "--config", str(config), "--json", check=False)


def test_reload_while_bots_play_loses_no_player_and_no_tick(tmp_path: Path) -> None:
    config, relay = _world(tmp_path, processes=1)
    daemon = start_daemon(config, "--rate", "20")
    try:
        host, port = gateway_of(config)
        workers_before = {
            w["id"]: w["pid"] for w in meshd_json("inspect", "workers", "-c", str(config))
        }
        bots = subprocess.Popen(
            [sys.executable, "-m", "meshd", "bots", "--connect", f"{host}:{port}", "--count", "30",
             "--duration", "6", "--scenario", "crowd", "--engine", "native", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        seen: list[tuple[int, int]] = []  # (view tick, the code that made my entity's state)

        async def watch() -> tuple[int, list[str], list[str]]:
            async with (
                await client.connect(host, port, "watcher", "w-secret") as me,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(_note_views, me, seen)
                await _until(lambda: len(seen) >= 20)
                await me.send("wave")  # not an action yet
                (tmp_path / "relay.new").write_text(VERSION_2)
                (tmp_path / "relay.new").rename(relay)
                done = await trio.to_thread.run_sync(_reload, config)
                assert done.returncode == 0, done.stderr
                tick = json.loads(done.stdout)["tick"]
                await _until(lambda: seen[-1][0] > tick + 20)
                await me.send("wave")
                await _until(lambda: me.messages)
                nursery.cancel_scope.cancel()
                return tick, me.bad_inputs, [m.data for m in me.messages]

        tick, refused, told = trio.run(watch)
        out, err = bots.communicate(timeout=60)
        workers_after = {
            w["id"]: w["pid"] for w in meshd_json("inspect", "workers", "-c", str(config))
        }
        status = meshd_json("inspect", "status", "--config", str(config))
    finally:
        daemon.kill()
        daemon.wait(timeout=10)
    summary = json.loads(out)
    assert summary["connected"] == 30 and summary["disconnects"] == 0, err
    assert summary["tick_gaps"] == 0
    assert summary["bad_inputs"] == 0  # the bots' moves fit the plugin's declared [-1, 1]
    ticks = [view_tick for view_tick, _code in seen]
    assert ticks == list(range(ticks[0], ticks[-1] + 1)), "the watcher missed a tick"
    codes = {view_tick: code for view_tick, code in seen}
    assert codes[tick] == 1 and codes[tick + 1] == 2  # the new code ran the very next tick
    assert refused == ["input 1: no action 'wave'"] and told == ["waved"]
    assert workers_after.keys() == workers_before.keys()
    assert not set(workers_after.values()) & set(workers_before.values())
    assert status["failovers"] == 0


def test_reload_equals_a_restart_with_the_new_code_and_refuses_what_cannot_load(
    tmp_path: Path,
) -> None:
    config, relay = _world(tmp_path / "live")
    daemon = start_daemon(config, "--rate", "50")
    try:
        wait_for_status(config, lambda s: s["tick"] > 5, daemon=daemon)
        refusals = {}
        broken = {
            "import": VERSION_2.replace("import attrs", "import attrs, no_such_module"),
            "kind gone": VERSION_2.replace('"runner": Kind', '"sprinter": Kind'),
            "no migration": VERSION_2.replace(MIGRATE, ""),
        }
        for name, code in broken.items():
            relay.write_text(code)
            refused = _reload(config)
            assert refused.returncode == 1
            refusals[name] = refused.stderr
        relay.write_text(VERSION_2)
        done = _reload(config)
        assert done.returncode == 0, done.stderr
        reloaded = json.loads(done.stdout)
        world = meshd_json("inspect", "world", "--config", str(config), "--hash")
    finally:
        daemon.kill()
        daemon.wait(timeout=10)
    assert "does not load" in refusals["import"] and "no_such_module" in refusals["import"]
    assert "defines no kind 'runner'" in refusals["kind gone"]
    assert "trips" in refusals["no migration"] and "Kind(migrate=...)" in refusals["no migration"]
    assert reloaded["converted"] == reloaded["migrated"] == 60
    assert reloaded["released"] == [3]  # the fix runs the quarantined runner again
    assert reloaded["actions"] == ["move", "wave"]
    assert world["world_state"]["relay"]["waits"] > 0 and world["world_state"]["relay"]["best"] == 0

    # The same world started with version 1, stopped at the reload's tick and restarted
    # with version 2, ends where the reloaded one did.
    again, relay = _world(tmp_path / "restarted")
    meshd("serve", "--config", str(again), "--rate", "0", "--ticks", str(reloaded["tick"]))
    relay.write_text(VERSION_2)
    later = world["tick"] - reloaded["tick"]
    meshd("serve", "--config", str(again), "--rate", "0", "--ticks", str(later))
    restarted = meshd_json("inspect", "world", "--config", str(again), "--hash")
    assert restarted["tick"] == world["tick"] and restarted["hash"] == world["hash"]


async def _note_views(me: client.Player, seen: list[tuple[int, int]]) -> None:
    """Note each view's tick and the code that made ``me``'s own entity's state."""
    async for view in me.views():
        seen.append((view.tick, me.world[me.entity].state["code"]))


async def _until(condition, limit: float = 20.0) -> None:
    with trio.fail_after(limit):
        while not condition():
            await trio.sleep(0.02)


def test_the_reload_command_needs_a_running_daemon(tmp_path: Path) -> None:
    config, _relay = _world(tmp_path)
    result = _reload(config)
    assert result.returncode == 1 and "no meshd daemon is running" in result.stderr


def test_a_plugin_file_broken_on_disk_does_not_take_the_daemon_down(tmp_path: Path) -> None:
    """Issue: a warm spare started after a plugin file was broken failed to load it, and
    that failure stopped the whole daemon. Now the world ticks on and the log says why."""
    config, relay = _world(tmp_path)
    log = tmp_path / "daemon.log"
    daemon = start_daemon(config, "--rate", "50", log=log)
    try:
        wait_for_status(config, lambda s: s["spares"], daemon=daemon)
        relay.write_text(VERSION_2.replace("import attrs", "import attrs, no_such_module"))
        worker = meshd_json("inspect", "workers", "--config", str(config))[0]
        os.kill(worker["pid"], signal.SIGKILL)  # its slot takes the spare; a new one fails
        deadline = time.monotonic() + 60
        while "a warm spare did not start; trying again" not in log.read_text():
            assert daemon.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no word of the spare that failed"
            time.sleep(0.1)
        now = wait_for_status(config, daemon=daemon)["tick"]
        later = wait_for_status(config, lambda s: s["tick"] > now + 50, daemon=daemon)
    finally:
        daemon.kill()
        daemon.wait(timeout=10)
    assert later["failovers"] == 1 and "no_such_module" in log.read_text()
