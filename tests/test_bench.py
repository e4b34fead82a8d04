"""Benchmark and soak runs: left out of the default suite (-m bench, -m slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TAVERN, meshd, meshd_json, write_config

from meshd._bench import bench_sim


@pytest.mark.bench
def test_bench_sim_runs_and_all_variants_reach_the_same_world() -> None:
    result = bench_sim(npcs=1000, ticks=40)
    assert result["same_world"]
    assert result["bare_updates_per_s"] > 0 and result["ratio_1w"] > 0.5


@pytest.mark.slow
def test_long_run_with_many_workers_matches_one_worker(tmp_path: Path) -> None:
    hashes = []
    for workers in ("1", "8"):
        folder = tmp_path / workers
        folder.mkdir()
        config = write_config(folder, TAVERN)
        meshd(
            "serve",
            "--config",
            str(config),
            "--rate",
            "0",
            "--workers",
            workers,
            "--ticks",
            "2000",
            timeout=1200,
        )
        hashes.append(meshd_json("inspect", "world", "--config", str(config), "--hash")["hash"])
    assert hashes[0] == hashes[1]
