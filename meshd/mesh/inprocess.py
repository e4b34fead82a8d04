"""An in-process mesh: the real tick pipeline driving WorkerSim objects directly (pure).

The daemon's tick loop and this mesh drive the same
:class:`~meshd.mesh.tick.Pipeline` (which ticks are checkpoints, the steps,
what a replacement replays, the commit, reshaping); here the messages go
through the real codec but no socket, in microseconds per entity. It is the
engine of :mod:`meshd.testing` (plugin authors' tests), of ``meshd check``
and of meshd's own tests that need many layouts or many ticks.
"""

from __future__ import annotations

import hashlib
from typing import Any

import cbor2

from meshd.common.wire import decode_message, encode_message
from meshd.mesh.layout import Layout
from meshd.mesh.messages import Reply, Restore, Step, WorldParams
from meshd.mesh.planner import Planner
from meshd.mesh.plugins import PluginSet
from meshd.mesh.replication import CommitReport, Replication
from meshd.mesh.step import WorkerSim, create_world
from meshd.mesh.tick import Pipeline
from meshd.store.codec import WorldSnapshot

NEVER = 1 << 62
"""Checkpoints only when the caller asks for one."""


def new_world(plugins: PluginSet, world: WorldParams) -> WorldSnapshot:
    """The world the plugins' ``create_world`` hooks make, as tick 0."""
    records = create_world(plugins, world)
    return WorldSnapshot(
        tick=0, seed=world.seed, next_id=len(records) + 1, records=records, events=[]
    )


class InProcessMesh:
    """A whole mesh in one process: a :class:`Replication` and one :class:`WorkerSim` per worker."""

    def __init__(
        self,
        plugins: PluginSet,
        world: WorldParams,
        layout: Layout,
        snapshot: WorldSnapshot,
        *,
        through_wire: bool = True,
        quarantine_after: int = 10,
        planner: Planner | None = None,
    ) -> None:
        self.replication = Replication(
            plugins, world, layout, snapshot, quarantine_after=quarantine_after
        )
        self.pipeline = Pipeline(
            self.replication, checkpoint_every=NEVER, persist_every=NEVER, planner=planner
        )
        self.sims = {w: WorkerSim(w, 1, plugins, world) for w in layout.workers}
        self.through_wire = through_wire

    def _roundtrip(self, message: Any, cls: type) -> Any:
        if not self.through_wire:
            return message
        return decode_message(encode_message(message), (cls,))

    def tick(
        self,
        checkpoint: bool = False,
        kill: frozenset[int] = frozenset(),
        inputs: tuple[list[list[Any]], list[list[Any]]] = ([], []),
    ) -> CommitReport:
        """One tick; workers in ``kill`` crash mid-step and are replaced.

        ``inputs``: (new entities, input events) for this tick, as the
        daemon's gateways give them (a journal entry).
        """
        plan = self.pipeline.next(checkpoint=checkpoint)
        entities, events = inputs
        for record in entities:
            self.replication.add_entity(record)
        self.replication.inject(events)
        replies = []
        for worker, step in self.pipeline.steps(plan).items():
            if worker in kill:
                self.sims[worker].step(self._roundtrip(step, Step))  # work lost in the crash
                self.replace(worker)
            replies.append(
                self._roundtrip(self.sims[worker].step(self._roundtrip(step, Step)), Reply)
            )
        return self.pipeline.commit(plan, replies)

    def replace(self, worker: int) -> None:
        """What the core does for a failed worker: restore the checkpoint, replay the log."""
        old = self.sims[worker]
        sim = self.sims[worker] = WorkerSim(worker, old.epoch + 1, old.plugins, old.world)
        recovery = self.pipeline.recovery(worker)
        sim.restore(self._roundtrip(recovery.restore, Restore))
        for step in recovery.replay:
            sim.step(self._roundtrip(step, Step))

    def replan(self) -> bool:
        """What the core does after a checkpoint commit: ask the planner, apply its plan."""
        plan = self.pipeline.replan(can_start=True)
        if plan is not None:
            self.relayout(
                Layout(self.replication.world.size, self.replication.world.halo, plan.owners)
            )
        return plan is not None

    def relayout(self, layout: Layout) -> int:
        """What the core does to apply a plan after a checkpoint commit."""
        moved = self.pipeline.reshape(layout.owners)
        any_sim = next(iter(self.sims.values()))
        for worker in layout.workers:
            if worker not in self.sims:
                self.sims[worker] = WorkerSim(worker, 1, any_sim.plugins, any_sim.world)
        for worker in set(self.sims) - set(layout.workers):
            del self.sims[worker]
        return moved

    def run(self, ticks: int, persist_every: int = 10) -> list[CommitReport]:
        """``ticks`` ticks, a checkpoint every ``persist_every`` and on the last one."""
        reports = []
        for i in range(ticks):
            last = i == ticks - 1
            reports.append(
                self.tick(checkpoint=last or (self.replication.tick + 1) % persist_every == 0)
            )
        return reports

    def records(self) -> dict[int, list[Any]]:
        """Every entity as of the last commit, by id: what the workers hold, exact on any tick.

        (The replication's own records are exact only at a checkpoint.) An
        entity handed from one worker to another is on its way in the core's
        outbox: its record is taken from there.
        """
        found: dict[int, list[Any]] = {}
        for worker, sim in self.sims.items():
            box = self.replication.outboxes[worker]
            leaving = set(box.release)
            for entity_id, entity in sim.entities.items():
                if entity_id not in leaving:
                    found[entity_id] = sim.record(entity)
            for record, _targets in box.acquire:
                found[record[0]] = list(record)
        return found


def records_digest(
    records: dict[int, list[Any]], world: dict[str, dict[str, Any]] | None = None
) -> str:
    """SHA-256 of every entity's ``[id, kind, x, y, z, state]``, in id order, and of the
    plugins' world state (if any)."""
    digest = hashlib.sha256()
    for entity_id in sorted(records):
        digest.update(cbor2.dumps(records[entity_id], canonical=True))
    if world:
        digest.update(cbor2.dumps(world, canonical=True))
    return digest.hexdigest()
