"""The journal of the world's inputs: what is recorded reads back in order, and a journal
that cannot be written stops alone (the tick loop keeps recording without an error)."""

from __future__ import annotations

import stat
from pathlib import Path

import trio
from structlog.testing import capture_logs

from meshd.players.journal import Journal, read


async def _record(journal: Journal, ticks: int) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(journal.run)
        for tick in range(1, ticks + 1):
            entities = [[tick, "player", 1.0, 2.0, 0.0, ["ada"]]] if tick == 2 else []
            journal.record(tick, entities, [[tick, 0, 0, "input:move", {"dx": 1.0}]])
            journal.record(tick, [], [])  # nothing taken: nothing written
            await trio.sleep(0)
        journal.close()


def test_entries_read_back_in_order(tmp_path: Path) -> None:
    path = tmp_path / "journal.cbor"
    trio.run(_record, Journal(path), 5)
    entries = list(read(path))
    assert [tick for tick, _, _ in entries] == [1, 2, 3, 4, 5]
    assert entries[1][1] == [[2, "player", 1.0, 2.0, 0.0, ["ada"]]]
    assert entries[4][2] == [[5, 0, 0, "input:move", {"dx": 1.0}]]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_unwritable_journal_stops_alone(tmp_path: Path) -> None:
    path = tmp_path / "missing-folder" / "journal.cbor"
    with capture_logs() as logs:
        trio.run(_record, Journal(path), 5)  # no exception reaches the recorder
    assert not path.exists()
    assert [log["event"] for log in logs] == ["cannot append to the journal; it stops here"]
