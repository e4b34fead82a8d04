"""Shared helpers: run the real ``meshd`` command against throwaway data folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from meshd.common.config import load_config
from meshd.ops import admin
from meshd.ops.cli import _bytes_as_hex
from meshd.ops.serve import SOCKET_NAME
from meshd.store.offline import offline_world

REPO = Path(__file__).resolve().parent.parent
PLUGINS = REPO / "plugins"

TAVERN = {
    "world": {"size": 160.0, "halo": 5.0},
    "plugins": {
        "load": ["tavern"],
        "tavern": {"npcs": 300, "throw_chance": 0.05, "drop_chance": 0.01},
    },
}
SPACE = {
    "world": {"size": 2000.0, "halo": 320.0},
    "mesh": {"grid": 8},
    "plugins": {"load": ["space"], "space": {"ships": 80, "fire_chance": 0.05}},
}


def _toml_value(value: Any) -> str:
    return json.dumps(value)  # JSON scalars and lists are valid TOML values


def write_config(folder: Path, world: dict[str, Any], name: str = "meshd.toml") -> Path:
    """Write a meshd.toml from nested dicts; data goes to ``folder/data``."""
    sections = {key: dict(value) for key, value in world.items()}
    sections.setdefault("data", {}).setdefault("dir", str(folder / "data"))
    sections.setdefault("plugins", {}).setdefault("dirs", [str(PLUGINS)])
    gateway = sections.setdefault("gateway", {})
    gateway.setdefault("listen", "127.0.0.1:0")  # any free port
    # Logins cheap, short secrets allowed, and every bot from this one host welcome: tests
    # log in a lot (the defaults are tested on their own, from several loopback addresses).
    gateway.setdefault("hash_cost", 10)
    gateway.setdefault("min_secret", 1)
    gateway.setdefault("max_pending_per_address", 256)
    gateway.setdefault("max_players_per_address", 4000)
    lines = []
    for section, table in sections.items():
        nested = {k: v for k, v in table.items() if isinstance(v, dict)}
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if k not in nested]
        for sub, subtable in nested.items():
            lines.append(f"[{section}.{sub}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in subtable.items()]
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def meshd(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``python -m meshd ARGS`` to completion."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHD_")}
    result = subprocess.run(
        [sys.executable, "-m", "meshd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"meshd {' '.join(args)} exited {result.returncode}\n{result.stderr[-4000:]}"
        )
    return result


def meshd_json(*args: str, timeout: float = 120) -> Any:
    return json.loads(meshd(*args, "--json", timeout=timeout).stdout)


def run_world(
    folder: Path, world: dict[str, Any], *args: str, timeout: float = 120
) -> dict[str, Any]:
    """Serve ``world`` in ``folder`` at full speed with seed 7; return its world view and hash."""
    folder.mkdir(parents=True, exist_ok=True)
    config = write_config(folder, world)
    meshd("serve", "--config", str(config), "--rate", "0", "--seed", "7", *args, timeout=timeout)
    return stored_world(config, with_hash=True)


def start_daemon(config: Path, *extra: str, log: Path | None = None) -> subprocess.Popen[str]:
    """``meshd serve`` on ``config`` in the background; its log in ``stderr``, or in the file
    ``log`` (to read while it runs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHD_")}
    return subprocess.Popen(
        [sys.executable, "-m", "meshd", "serve", "--config", str(config), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE if log is None else log.open("w"),
        text=True,
        env=env,
    )


def admin_socket(config: Path) -> Path:
    """The admin socket of the daemon serving ``config`` (where ``meshd inspect`` asks)."""
    return load_config(config, search_default=False, environ={}).data_dir / SOCKET_NAME


def inspect(config: Path, view: str, *, timeout: float = 60, **fields: Any) -> Any:
    """What ``meshd inspect VIEW --config CONFIG --json`` prints while a daemon runs.

    Asked on the daemon's admin socket from this process, as the command does
    from its own: the same request, answer and JSON, without starting a Python
    process that imports all of meshd (about a second each, more on a busy
    machine). The command itself is tested in test_serve.py.
    """
    answer = admin.request(admin_socket(config), admin.AdminRequest(view, **fields), timeout)
    return _as_printed(answer)


def stored_world(config: Path, with_hash: bool = False) -> Any:
    """What ``meshd inspect world [--hash] --config CONFIG --json`` prints once no daemon runs.

    Read from the database by the function the command calls then, in this
    process (the command itself is tested in test_serve.py).
    """
    return _as_printed(offline_world(admin_socket(config).parent, with_hash))


def _as_printed(value: Any) -> Any:
    """``value`` as the ``--json`` output of ``meshd inspect`` has it (bytes as hex)."""
    return json.loads(json.dumps(value, default=_bytes_as_hex))


def wait_for_status(
    config: Path,
    predicate=lambda s: s["tick"] > 0,
    timeout: float = 60,
    daemon: subprocess.Popen[str] | None = None,
) -> Any:
    """Poll the daemon's status until ``predicate`` holds (while ``daemon`` runs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon is not None and daemon.poll() is not None:
            raise AssertionError(f"the daemon exited early:\n{daemon.stderr.read()[-3000:]}")
        try:
            status = inspect(config, "status", timeout=10)
        except (admin.AdminError, OSError):
            pass  # not listening yet (or going away): as 'meshd inspect status' failing
        else:
            if predicate(status):
                return status
        time.sleep(0.05)
    raise AssertionError("the daemon never reached the expected status")


def terminate(config: Path, daemon: subprocess.Popen[str], timeout: float = 30) -> int:
    """SIGTERM ``daemon`` once it has a spare worker ready; its exit status.

    meshd exits 1 if SIGTERM comes while a spare is still starting (at start-up,
    and after each failover or worker start): its stop kills the starting spare,
    and the task waiting for it fails the whole serve. Tests whose subject is
    not that wait until the spare is up, which a slow 'meshd inspect' used to
    give them by chance.
    """
    wait_for_status(config, lambda s: s["spares"], daemon=daemon)
    daemon.send_signal(signal.SIGTERM)
    return daemon.wait(timeout=timeout)


def process_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (exited, or a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in status)
    except FileNotFoundError:
        return True


def wait_gone(pids: list[int], timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if not process_gone(pid)]
        time.sleep(0.05)
    return alive


@pytest.fixture
def tavern_config(tmp_path: Path) -> Path:
    return write_config(tmp_path, TAVERN)
