"""Benchmark and soak runs: left out of the default suite (-m bench, -m slow)."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
from conftest import (
    TAVERN,
    meshd_json,
    run_world,
    start_daemon,
    wait_for_status,
    write_config,
)

from meshd.ops.bench import bench_players, bench_rush, bench_sim


@pytest.mark.bench
def test_bench_sim_runs_and_all_variants_reach_the_same_world() -> None:
    result = bench_sim(npcs=1000, ticks=40)
    assert result["same_world"]
    assert result["bare_updates_per_s"] > 0 and result["ratio_1w"] > 0.5


@pytest.mark.bench
@pytest.mark.parametrize("engine", ["native", "python"])
def test_bench_players_measures_server_and_bots_apart(engine: str) -> None:
    result = bench_players(players=20, seconds=4, engine=engine)
    assert result["connected"] == 20 and result["disconnects"] == 0
    # a view every tick, however fast the server ticks on this machine
    assert result["tick_gaps"] == 0 and result["updates_per_s"] > 0.7 * result["measured_rate_hz"]
    assert result["server_cpu"]["core"] > 0 and result["bots_cpu"] > 0
    assert result["server_cpu"]["gateways"] > 0 and sum(result["gateway_players"]) == 20
    assert result["bytes_per_client_s"] > 0


@pytest.mark.bench
def test_bench_rush_sizes_the_crowd_so_that_the_dynamic_mesh_must_grow() -> None:
    result = bench_rush(day_ticks=960, max_workers=2)
    assert result["calibrated"] and result["entities"] > 0 and result["patron_us"] > 0
    assert result["dynamic"]["peak_workers"] == 2 and result["static"]["peak_workers"] == 2
    assert result["same_world"]


@pytest.mark.slow
def test_long_run_with_many_workers_matches_one_worker(tmp_path: Path) -> None:
    one, eight = (
        run_world(tmp_path / workers, TAVERN, "--workers", workers, "--ticks", "2000", timeout=1200)
        for workers in ("1", "8")
    )
    assert one["tick"] == eight["tick"] == 2000
    assert one["hash"] == eight["hash"]


@pytest.mark.slow
def test_chaos_soak_loses_nothing(tmp_path: Path) -> None:
    """60 s at 25 Hz: a random worker SIGKILLed every 2 s, now and then one SIGSTOPped."""
    ticks = 1500
    rng = random.Random(2026)
    folder = tmp_path / "chaos"
    folder.mkdir()
    # About 4 kills per worker slot in every 30 s: more than the default budget allows.
    config = write_config(folder, {**TAVERN, "supervise": {"max_restarts": 100}})
    daemon = start_daemon(
        config, "--rate", "25", "--seed", "7", "--workers", "4", "--ticks", str(ticks)
    )
    kills = 0
    try:
        wait_for_status(config, lambda s: s["tick"] >= 25, daemon=daemon)
        next_kill = time.monotonic()
        while daemon.poll() is None:
            next_kill += 2.0  # every 2 s, however long inspecting the workers takes
            time.sleep(max(0.0, next_kill - time.monotonic()))
            try:
                pids = [w["pid"] for w in meshd_json("inspect", "workers", "--config", str(config))]
            except AssertionError:
                break  # finished meanwhile
            os.kill(rng.choice(pids), signal.SIGSTOP if rng.random() < 0.2 else signal.SIGKILL)
            kills += 1
        assert daemon.wait(timeout=120) == 0, daemon.stderr.read()[-3000:]
    finally:
        daemon.kill()
    assert kills >= 20
    chaotic = meshd_json("inspect", "world", "--config", str(config), "--hash")
    calm = run_world(
        tmp_path / "calm", TAVERN, "--workers", "4", "--ticks", str(ticks), timeout=600
    )
    assert calm == chaotic
