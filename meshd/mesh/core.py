"""The core's tick loop: a trio shell around the tick pipeline (:mod:`meshd.mesh.tick`).

The tick loop is the one serial path of the system: build steps, send them
(failed workers are replaced in :mod:`meshd.mesh.failover`), wait for every
reply, commit, then at checkpoints persist, apply operators' releases and
the planner's plans. Everything else (persistence, admin requests, signals)
runs beside it in the same nursery (composed by :func:`meshd.ops.serve.serve`)
and never makes it wait on disk.

It is long because what one tick does reads best in one place, in the order
it happens.
"""

from __future__ import annotations

import contextlib
import gc
import signal
import time
from collections import deque
from typing import Any, Protocol

import attrs
import trio

from meshd.common.config import Config
from meshd.common.log import OncePer, error_site, get_logger
from meshd.mesh.failover import Failover, run_step
from meshd.mesh.layout import sorted_leaves
from meshd.mesh.messages import Reply
from meshd.mesh.plugins import PluginSet
from meshd.mesh.reload import Reload, apply_reloads
from meshd.mesh.replication import CommitReport
from meshd.mesh.step import collect_between_ticks
from meshd.mesh.supervisor import Supervisor, WorkerFailed
from meshd.mesh.tick import Pipeline
from meshd.mesh.usage import Sample, Usage, percentile
from meshd.store.codec import Delta
from meshd.store.db import Store

Schema = dict[str, tuple[str, ...]]
"""Each kind's state field names (:meth:`PluginSet.schema`): how a delta's states are stored."""
PERSIST_RETRY_MAX = 5.0
STARTUP_DEADLINE = 10.0


@attrs.define
class RunSummary:
    """What one ``serve()`` run did; benchmarks read it."""

    first_tick: int
    last_tick: int
    loop_seconds: float
    entity_ticks: int
    tick_ms: list[float]
    workers: int
    hash: str
    usage: dict[str, Any] = attrs.field(factory=dict)
    timeline: list[Sample] = attrs.field(factory=list)


class Players(Protocol):
    """What the tick loop asks of whatever serves players (the gateway, in ``players``)."""

    def before_tick(self, tick: int) -> None:
        """Inputs and new players into the world, before ``tick``'s steps are built."""

    def send_views(self) -> None:
        """Views of the last committed tick, while the workers simulate the next."""

    def inputs_failed(self, failures: list[tuple[int, int, str, str]]) -> None:
        """The inputs of the tick just committed that failed in the plugin."""

    def deliver(self, messages: list[list[Any]]) -> None:
        """The plugins' messages for players of the tick just committed (``Context.tell``)."""

    def after_tick(self, tick: int) -> None:
        """``tick`` is committed: where to watch next, whether a view is due."""

    def take_claims(self) -> list[tuple[str, int]]:
        """Players' new entities to write with the next persisted tick."""
        ...

    def status(self) -> dict[str, Any]:
        """What ``inspect status`` shows of the players."""
        ...

    def gateways_view(self) -> list[dict[str, Any]]:
        """What ``inspect gateways`` shows: one row per gateway process."""
        ...


@attrs.define(eq=False)
class Release:
    """An operator's request to run quarantined entities or partitions again.

    Applied by the tick loop at the next checkpoint boundary; ``done`` fires
    with ``result`` (what was released) set.
    """

    entities: list[int]
    all_entities: bool
    partitions: bool
    peer: dict[str, int]
    """Who asked: the admin connection's ``pid`` and ``uid``."""
    done: trio.Event = attrs.field(factory=trio.Event)
    result: dict[str, Any] = attrs.field(factory=dict)


class Core:
    """The running daemon's state, shared by the tick loop and the admin views."""

    def __init__(
        self,
        config: Config,
        plugins: PluginSet,
        pipeline: Pipeline,
        supervisor: Supervisor,
        store: Store,
        store_lock: trio.CapacityLimiter,
        gateway: Players | None = None,
    ) -> None:
        self.config = config
        self.pipeline = pipeline
        self.planner = pipeline.planner
        self.gateway = gateway
        self.usage = Usage(config.mesh.mode)
        self.plugins = plugins
        self.replication = replication = pipeline.replication
        self.supervisor = supervisor
        self.store = store
        self.store_lock = store_lock
        """One thread at a time on the database connection (ticks and accounts)."""
        self.started = time.monotonic()
        self.tick_ms: deque[float] = deque(maxlen=2000)
        self.tick_times: deque[float] = deque(maxlen=200)
        self.tick_intervals_ms: deque[float] = deque(maxlen=2000)
        """Wall time between consecutive tick starts: what players feel."""
        self.failovers = 0
        self.persisted_tick = replication.tick
        self.persist_failures = 0
        self.stop_requested = False
        self.hash_waiters: list[trio.MemorySendChannel[tuple[int, str]]] = []
        self.releases: list[Release] = []
        self.reloads: list[Reload] = []
        """New plugin code with its workers started, for the next checkpoint boundary."""
        self.reloading = False
        """A reload is under way: the planner keeps the mesh's shape meanwhile."""
        self.failover_log: deque[Failover] = deque(maxlen=1000)
        self.plugin_errors = OncePer()
        self._deadline: float | None = None
        self._deadline_at = -1
        self.log = get_logger(component="core")

    def step_deadline(self) -> float:
        """Seconds a worker may take for one step before it counts as hung.

        ``mesh.step_deadline``, or four times the recent p99 tick time if that
        is longer, so a heavy world is not mistaken for a hung one; generous
        while there is no history yet.
        """
        floor = self.config.mesh.step_deadline
        if len(self.tick_ms) < 20:
            return max(floor, STARTUP_DEADLINE)
        if self._deadline_at != len(self.tick_ms) // 20 or self._deadline is None:
            self._deadline_at = len(self.tick_ms) // 20
            self._deadline = max(floor, 4 * percentile(list(self.tick_ms)[-200:], 99) / 1000)
        return self._deadline

    def rate_hz(self) -> float:
        times = self.tick_times
        if len(times) < 2 or times[-1] == times[0]:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])


async def persist_loop(core: Core, deltas: trio.MemoryReceiveChannel[tuple[Delta, Schema]]) -> None:
    """The only writer: one whole tick per transaction, retried until it lands.

    Each delta comes with the state fields it was taken with (a reload may change them).
    """
    async with deltas:
        async for delta, schema in deltas:
            backoff = 0.1
            while True:
                try:
                    await trio.to_thread.run_sync(
                        core.store.write, delta, schema, limiter=core.store_lock
                    )
                    break
                except Exception as exc:
                    core.persist_failures += 1
                    core.log.error(
                        "persist failed, retrying",
                        tick=delta.tick,
                        error=str(exc),
                        retry_in=backoff,
                    )
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, PERSIST_RETRY_MAX)
            core.persisted_tick = delta.tick


async def watch_signals(core: Core) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            core.log.info("stop requested", signal=signal.Signals(signum).name)
            if core.stop_requested:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            core.stop_requested = True


async def tick_loop(
    core: Core, ticks: int | None, persist: trio.MemorySendChannel[tuple[Delta, Schema]]
) -> RunSummary:
    repl, pipeline, links = core.replication, core.pipeline, core.supervisor.links
    rate = core.config.tick.rate
    first_tick = repl.tick + 1
    entity_ticks = 0
    tick_ms: list[float] = []
    loop_started = time.perf_counter()
    started: float | None = None
    next_at = trio.current_time()
    # What start-up made lives as long as the core: full collections skip it.
    gc.freeze()
    gc.disable()
    try:
        while ticks is None or repl.tick < first_tick - 1 + ticks:
            last = ticks is not None and repl.tick + 1 == first_tick - 1 + ticks
            plan = pipeline.next(
                final=core.stop_requested or last,
                checkpoint=bool(core.hash_waiters or core.releases or core.reloads),
            )
            tick, checkpoint, final = plan.tick, plan.checkpoint, plan.final
            previous, started = started, time.perf_counter()
            if previous is not None:
                core.tick_intervals_ms.append((started - previous) * 1000.0)
            if core.gateway is not None:
                core.gateway.before_tick(tick)
            steps = pipeline.steps(plan)
            replies: dict[int, Reply] = {}
            async with trio.open_nursery() as nursery:
                sent = _StepsSent(set(steps))
                for worker, step in steps.items():
                    nursery.start_soon(run_step, core, worker, step, replies, sent.sent)
                if core.gateway is not None:
                    # Views of the last tick while the workers simulate this one.
                    await sent.done.wait()
                    core.gateway.send_views()
            report = pipeline.commit(plan, replies.values())
            _log_failures(core, tick, report)
            if core.gateway is not None:
                core.gateway.inputs_failed(report.input_errors)
                core.gateway.deliver(report.messages)
                core.gateway.after_tick(tick)
            for failover in reversed(core.failover_log):
                if failover.committed_at is not None:
                    break
                failover.committed_at = time.monotonic()
            elapsed = (time.perf_counter() - started) * 1000.0
            core.tick_ms.append(elapsed)
            tick_ms.append(elapsed)
            core.tick_times.append(time.monotonic())
            core.usage.tick(
                time.monotonic(),
                tick,
                len(links),
                len(repl.layout.owners),
                elapsed,
                sum(reply.cpu_ms for reply in replies.values()),
                report.handoffs,
            )
            entity_ticks += len(repl.owner)
            if checkpoint:
                await _checkpoint(core, persist, final, plan.persist)
                await _release(core, stopping=final)
                await apply_reloads(core, stopping=final)
            if final:
                break
            if checkpoint:
                await _replan(core)
            # Garbage from this tick is collected now, while the loop would sleep anyway.
            collect_between_ticks(tick)
            if rate > 0:
                next_at = max(next_at + 1.0 / rate, trio.current_time() - 1.0 / rate)
                await trio.sleep_until(next_at)
            else:
                await trio.lowlevel.checkpoint()
    finally:
        gc.enable()
    return RunSummary(
        first_tick=first_tick,
        last_tick=repl.tick,
        loop_seconds=time.perf_counter() - loop_started,
        entity_ticks=entity_ticks,
        tick_ms=tick_ms,
        workers=len(links),
        hash="",
        usage=core.usage.report(time.process_time()),
        timeline=list(core.usage.timeline),
    )


async def _release(core: Core, *, stopping: bool) -> None:
    """Apply operators' releases at this checkpoint boundary (the core holds all of ``S(T)``).

    Entities are unfrozen with the next step. A quarantined worker slot gets
    a new process (its restart budget starts over) that starts from the
    world as it is now; if none can be started, the slot stays down.
    """
    repl, requests, core.releases = core.replication, core.releases, []
    for request in requests:
        if stopping:
            request.result = {"error": "the daemon is stopping; nothing was released"}
            request.done.set()
            continue
        wanted = sorted(repl.quarantined) if request.all_entities else request.entities
        entities = repl.release_entities(wanted)
        partitions: list[str] = []
        failed: list[str] = []
        for worker in sorted(repl.down) if request.partitions else ():
            leaves = sorted_leaves(repl.layout.leaves_of(worker))
            restore = repl.bring_up(worker)
            try:
                link = await core.supervisor.revive(worker)
            except WorkerFailed as failure:
                repl.take_down(worker)
                failed.append(f"worker {worker}: {failure.reason}")
                continue
            # A send that fails is an ordinary failover at the next step (from this checkpoint).
            with contextlib.suppress(WorkerFailed):
                await link.send(restore)
            partitions.extend(leaves)
        request.result = {"entities": entities, "partitions": partitions}
        if failed:
            request.result["failed"] = failed
        core.log.warning(
            "operator released quarantined entities and partitions",
            tick=repl.tick,
            entities=entities,
            partitions=partitions,
            failed=failed or None,
            **request.peer,
        )
        request.done.set()


def _log_failures(core: Core, tick: int, report: CommitReport) -> None:
    """Quarantines, and each distinct plugin error once (``plugin_errors`` counts them all)."""
    repl = core.replication
    for entity_id in report.quarantined:
        core.log.error(
            "entity quarantined: its systems keep failing; fix the plugin, then "
            "`meshd release --entity ID` (or restart)",
            tick=tick,
            entity=entity_id,
            ticks=repl.quarantine_after,
        )
    for worker, entity_id, where, text in report.errors:
        kind = repl.records[entity_id][1]
        if core.plugin_errors.first((kind, *error_site(where, text))):
            core.log.warning(
                "plugin error, entity kept its previous state (logged once per place; "
                "inspect status counts plugin_errors)",
                tick=tick,
                entity=entity_id,
                kind=kind,
                where=where or None,
                error=text,
                worker=worker,
            )
    for sender, event, where, text in report.world_errors:
        if core.plugin_errors.first(("world", event, *error_site(where, text))):
            core.log.warning(
                "world event failed and was skipped (logged once per place)",
                tick=tick,
                entity=sender,
                world_event=event,
                where=where or None,
                error=text,
            )
    for what, where in report.hazards:
        if core.plugin_errors.first(("hazard", what, where)):
            core.log.warning(
                "plugin code that breaks determinism (mesh.strict; logged once per place; "
                "meshd check shows what it changes)",
                tick=tick,
                what=what,
                where=where,
            )


async def _replan(core: Core) -> None:
    """Ask the planner about the layout; apply its plan at this tick boundary.

    Runs right after a checkpoint commit, when the core holds all of
    ``S(T)``: new workers come from warm spares, the difference between the
    layouts goes out with the next steps (a bulk handoff), drained workers
    are stopped.
    """
    repl, supervisor = core.replication, core.supervisor
    if core.reloading:
        return
    plan = core.pipeline.replan(can_start=bool(supervisor.spares))
    if plan is None:
        return
    started = time.perf_counter()
    for worker in plan.started:
        await supervisor.add_worker(worker)
    handoffs = core.pipeline.reshape(plan.owners)
    for worker in plan.stopped:
        await supervisor.retire(worker)
    core.usage.plan(plan, handoffs)
    core.log.info(
        "mesh reshaped",
        tick=repl.tick,
        split=plan.splits,
        merged=plan.merges,
        moved=len(plan.moves),
        started=plan.started,
        stopped=plan.stopped,
        handoffs=handoffs,
        workers=len(repl.layout.workers),
        leaves=len(repl.layout.owners),
        ms=round((time.perf_counter() - started) * 1000, 1),
    )


@attrs.define
class _StepsSent:
    """Fires ``done`` once every worker's step is on its way (or its worker has failed)."""

    waiting: set[int]
    done: trio.Event = attrs.field(factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        if not self.waiting:
            self.done.set()

    def sent(self, worker: int) -> None:
        self.waiting.discard(worker)
        if not self.waiting:
            self.done.set()


async def _checkpoint(
    core: Core,
    persist: trio.MemorySendChannel[tuple[Delta, Schema]],
    final: bool,
    persist_now: bool,
) -> None:
    """The core holds all of ``S(T)``: answer hash requests, maybe hand the writer a delta."""
    repl = core.replication
    if core.hash_waiters:
        answer = (repl.tick, repl.hash())
        for waiter in core.hash_waiters:
            waiter.send_nowait(answer)
        core.hash_waiters.clear()
    if final:
        await persist.send(_delta(core))
    elif persist_now and persist.statistics().tasks_waiting_receive:
        # The writer is idle: hand it this tick. Otherwise keep accumulating;
        # the next checkpoint's delta will carry these changes too.
        persist.send_nowait(_delta(core))


def _delta(core: Core) -> tuple[Delta, Schema]:
    """The changes to write (the world's since the last delta, and new player claims),
    with the plugins' state fields they are in."""
    delta = core.replication.take_delta()
    if core.gateway is not None:
        delta.players = core.gateway.take_claims()
    return delta, core.plugins.schema()
