"""Failover: a failed worker is replaced within the tick it failed in (a trio shell).

A worker has failed when its process exits, its socket closes, it sends a
frame that does not decode, or it misses the step deadline. Its slot gets a
new process (a warm spare when one is ready) that loads the slot's share of
the last checkpoint and replays the steps since (:meth:`Pipeline.recovery
<meshd.mesh.tick.Pipeline.recovery>`), then answers the step in flight: the
tick is delayed, never lost. A slot past its restart budget has its
partitions quarantined and the tick commits without them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import trio

from meshd.mesh.messages import Reply, Step
from meshd.mesh.supervisor import RestartBudgetExceeded, WorkerFailed, WorkerLink

if TYPE_CHECKING:
    from meshd.mesh.core import Core


@attrs.define
class Failover:
    """One worker replacement, for ``inspect`` and ``bench failover``."""

    worker: int
    tick: int
    epoch: int
    replaced_at: float
    committed_at: float | None = None


async def exchange(
    link: WorkerLink, step: Step, deadline: float, sent: Callable[[int], None] | None = None
) -> Reply:
    step.epoch = link.epoch
    with trio.move_on_after(deadline):
        await link.send(step)
        if sent is not None:
            sent(link.worker)
        return await link.receive_reply(step.tick)
    raise WorkerFailed(link.worker, f"missed the {deadline:g} s deadline for tick {step.tick}")


async def run_step(
    core: Core, worker: int, step: Step, replies: dict[int, Reply], sent: Callable[[int], None]
) -> None:
    """Get ``worker``'s reply to ``step``, replacing the worker as often as it fails.

    ``sent(worker)`` is called when the step is on its way, or has failed.
    When the slot's restart budget is spent, its partitions are quarantined
    (see :meth:`Replication.take_down`) and the tick commits without them.
    """
    link = core.supervisor.links[worker]
    while True:
        try:
            replies[worker] = await exchange(link, step, core.step_deadline(), sent)
            return
        except WorkerFailed as failure:
            sent(worker)  # a failover takes a while: views need not wait for it
            core.log.warning("worker failed", worker=worker, tick=step.tick, reason=failure.reason)
        try:
            link = await replace(core, worker, step.tick)
        except RestartBudgetExceeded as exhausted:
            partitions = core.replication.take_down(worker)
            core.log.error(
                "partitions quarantined: their worker keeps dying; the rest of the world "
                "ticks on, restart meshd to retry them",
                worker=worker,
                tick=step.tick,
                reason=exhausted.reason,
                partitions=partitions,
            )
            return


async def replace(core: Core, worker: int, tick: int) -> WorkerLink:
    """Start a replacement that is exactly where the failed worker was before ``tick``.

    It gets the failed worker's share of the last checkpoint, then replays
    the steps the failed worker received since: the tick is delayed, never
    lost. Raises :class:`RestartBudgetExceeded` when the slot keeps failing.
    """
    deadline = core.step_deadline()
    while True:
        core.failovers += 1
        started = time.perf_counter()
        try:
            link = await core.supervisor.replace(worker)
            recovery = core.pipeline.recovery(worker)
            await link.send(recovery.restore)
            for missed in recovery.replay:
                await exchange(link, missed, deadline * 2)
        except RestartBudgetExceeded:
            raise
        except WorkerFailed as failure:
            core.log.warning("replacement failed", worker=worker, reason=failure.reason)
            continue
        if link.code != core.replication.code and core.plugin_errors.first(("code", link.code)):
            core.log.warning(
                "the replacement worker loaded plugin code that differs from the world's (the "
                "files changed since start or the last reload): `meshd reload` runs it everywhere",
                worker=worker,
            )
        core.failover_log.append(Failover(worker, tick, link.epoch, time.monotonic()))
        core.log.info(
            "worker replaced",
            worker=worker,
            tick=tick,
            epoch=link.epoch,
            replayed=len(recovery.replay),
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return link
