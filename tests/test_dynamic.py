"""The elastic mesh with real workers: a crowd splits it, dispersal shrinks it, same world.

The planner follows measured CPU cost, so the test sets that cost itself:
every awake patron spends ``work_us`` of CPU per tick on top of its rules
(which cost a few microseconds here), and the budget is set against it. The
crowd then needs two workers and the night one, on a machine twice as fast
or twice as slow as this one, or with every core busy.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

from conftest import run_world, start_daemon, stored_world, terminate, write_config

from meshd.ops import admin

WORK_US = 60.0
RATE = 120
"""Ticks per second asked for. The planner counts its dwell and cool-downs in ticks
(seconds x rate), so the reshaping is the same at any rate; a fast rate only
shortens the quiet hours (the busy ones run as fast as the workers can)."""
RUSH_DAY = {
    "world": {"size": 100.0, "halo": 5.0},
    "mesh": {
        "grid": 2,
        # 300 awake patrons cost about 300 x 60 us = 18 ms per tick: well over one
        # worker's 0.9 x 8 ms; the 15 awake at midnight about 1 ms, well under 0.7 x 8 ms.
        "budget_ms": 8.0,
        "min_cell": 6.0,
        "max_workers": 2,
        "dwell": 30 / RATE,  # ticks
        "cooldown": 60 / RATE,
    },
    "plugins": {
        "load": ["tavern"],
        "tavern": {
            "npcs": 300,
            "tavern_x": 0.3,
            "tavern_y": 0.3,
            "tavern_radius": 10.0,
            "crowd_share": 0.0,
            "throw_chance": 0.02,
            "drop_chance": 0.005,
            "day_ticks": 600,
            "night_awake": 0.05,
            "rush_at": 200,
            "rush_ticks": 100,
            "work_us": WORK_US,
        },
    },
}
TICKS = 640


def _tavern_owners(partitions: list[dict], centre: float, radius: float) -> set[int]:
    owners = set()
    for leaf in partitions:
        x0, y0, x1, y1 = leaf["bounds"]
        dx, dy = max(x0 - centre, 0, centre - x1), max(y0 - centre, 0, centre - y1)
        if math.hypot(dx, dy) < radius:
            owners.add(leaf["worker"])
    return owners


def test_a_rush_splits_the_tavern_over_workers_and_dispersal_merges_it_back(tmp_path: Path):
    """Also kills the worker the planner started: a failover mid-reshaping changes nothing."""
    folder = tmp_path / "dynamic"
    folder.mkdir()
    config = write_config(folder, RUSH_DAY)
    # No --ticks: inspect answers until the checks are done, however slow the machine.
    daemon = start_daemon(config, "--rate", str(RATE), "--seed", "7")
    socket = folder / "data" / "meshd.sock"
    seen = []  # (tick, leaves, workers, workers owning the tavern)
    killed, stats = None, {}
    try:
        while not seen or seen[-1][0] < TICKS:
            assert daemon.poll() is None, daemon.stderr.read()[-3000:]
            try:
                status = admin.request(socket, admin.AdminRequest("status"), timeout=5)
                partitions = admin.request(socket, admin.AdminRequest("partitions"), timeout=5)
                stats = admin.request(socket, admin.AdminRequest("stats"), timeout=5)
            except admin.AdminError:
                time.sleep(0.1)
                continue
            tavern = _tavern_owners(partitions, 30.0, 10.0)
            if status["tick"] > 0:
                seen.append((status["tick"], len(partitions), status["workers"], len(tavern)))
            if killed is None and status["workers"] == 2:  # a worker the planner just started
                workers = admin.request(socket, admin.AdminRequest("workers"), timeout=5)
                killed = max(workers, key=lambda w: w["id"])["pid"]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.1)
        failovers = status["failovers"]
        assert terminate(config, daemon, timeout=60) == 0, daemon.stderr.read()[-3000:]
    finally:
        daemon.kill()
    assert seen[0][1] == 4 and seen[0][2] == 1, seen  # midnight: one worker, the starting grid
    rush = [s for s in seen if 200 <= s[0] <= 450]  # the crowd gathers, stays, disperses
    assert any(leaves > 4 and tavern >= 2 for _, leaves, _, tavern in rush), seen
    peak = max(s[1] for s in seen)
    night = [s for s in seen if s[0] >= 560]
    assert night and night[-1][2] == 1 and night[-1][1] < peak, seen  # merged, scaled down
    assert killed is not None and failovers >= 1
    assert stats["peak_workers"] == 2 and stats["workers_started"] >= 1
    assert stats["workers_stopped"] >= 1 and stats["splits"] >= 1 and stats["merges"] >= 1
    world = stored_world(config, with_hash=True)
    # The same world on one worker, without the CPU each patron burns (work_us is
    # only spent, it changes nothing in the world): seconds of busy-waiting saved.
    tavern = {**RUSH_DAY["plugins"]["tavern"], "work_us": 0.0}
    plain = {**RUSH_DAY, "plugins": {**RUSH_DAY["plugins"], "tavern": tavern}}
    expected = run_world(tmp_path / "one", plain, "--workers", "1", "--ticks", str(world["tick"]))
    assert world == expected
