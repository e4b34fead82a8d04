"""The plugin guide's game, as issue #13 accepts the plugin authors' kit.

``tests/fixtures/plugins/snowfight.py`` is written with ``docs/plugins.md``
and ``meshd.testing`` only: a score in world state from hits on kids that
different workers own, a timer 60 ticks on, a message to every player. Here
it runs in-process (one worker against four, ``assert_deterministic``) and
in a real daemon with a real client, stopped and started again; and the
guide's code is held to be the code that runs here.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sqlite3
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import attrs
import cbor2
import pytest
import trio
from conftest import REPO, meshd, start_daemon, write_config

from meshd import client
from meshd.common.config import load_config
from meshd.mesh.plugins import load_plugin_set
from meshd.testing import World, assert_deterministic

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "plugins"
SETTINGS = {"snowfight": {"throw_chance": 0.1}}  # plenty of hits: some kid is always down
GUIDE = REPO / "docs" / "plugins.md"


def snowfight(workers: int = 1) -> World:
    return World(["snowfight"], dirs=[FIXTURES], settings=SETTINGS, workers=workers)


def test_a_player_runs_and_throws_where_told_and_stops_on_leaving() -> None:
    world = snowfight()
    ann = world.add_player("ann")
    world.step()  # ann is in the world and has joined
    start = world.entity(ann)
    world.send(ann, "move", {"dy": 1.0})
    world.send(ann, "throw", {"angle": 0.0})
    world.step()
    (ball,) = [b for b in world.entities("snowball") if b.state.thrower == ann]
    assert (ball.state.vx, ball.state.vy, ball.state.team) == (40.0, 0.0, start.state.team)
    world.step(9)
    assert world.entity(ann).y == pytest.approx(start.y + 10 * 4.0 * 0.05)
    with pytest.raises(ValueError, match="argument angle must be a number, got 'up'"):
        world.send(ann, "throw", {"angle": "up"})
    world.leave(ann)
    world.step()
    assert world.entity(ann).state.vy == 0.0 and world.failures == []


def test_a_hit_kid_gets_up_exactly_60_ticks_later_and_everyone_hears_of_it() -> None:
    world = snowfight(workers=4)
    world.step(60)  # the first snowballs land from about tick 40
    kid = next(k for k in world.entities("kid") if k.state.down_until)
    hit_at = kid.state.down_until - 60
    heard = [m for m in world.messages if m.sender == kid.id]
    assert [(m.tick, m.player, m.radius) for m in heard] == [(hit_at, None, None)]
    world.step(hit_at + 59 - world.tick)
    assert world.entity(kid.id).state.got_up == 0  # still in the snow
    world.step()
    assert world.entity(kid.id).state.got_up == hit_at + 60


def test_hits_on_kids_of_different_workers_add_up_to_the_same_score_as_on_one() -> None:
    one, four = snowfight(workers=1), snowfight(workers=4)
    one.step(150)
    four.step(150)
    # (each World loads the plugin file afresh: compare values, not instances of two classes)
    assert attrs.astuple(one.world_state("snowfight")) == attrs.astuple(
        four.world_state("snowfight")
    )
    assert one.digest() == four.digest() and four.failures == []
    score = four.world_state("snowfight")
    assert (score.red, score.blue) == _points_against(
        [attrs.asdict(k.state) for k in four.entities("kid")]
    )
    assert score.red > 0 and score.blue > 0
    # Who scored: the kids that were hit, each sending its point from its own worker.
    assert len({four.worker_of(k.id) for k in four.entities("kid") if k.state.hits}) >= 2


def _points_against(kids: list[dict[str, Any]]) -> tuple[int, int]:
    """The points red and blue scored: the hits the other team's kids took."""
    took = {team: sum(k["hits"] for k in kids if k["team"] == team) for team in ("red", "blue")}
    return took["blue"], took["red"]


def test_the_world_is_the_same_on_any_workers_and_across_a_restart() -> None:
    # 130 ticks: hits from about tick 40; `meshd check`'s restart at 65, with kids down
    assert_deterministic(["snowfight"], dirs=[FIXTURES], settings=SETTINGS, ticks=130)


async def play(host: str, port: int) -> client.Player:
    """Log in as ann, throw a snowball, watch until a hit is announced."""
    async with await client.connect(host, port, "ann", "my secret") as ann:
        await ann.send("throw", angle=0.0)
        async for view in ann.views():
            if ann.messages:  # a Message comes after its tick's View and WorldState
                print(view.tick, ann.messages[0].data, ann.world_state["snowfight"])
                return ann
    raise AssertionError("the views ended")


def _players_address(daemon: subprocess.Popen[str]) -> tuple[str, int]:
    """Where the daemon takes players, from its log (asking ``inspect status`` until it
    answers would cost seconds of subprocesses)."""
    for line in daemon.stderr or ():
        if '"gateway listening"' in line:
            host, port = json.loads(line)["address"].rsplit(":", 1)
            return host, int(port)
    raise AssertionError(f"the daemon exited ({daemon.wait()}) before taking players")


async def _play_within(seconds: float, address: tuple[str, int]) -> client.Player:
    with trio.fail_after(seconds):
        return await play(*address)


def _stored(data: Path) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """The stored world's meta table and its kids' states, by id."""
    with sqlite3.connect(data / "world.db") as db:
        meta = {key: cbor2.loads(value) for key, value in db.execute("SELECT key, value FROM meta")}
        rows = db.execute("SELECT id, state FROM entity WHERE kind = 'kid'")
        return meta, {entity: cbor2.loads(state) for entity, state in rows}


def test_a_client_hears_hits_and_the_score_and_a_pending_timer_survive_a_restart(
    tmp_path: Path,
) -> None:
    config = write_config(
        tmp_path,
        {
            "world": {"size": 100.0, "halo": 3.0},
            "mesh": {"mode": "static", "workers": 2, "grid": 2},  # a worker per team
            "gateway": {"processes": 1},
            "plugins": {"load": ["snowfight"], "dirs": [str(FIXTURES)], **SETTINGS},
        },
    )
    daemon = start_daemon(config, "--rate", "40")
    try:
        ann = trio.run(_play_within, 20, _players_address(daemon))
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    heard = ann.messages[0].data
    assert heard["by"] in ("red", "blue") and heard["hit"]
    assert sum(ann.world_state["snowfight"].values()) > 0  # that hit's point, at least

    meta, kids = _stored(tmp_path / "data")
    score, stopped = meta["world"]["snowfight"], meta["tick"]
    assert (score["red"], score["blue"]) == _points_against(list(kids.values()))
    # [due, target, sender, seq, name, data]: a kid down in the snow when the daemon stopped
    due, kid = min((timer[0], timer[1]) for timer in meta["timers"] if timer[4] == "get_up")
    assert stopped < due <= stopped + 60 and kids[kid]["down_until"] == due

    again = ("--listen", "", "--rate", "0", "--ticks", str(due - stopped))  # to its due tick
    meshd("serve", "--config", str(config), *again)
    meta, kids = _stored(tmp_path / "data")
    assert meta["tick"] == due and kids[kid]["got_up"] == due
    # the points scored before the stop still count: the score is still every hit's
    later = meta["world"]["snowfight"]
    assert (later["red"], later["blue"]) == _points_against(list(kids.values()))
    assert later["red"] >= score["red"] and later["blue"] >= score["blue"]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", GUIDE.read_text(), flags=re.S | re.M)


def test_the_guides_code_is_the_code_that_runs_here(tmp_path: Path) -> None:
    """Each Python block of the guide is copied from the game or its tests (a block from
    inside a function, dedented), except those that show a mistake (``# wrong``)."""
    sources = [(FIXTURES / "snowfight.py").read_text(), Path(__file__).read_text()]
    blocks = _blocks("python")
    assert len(blocks) > 10
    for block in blocks:
        compile(block, str(GUIDE), "exec")
        if block.startswith("# wrong"):
            continue
        indented = textwrap.indent(block, "    ")
        assert any(block in text or indented in text for text in sources), block
    # its meshd.toml loads the game as `meshd serve` would, halo check included
    (toml,) = _blocks("toml")
    (tmp_path / "plugins").mkdir()
    shutil.copy(FIXTURES / "snowfight.py", tmp_path / "plugins")
    (tmp_path / "meshd.toml").write_text(toml)
    plugins = load_plugin_set(load_config(tmp_path / "meshd.toml", environ={}))
    assert plugins.settings["snowfight"].kids == 8
