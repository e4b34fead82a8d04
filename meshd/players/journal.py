"""The world's inputs, tick by tick, appended to ``journal.cbor`` (a trio shell).

With the seed and the plugins, the inputs a tick took (new players'
entities, then the input events in their order) are all the world depends
on: replaying a journal from the world's creation reaches the same world
hash, whatever processes died on the way (a test replays one written
across a gateway's ``kill -9``). ``data.journal = true`` turns it on. Each
entry is one CBOR array ``[tick, entities, events]``, written by a thread,
never by the tick loop.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import trio

from meshd.common.log import get_logger

JOURNAL_NAME = "journal.cbor"


class Journal:
    """Entries queued by the tick loop and appended in the background."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._send, self._receive = trio.open_memory_channel[bytes](float("inf"))

    def record(self, tick: int, entities: list[list[Any]], events: list[list[Any]]) -> None:
        """Queue what ``tick`` took from outside the simulation (nothing is queued for none)."""
        if entities or events:
            with contextlib.suppress(trio.BrokenResourceError):  # the journal stopped
                self._send.send_nowait(cbor2.dumps([tick, entities, events]))

    def close(self) -> None:
        """No more entries: :meth:`run` returns once what is queued is written."""
        self._send.close()

    async def run(self) -> None:
        """Append queued entries, a batch per thread call, until :meth:`close`."""
        async for entry in self._receive:
            batch = [entry]
            while True:
                try:
                    batch.append(self._receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            try:
                await trio.to_thread.run_sync(self._append, b"".join(batch))
            except OSError as exc:
                # A full disk ends the record, never the world: the rest is dropped.
                get_logger(component="journal").error(
                    "cannot append to the journal; it stops here",
                    path=str(self.path),
                    error=str(exc),
                )
                self._receive.close()
                return

    def _append(self, data: bytes) -> None:
        # 0600 like the database: it holds everything the players sent.
        with open(self.path, "ab", opener=_private) as journal:
            journal.write(data)


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def read(path: Path) -> Iterator[tuple[int, list[list[Any]], list[list[Any]]]]:
    """Every entry of a journal, in order: ``(tick, entities, events)``."""
    with open(path, "rb") as journal:
        data = journal.read()
    stream = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(stream)
    while stream.tell() < len(data):
        tick, entities, events = decoder.decode()
        yield tick, entities, events
