"""``bench players``'s report: its figures from made-up windows, and its ``--players`` list.

Nothing here starts a server: the row is a pure function of what a window
saw, and the command's runs are replaced by that function on made-up numbers.
The stopping and giving up are tried on stand-in processes that misbehave.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from meshd.ops import bench, cli
from meshd.ops.bench import WindowCpu, players_row


def _status(tick: int, players: int, sent: int, **extra: Any) -> dict[str, Any]:
    gateway = {"address": "127.0.0.1:1", "players": players, "bytes_sent": sent}
    return {"tick": tick, "tick_ms": {"p50": 30.0, "p99": 60.0}, "gateway": gateway, **extra}


BOTS = {
    "connected": 300,
    "disconnects": 0,
    "disconnect_reasons": {},
    "connect_s": 2.5,
    "updates_per_s": 19.9,
    "updates_per_s_min": 19.5,
    "tick_gaps": 0,
    "rtt_ms": {"p50": 24.0, "p99": 76.0},
}
GATEWAYS = [{"id": 2, "pid": 12, "epoch": 1, "players": 140}, {"id": 1, "pid": 11, "players": 160}]


def _row(**overrides: Any) -> dict[str, Any]:
    """A 16 s window of 300 players at a full 20 Hz on one core in all, unless overridden."""
    interval = {"p50": 50.0, "p99": 70.0}
    arguments: dict[str, Any] = {
        "players": 300,
        "rate": 20.0,
        "engine": "native",
        "before": _status(1000, 300, 1_000_000),
        "after": _status(1320, 300, 1_000_000 + 300 * 38_000 * 16, tick_interval_ms=interval),
        "cpu": WindowCpu(
            core=8.0, workers=4.0, gateways=4.0, bots=3.2, worker_processes=2, gateway_processes=2
        ),
        "bots": BOTS,
        "elapsed": 16.0,
        "gateway_rows": sorted(GATEWAYS, key=lambda row: row["id"]),
        "load_before": 0.31,
    }
    return players_row(**{**arguments, **overrides})


def test_a_full_rate_row_reports_cpu_per_player_second_unscaled() -> None:
    row = _row()
    assert row["measured_rate_hz"] == 20.0
    assert row["server_cpu"] == {
        "cores": 1.0,
        "core": 0.5,
        "workers": 0.25,
        "gateways": 0.25,
        "processes": 5,
    }
    assert row["bots_cpu"] == 0.2
    # one core for 300 players: 1000 ms / 300 each second
    assert row["server_cpu_ms_per_player_s"] == pytest.approx(3.333)
    assert row["server_cpu_ms_per_player_s_at_20hz"] == row["server_cpu_ms_per_player_s"]
    assert row["bytes_per_client_s"] == 38_000
    assert row["window_players"] == 300
    assert row["tick_ms"] == {"p50": 30.0, "p99": 60.0}
    assert row["tick_interval_ms"] == {"p50": 50.0, "p99": 70.0}
    assert row["gateway_processes"] == 2 and row["gateway_players"] == [160, 140]
    assert row["updates_per_s_min"] == 19.5 and row["rtt_ms"]["p99"] == 76.0
    assert row["load_before"] == 0.31 and row["incomplete"] is None


def test_a_server_behind_its_rate_is_scaled_up_to_the_target_rate() -> None:
    # 1,000 players, 10 Hz measured: half the ticks, so half the work of a 20 Hz second
    row = _row(
        players=1000,
        before=_status(1000, 1000, 0),
        after=_status(1160, 1000, 0),
        cpu=WindowCpu(core=12.0, workers=4.0, gateways=0.0, bots=1.0),
    )
    assert row["measured_rate_hz"] == 10.0
    assert row["server_cpu_ms_per_player_s"] == pytest.approx(1.0)
    assert row["server_cpu_ms_per_player_s_at_20hz"] == pytest.approx(2.0)


def test_a_server_a_little_above_its_rate_is_not_scaled_down() -> None:
    row = _row(after=_status(1322, 300, 0))
    assert row["measured_rate_hz"] > 20.0
    assert row["server_cpu_ms_per_player_s_at_20hz"] == row["server_cpu_ms_per_player_s"]


def test_per_player_figures_divide_by_the_players_the_server_held() -> None:
    # 200 at the start, 100 at the end: it carried 150 on average
    row = _row(before=_status(1000, 200, 0), after=_status(1320, 100, 150 * 1000 * 16))
    assert row["window_players"] == 150
    assert row["bytes_per_client_s"] == 1000
    assert row["server_cpu_ms_per_player_s"] == pytest.approx(1000 / 150, abs=1e-3)


def test_what_was_not_measured_is_none_not_zero() -> None:
    # an older server (no tick interval, no gateways), bots without a summary, no players held
    row = _row(
        before=_status(1000, 0, 0),
        after=_status(1000, 0, 0),
        bots=None,
        gateway_rows=[],
        cpu=WindowCpu(core=1.0, workers=0.0, gateways=0.0, bots=0.0),
        incomplete="the bots printed no summary",
    )
    for key in (
        "connected",
        "disconnects",
        "reconnects",
        "reconnect_gaps",
        "updates_per_s",
        "updates_per_s_min",
        "rtt_ms",
        "tick_interval_ms",
        "server_cpu_ms_per_player_s",
        "server_cpu_ms_per_player_s_at_20hz",
        "bytes_per_client_s",
    ):
        assert row[key] is None, key
    assert row["gateway_processes"] == 0 and row["gateway_players"] == []
    assert row["server_cpu"]["processes"] == 1
    assert row["incomplete"] == "the bots printed no summary"


def test_a_stalled_server_has_no_figure_at_its_target_rate() -> None:
    row = _row(after=_status(1000, 300, 0))
    assert row["measured_rate_hz"] == 0.0
    assert row["server_cpu_ms_per_player_s"] == pytest.approx(3.333)
    assert row["server_cpu_ms_per_player_s_at_20hz"] is None


def test_the_bots_reconnect_counters_are_passed_on() -> None:
    counters = {
        "reconnects": 3,
        "reconnected_bots": 2,
        "reconnect_ms": {"p50": 40.0, "max": 95.0},
        "reconnect_gaps": 1,
        "entity_changed": 0,
    }
    row = _row(bots={**BOTS, **counters})
    assert {key: row[key] for key in counters} == counters


def test_an_empty_window_is_refused() -> None:
    with pytest.raises(ValueError, match="measures nothing"):
        _row(elapsed=0.0)


def test_cpu_is_counted_only_for_processes_alive_at_both_ends() -> None:
    assert bench._cpu_used({1: 2.0, 2: 5.0}, {1: 3.5, 3: 9.0}) == 1.5


def test_gateways_sets_the_servers_gateway_processes_only_when_asked(tmp_path: Path) -> None:
    asked = tomllib.loads(bench._players_config(tmp_path, 300, 20.0, gateways=3))
    assert asked["gateway"]["processes"] == 3
    assert asked["gateway"]["max_clients"] == 400 and asked["tick"]["rate"] == 20.0
    default = tomllib.loads(bench._players_config(tmp_path, 300, 20.0))
    assert "processes" not in default["gateway"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10,x", "'x' is not a whole number"),
        ("10,,20", "'' is not a whole number"),
        ("1.5", "'1.5' is not a whole number"),
        ("300,0", "each count must be at least 1"),
        ("-5", "each count must be at least 1"),
    ],
)
def test_a_bad_players_list_is_a_usage_error(
    value: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_server(**_: Any) -> dict[str, Any]:
        raise AssertionError("no run for a bad --players")

    monkeypatch.setattr(bench, "bench_players", no_server)
    result = CliRunner().invoke(cli.app, ["bench", "players", "--players", value])
    assert result.exit_code == 2
    assert "Invalid value for '--players'" in result.output
    assert message in " ".join(result.output.replace("│", " ").split())


def test_a_players_list_is_parsed_in_order() -> None:
    assert cli._player_counts(" 300, 1000,1500") == (300, 1000, 1500)
    assert cli._player_counts("20") == (20,)


def _fake_runs(monkeypatch: pytest.MonkeyPatch, fail: int | None = None) -> list[dict[str, Any]]:
    """Replace each run by a made-up row; the run for ``fail`` players cannot start."""
    calls: list[dict[str, Any]] = []

    def fake(**kwargs: Any) -> dict[str, Any]:
        calls.append(kwargs)
        if kwargs["players"] == fail:
            raise bench.BenchError("the server exited (code 2): bad config")
        return _row(players=kwargs["players"])

    monkeypatch.setattr(bench, "bench_players", fake)
    return calls


def test_json_is_a_list_with_one_object_per_count(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_runs(monkeypatch)
    args = ["bench", "players", "--players", "300", "--seconds", "3", "--gateways", "2", "--json"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert isinstance(rows, list) and [row["players"] for row in rows] == [300]
    assert calls == [
        {"players": 300, "seconds": 3.0, "rate": 20.0, "engine": "native", "gateways": 2}
    ]

    calls.clear()
    result = CliRunner().invoke(cli.app, ["bench", "players", "--players", "300,1000", "--json"])
    assert [row["players"] for row in json.loads(result.stdout)] == [300, 1000]
    assert [call["players"] for call in calls] == [300, 1000]


def test_a_count_that_fails_is_reported_and_the_series_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fake_runs(monkeypatch, fail=1000)
    args = ["bench", "players", "--players", "300,1000,1500", "--json"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 1
    rows = json.loads(result.stdout)
    assert [row["players"] for row in rows] == [300, 1000, 1500]
    assert rows[1] == {"players": 1000, "error": "the server exited (code 2): bad config"}


def test_the_tables_have_a_row_per_count(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_runs(monkeypatch)
    monkeypatch.setattr(cli, "console", Console(width=100))
    result = CliRunner().invoke(cli.app, ["bench", "players", "--players", "300,1000"])
    assert result.exit_code == 0, result.output
    felt = [line.split() for line in result.stdout.splitlines() if "50.0/70.0" in line]
    assert [cells[0] for cells in felt] == ["300", "1000"]
    assert felt[0][2:6] == ["20.00", "30.0/60.0", "50.0/70.0", "19.9/19.5"]
    cost = [line.split() for line in result.stdout.splitlines() if "38,000" in line]
    assert [cells[0] for cells in cost] == ["300", "1000"]
    assert cost[0][1:7] == ["1.00", "0.50/0.25/0.25", "0.20", "3.33", "3.33", "38,000"]
    assert cost[0][7:9] == ["160", "140"]


def _state(pid: int) -> str:
    """A process's state letter (``Z``: a zombie), or ``gone``."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


IGNORES_SIGTERM = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
print(child.pid, flush=True)
time.sleep(30)
"""


def test_a_process_that_ignores_sigterm_is_killed_with_its_group() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", IGNORES_SIGTERM],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    child = int(process.stdout.readline())
    started = time.monotonic()
    bench._stop(process, timeout=0.3)
    assert process.returncode == -signal.SIGKILL and time.monotonic() - started < 5
    deadline = time.monotonic() + 5
    while _state(child) not in ("Z", "gone") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _state(child) in ("Z", "gone")  # its parent is gone: init reaps it
    process.stdout.close()


def test_bots_that_do_not_finish_are_stopped_not_waited_for(tmp_path: Path) -> None:
    bots = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    summary, why = bench._bots_summary(bots, 0.3, tmp_path / "bots.log")
    assert summary is None and why is not None and "no summary within 0.3 s" in why
    assert bots.returncode is not None


def test_bots_that_print_no_json_are_reported(tmp_path: Path) -> None:
    (tmp_path / "bots.log").write_text("compiling...\ncc: error: no such file\n")
    bots = subprocess.Popen(
        [sys.executable, "-c", "print('not json'); raise SystemExit(1)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    summary, why = bench._bots_summary(bots, 10.0, tmp_path / "bots.log")
    assert summary is None
    assert why == "the bots printed no summary (code 1): compiling... | cc: error: no such file"
