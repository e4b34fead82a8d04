"""The native bots: ``loadgen.c``, built on first use, run as a separate process.

The Python bots (:mod:`meshd.ops.bots`) spend about 0.2 ms of CPU on each
64-entity view (receiving, decoding, applying it); a thousand of them at 20
views a second would need about four cores just to read, so on a small
machine a load test with them measures the bots. The C generator plays the
same scenarios over the same protocol for a fraction of that and prints the
same summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("loadgen.c")


class LoadgenError(Exception):
    """The native bots could not be built or run; the message says why."""


def executable() -> Path:
    """The compiled generator, built once per version of its source into the user's cache.

    The cache folder is made private (0700) and the program is run only if
    it is ours, not writable by others, and has the content recorded when
    we built it; anything else at that path is built again, never run.
    Raises :class:`LoadgenError` when there is no C compiler, the build
    fails, or the cache folder belongs to another user.
    """
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    cache = _private_cache()
    target = cache / f"loadgen-{digest}"
    recorded = target.with_name(f"{target.name}.sha256")
    if _trusted(target, recorded):
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise LoadgenError("the native bots need a C compiler (cc); use --engine python")
    building = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    built = subprocess.run(
        [compiler, "-O2", "-o", str(building), str(SOURCE), "-lm"],
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        raise LoadgenError(f"building the native bots failed:\n{built.stderr.strip()}")
    building.chmod(0o700)
    recorded.write_text(_sha256(building))
    os.replace(building, target)  # atomic: a concurrent build never runs half a file
    return target


def _private_cache() -> Path:
    """``$XDG_CACHE_HOME/meshd`` (or ``~/.cache/meshd``), 0700 and ours."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "meshd"
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    owner = cache.stat().st_uid
    if owner != os.geteuid():
        raise LoadgenError(
            f"the cache folder {cache} belongs to uid {owner}, not to you: "
            "set XDG_CACHE_HOME to a folder of your own"
        )
    cache.chmod(0o700)
    return cache


def _trusted(target: Path, recorded: Path) -> bool:
    """Whether ``target`` is the program we built: ours, 0700, with its recorded content."""
    try:
        info = target.stat()
        expected = recorded.read_text()
    except FileNotFoundError:
        return False
    return (
        info.st_uid == os.geteuid()
        and stat.S_IMODE(info.st_mode) == 0o700
        and recorded.stat().st_uid == os.geteuid()
        and _sha256(target) == expected
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_native(
    host: str,
    port: int,
    count: int,
    duration: float,
    scenario: str,
    target: tuple[float, float],
    name_prefix: str = "bot",
    reconnect_within: float = 5.0,
) -> dict[str, Any]:
    """Run ``count`` native bots for ``duration`` seconds; their ``meshd bots`` summary.

    ``reconnect_within``: seconds a bot tries to log in again after its
    connection broke without an ``Error``, as :func:`meshd.client.connect`'s
    (0: never). Raises :class:`LoadgenError` when the bots cannot be built
    or run.
    """
    try:
        address = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except OSError as exc:
        raise LoadgenError(f"cannot resolve {host!r} to an IPv4 address: {exc}") from None
    args = [
        address,
        port,
        count,
        duration,
        scenario,
        target[0],
        target[1],
        name_prefix,
        reconnect_within,
    ]
    finished = subprocess.run(
        [str(executable()), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=duration + 600,  # logins first, then the run
    )
    if finished.returncode != 0:
        raise LoadgenError(f"the native bots failed: {finished.stderr.strip()}")
    summary: dict[str, Any] = json.loads(finished.stdout)
    return summary
