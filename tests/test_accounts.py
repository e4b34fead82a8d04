"""Accounts and files: per-account hashing, a private data folder, durable names, safe caches."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
from pathlib import Path

import pytest
import trio
from conftest import start_daemon, terminate, wait_for_status, write_config
from test_players import PLAYERS, gateway_of

from meshd import client
from meshd.ops import loadgen
from meshd.ops.serve import StartupError, make_private


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def log_in(config: Path, name: str, secret: str) -> int:
    async def main() -> int:
        async with await client.connect(*gateway_of(config), name, secret) as player:
            return player.entity

    return trio.run(main)


def accounts(config: Path) -> dict[str, tuple[str, int]]:
    """name -> (hashing parameters, entity) as stored."""
    with sqlite3.connect(config.parent / "data" / "world.db") as db:
        rows = db.execute("SELECT * FROM player").fetchall()
        columns = [column[0] for column in db.execute("SELECT * FROM player").description]
    found = [dict(zip(columns, row, strict=True)) for row in rows]
    return {row["name"]: (row.get("kdf", ""), row["entity"]) for row in found}


def serve_with_cost(tmp_path: Path, cost: int):
    config = write_config(
        tmp_path, {**PLAYERS, "gateway": {"hash_cost": cost, "listen": "127.0.0.1:0"}}
    )
    return config, start_daemon(config, "--rate", "30")


def stop(config: Path, daemon) -> None:
    assert terminate(config, daemon) == 0, daemon.stderr.read()


def test_changing_the_hash_cost_locks_nobody_out(tmp_path: Path) -> None:
    """Issue: the cost was not stored with the account, so a new cost refused every secret."""
    config, daemon = serve_with_cost(tmp_path, 10)
    try:
        ada = log_in(config, "ada", "lovelace")
    finally:
        stop(config, daemon)
    config, daemon = serve_with_cost(tmp_path, 11)
    try:
        assert log_in(config, "ada", "lovelace") == ada
        with pytest.raises(client.ServerError, match="auth"):
            log_in(config, "ada", "babbage")
    finally:
        stop(config, daemon)
    assert accounts(config)["ada"] == ("scrypt:2048:8:1", ada)  # rehashed at the good login


def test_a_welcomed_name_survives_a_crash_before_the_next_write(tmp_path: Path) -> None:
    """Issue: a name claimed just before a crash was lost with the tick batch."""
    config = write_config(tmp_path, {**PLAYERS, "tick": {"persist_every": 100_000}})
    daemon = start_daemon(config, "--rate", "30")
    try:
        log_in(config, "bea", "first")
        daemon.kill()  # SIGKILL: the world since the start is not written
        daemon.wait(timeout=10)
        assert accounts(config)["bea"] == ("scrypt:1024:8:1", 0)  # name held; no entity yet
        daemon = start_daemon(config, "--rate", "30")
        with pytest.raises(client.ServerError, match="auth"):
            log_in(config, "bea", "someone else")  # nobody else can take the name
        bea = log_in(config, "bea", "first")
        assert bea > 0
    finally:
        daemon.kill()
        daemon.wait(timeout=10)


def test_the_data_folder_and_everything_in_it_are_private(tmp_path: Path) -> None:
    """Issue: an existing data folder kept 0755 and world.db was created 0644."""
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    (data / "world.db").touch()
    (data / "world.db").chmod(0o644)  # left by an older meshd
    config = write_config(tmp_path, PLAYERS)
    daemon = start_daemon(config, "--rate", "30")
    try:
        wait_for_status(config, lambda s: s["tick"] > 0, daemon=daemon)
        assert mode(data) == 0o700
        files = sorted(path.name for path in data.iterdir())
        assert {"meshd.lock", "meshd.sock", "world.db", "world.db-wal"} <= set(files)
        assert {name: mode(data / name) for name in files} == dict.fromkeys(files, 0o600)
    finally:
        stop(config, daemon)


def test_a_data_folder_that_cannot_be_made_private_is_refused(tmp_path, monkeypatch) -> None:
    def refuse(self, _mode):
        raise PermissionError(1, "Operation not permitted", str(self))

    monkeypatch.setattr(Path, "chmod", refuse)
    with pytest.raises(StartupError) as refused:
        make_private(tmp_path / "data")
    assert str(refused.value) == (
        f"the data folder {tmp_path / 'data'} must be private to the user running meshd "
        f"(folder 0700, files 0600), and {tmp_path / 'data'} cannot be made so: "
        "Operation not permitted; choose another data.dir (or --data)"
    )


def test_the_native_bots_never_run_a_file_they_did_not_build(tmp_path, monkeypatch) -> None:
    """Issue: whatever sat at the predictable cache path was run without a check."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "meshd"
    cache.mkdir(mode=0o777)
    cache.chmod(0o777)  # a shared, writable cache folder
    digest = hashlib.sha256(loadgen.SOURCE.read_bytes()).hexdigest()[:16]
    planted = cache / f"loadgen-{digest}"
    planted.write_text("#!/bin/sh\ntouch owned\n")
    planted.chmod(0o755)
    built = loadgen.executable()
    assert mode(cache) == 0o700
    assert built.read_bytes() != b"#!/bin/sh\ntouch owned\n"
    assert built.read_bytes()[:4] == b"\x7fELF" and mode(built) == 0o700
    assert built.stat().st_uid == os.geteuid()
    assert loadgen.executable() == built  # the checked build is reused
    built.write_bytes(built.read_bytes() + b"tampered")
    again = loadgen.executable()  # a changed file is built anew, not run
    assert not again.read_bytes().endswith(b"tampered")
