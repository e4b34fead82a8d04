"""The native bots: ``_loadgen.c``, built on first use, run as a separate process.

The Python bots (:mod:`meshd._bots`) spend about 0.2 ms of CPU on each
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
import subprocess
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("_loadgen.c")


class LoadgenError(Exception):
    """The native bots could not be built or run; the message says why."""


def executable() -> Path:
    """The compiled generator, built once per version of its source into the user's cache.

    Raises :class:`LoadgenError` when there is no C compiler or the build fails.
    """
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "meshd"
    target = cache / f"loadgen-{digest}"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise LoadgenError("the native bots need a C compiler (cc); use --engine python")
    cache.mkdir(parents=True, exist_ok=True)
    building = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    built = subprocess.run(
        [compiler, "-O2", "-o", str(building), str(SOURCE), "-lm"],
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        raise LoadgenError(f"building the native bots failed:\n{built.stderr.strip()}")
    os.replace(building, target)  # atomic: a concurrent build never runs half a file
    return target


def run_native(
    host: str,
    port: int,
    count: int,
    duration: float,
    scenario: str,
    target: tuple[float, float],
    name_prefix: str = "bot",
) -> dict[str, Any]:
    """Run ``count`` native bots for ``duration`` seconds; their ``meshd bots`` summary."""
    try:
        address = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except OSError as exc:
        raise LoadgenError(f"cannot resolve {host!r} to an IPv4 address: {exc}") from None
    args = [address, port, count, duration, scenario, target[0], target[1], name_prefix]
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
