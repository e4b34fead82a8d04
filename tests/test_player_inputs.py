"""What players send, through a real gateway: refused, undone, acknowledged at the right view."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from conftest import REPO, inspect, start_daemon, write_config
from test_players import PLAYERS, gateway_of

from meshd import client
from meshd.players.protocol import Input, encode_frame


@pytest.fixture(scope="module")
def tavern(tmp_path_factory):
    """One tavern world for the module: 2 workers, 30 Hz, players on any free port."""
    folder = tmp_path_factory.mktemp("tavern")
    config = write_config(folder, PLAYERS)
    daemon = start_daemon(config, "--rate", "30", "--seed", "7", "--workers", "2")
    try:
        yield config, gateway_of(config)
    finally:
        daemon.kill()
        daemon.wait(timeout=10)


def status(config: Path) -> dict:
    return inspect(config, "status")


async def raw_input(player: client.Player, seq: int, action: str, args: dict) -> None:
    """An input the client library would not build (it takes keyword arguments)."""
    await player.stream.send_all(encode_frame(Input(seq=seq, action=action, args=args)))


async def views_until(player: client.Player, done, limit: float = 10.0) -> None:
    with trio.fail_after(limit):
        async for view in player.views():
            if done(view):
                return


def nested(depth: int) -> dict:
    args: dict = {}
    for _ in range(depth - 1):
        args = {"a": args}
    return args


def test_arguments_a_worker_could_not_take_are_refused_at_the_gateway(tavern) -> None:
    """Issue: 30 levels of nesting crashed every worker that got them; now the gateway refuses."""
    config, address = tavern

    async def main() -> list[str]:
        async with await client.connect(*address, "deep", "d") as player:
            await raw_input(player, 1, "move", {"dx": nested(30)})
            await raw_input(player, 2, "move", {"dx": 1.0, "pad": "x" * 2000})
            await raw_input(player, 3, "move", {"dx": [[[[[[[[[1.0]]]]]]]]]})
            seq = await player.send("move", dx=1.0, dy=0.0)
            await views_until(player, lambda view: view.ack == seq)
            return player.bad_inputs

    refused = trio.run(main)
    assert len(refused) == 3, refused
    assert refused[0] == "input 1 (move): argument dx.a.a.a.a.a.a.a nests deeper than 8 levels"
    assert re.fullmatch(r"input 2 \(move\): \d+ bytes; an input is at most 1024", refused[1])
    assert "input 3 (move): argument dx[0]" in refused[2] and "deeper than 8" in refused[2]
    after = status(config)
    assert after["failovers"] == 0 and after["quarantined_partitions"] == []
    assert after["workers"] == 2


def test_a_bad_argument_is_the_inputs_failure_not_the_players(tavern) -> None:
    """Issue: `move {dx: "fast"}` every tick quarantined the player's own entity forever."""
    config, address = tavern

    async def main() -> tuple[list[str], float, float]:
        async with await client.connect(*address, "hasty", "h") as player:
            for seq in range(1, 16):  # more than supervise.quarantine_after (10) ticks running
                await raw_input(player, seq, "move", {"dx": "fast", "dy": 0})
                await views_until(player, lambda view, seq=seq: view.ack == seq)
            x_before = player.world[player.entity].x
            seq = await player.send("move", dx=1.0, dy=0.0)
            await views_until(player, lambda view: view.ack == seq)
            await views_until(player, lambda view: player.world[player.entity].x > x_before + 1)
            return player.bad_inputs, x_before, player.world[player.entity].x

    refused, x_before, x_after = trio.run(main)
    assert refused == [
        f"input {seq} (move) failed: ValueError: dx must be a number, got 'fast'"
        for seq in range(1, 16)
    ]
    assert x_after > x_before + 1  # still walks
    assert status(config)["quarantined"] == []


def test_nan_and_infinity_are_refused_before_they_reach_the_world(tavern) -> None:
    """Issue: `move {dx: NaN}` teleported the player to the world's edge and stored NaN."""
    _config, address = tavern

    async def main() -> tuple[list[str], client.Entity, client.Entity]:
        async with await client.connect(*address, "nan", "n") as player:
            await views_until(player, lambda view: player.entity in player.world)
            before = player.world[player.entity]
            before = client.Entity(before.id, before.kind, before.x, before.y, 0.0, {})
            await raw_input(player, 1, "move", {"dx": math.nan, "dy": 0.0})
            await raw_input(player, 2, "move", {"dx": 0.0, "dy": -math.inf})
            await raw_input(player, 3, "throw", {"angle": math.inf})
            seq = await player.send("throw", angle=0.5)  # a good one after them
            await views_until(player, lambda view: view.ack == seq)
            return player.bad_inputs, before, player.world[player.entity]

    refused, before, after = trio.run(main)
    assert refused == [
        "input 1 (move): argument dx is nan: numbers must be finite",
        "input 2 (move): argument dy is -inf: numbers must be finite",
        "input 3 (throw): argument angle is inf: numbers must be finite",
    ]
    assert (after.x, after.y) == (before.x, before.y)
    assert all(math.isfinite(v) for v in after.state.values() if isinstance(v, float))


def test_the_view_that_acks_an_input_is_the_first_to_show_its_effect(tavern) -> None:
    """Issue: ack came one view early, before the velocity or the dropped mug showed."""
    _config, address = tavern

    async def main() -> list[tuple[int, float, bool, int]]:
        seen = []  # (ack, vx, has_mug, my mugs in view) per view
        async with await client.connect(*address, "acker", "a") as player:

            def mugs() -> int:
                return sum(
                    e.kind == "mug" and e.state["dropped_by"] == player.entity
                    for e in player.world.values()
                )

            def record(view) -> bool:
                me = player.world[player.entity]
                seen.append((view.ack, me.state["vx"], me.state["has_mug"], mugs()))
                return view.ack == wanted

            await views_until(player, lambda view: player.entity in player.world)
            wanted = await player.send("move", dx=1.0, dy=0.0)
            await views_until(player, record)
            wanted = await player.send("drop")
            await views_until(player, record)
        return seen

    seen = trio.run(main)
    moved = next(i for i, (ack, *_rest) in enumerate(seen) if ack == 1)
    assert seen[moved][1] == 5.0 and all(vx == 0.0 for _a, vx, _m, _n in seen[:moved])
    dropped = next(i for i, (ack, *_rest) in enumerate(seen) if ack == 2)
    assert seen[dropped][2:] == (False, 1)  # the mug left the hand and lies in view...
    assert all(row[2:] == (True, 0) for row in seen[:dropped])  # ...not a view before


def test_the_readme_client_example_runs_as_written(tavern) -> None:
    _config, (host, port) = tavern
    readme = (REPO / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert '"127.0.0.1", 7777' in example
    code = example.replace('"127.0.0.1", 7777', f"{host!r}, {port}")
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert len(lines) > 50
    first, last = (line.split() for line in (lines[0], lines[-1]))
    assert int(last[0]) > int(first[0]) and float(last[3]) == 5.0
    assert float(last[1]) > float(first[1]) and float(last[2]) == float(first[2])  # walks east


def test_a_declared_input_is_refused_at_the_gateway_naming_the_argument(tavern) -> None:
    """The tavern's `throw` and `drop` declare their arguments (meshd.takes)."""
    config, address = tavern

    async def main() -> tuple[list[str], int]:
        async with await client.connect(*address, "thrower", "t") as player:
            await raw_input(player, 1, "throw", {"angle": "up"})
            await raw_input(player, 2, "throw", {})
            await raw_input(player, 3, "throw", {"angle": 0.5, "spin": 3})
            await raw_input(player, 4, "drop", {"gently": True})
            await raw_input(player, 5, "throw", {"angle": 2e6})
            seq = await player.send("throw", angle=1)  # a whole number is a number too
            await views_until(player, lambda view: view.ack == seq)
            mine = [
                e
                for e in player.world.values()
                if e.kind == "bottle" and e.state["thrower"] == player.entity
            ]
            return player.bad_inputs, len(mine)

    refused, bottles = trio.run(main)
    assert refused == [
        "input 1 (throw): argument angle must be a number, got 'up'",
        "input 2 (throw): argument angle is missing",
        "input 3 (throw): unexpected argument spin (it takes angle)",
        "input 4 (drop): unexpected argument gently (it takes no arguments)",
        "input 5 (throw): argument angle must be -1e+06 to 1e+06, got 2000000.0",
    ]
    assert bottles == 1  # only the good throw reached the world
    assert status(config)["failovers"] == 0
