"""An in-process mesh: Replication driving WorkerSim objects directly, no sockets.

Runs the exact pure pipeline the real processes run, in microseconds per
entity, for tests that need many layouts or many ticks.
"""

from __future__ import annotations

from pathlib import Path

from meshd.common.wire import CONVERTER, decode_message, encode_message
from meshd.mesh.layout import Layout
from meshd.mesh.messages import Reply, Restore, Step, WorldParams
from meshd.mesh.plugins import PluginSet, load_plugins
from meshd.mesh.replication import Replication
from meshd.mesh.step import WorkerSim, create_world
from meshd.store.codec import WorldSnapshot

PLUGIN_DIR = Path(__file__).resolve().parent.parent / "plugins"


def plugins_for(name: str, **settings) -> PluginSet:
    return load_plugins([name], [PLUGIN_DIR], {name: settings}, CONVERTER)


def new_world(plugins: PluginSet, world: WorldParams) -> WorldSnapshot:
    records = create_world(plugins, world)
    return WorldSnapshot(
        tick=0, seed=world.seed, next_id=len(records) + 1, records=records, events=[]
    )


class InProcessMesh:
    def __init__(
        self,
        plugins: PluginSet,
        world: WorldParams,
        layout: Layout,
        snapshot: WorldSnapshot,
        *,
        through_wire: bool = True,
        quarantine_after: int = 10,
    ) -> None:
        self.replication = Replication(
            plugins, world, layout, snapshot, quarantine_after=quarantine_after
        )
        self.sims = {w: WorkerSim(w, 1, plugins, world) for w in layout.workers}
        self.through_wire = through_wire

    def _roundtrip(self, message, cls):
        if not self.through_wire:
            return message
        return decode_message(encode_message(message), (cls,))

    def tick(self, checkpoint: bool = False, kill: frozenset[int] = frozenset()):
        """One tick; workers in ``kill`` crash mid-step and are replaced."""
        repl = self.replication
        tick = repl.tick + 1
        steps = repl.build_steps(tick, checkpoint)
        replies = []
        for worker, step in steps.items():
            if worker in kill:
                self.sims[worker].step(self._roundtrip(step, Step))  # work lost in the crash
                self.replace(worker)
            replies.append(
                self._roundtrip(self.sims[worker].step(self._roundtrip(step, Step)), Reply)
            )
        return repl.commit(tick, replies, checkpoint)

    def replace(self, worker: int) -> None:
        """What the core does for a failed worker: restore the checkpoint, replay the log."""
        old = self.sims[worker]
        sim = self.sims[worker] = WorkerSim(worker, old.epoch + 1, old.plugins, old.world)
        restore, logged = self.replication.recovery(worker)
        sim.restore(self._roundtrip(restore, Restore))
        for step in logged[:-1]:
            sim.step(self._roundtrip(step, Step))

    def relayout(self, layout: Layout) -> int:
        """What the core does to apply a plan after a checkpoint commit."""
        moved = self.replication.relayout(layout)
        any_sim = next(iter(self.sims.values()))
        for worker in layout.workers:
            if worker not in self.sims:
                self.sims[worker] = WorkerSim(worker, 1, any_sim.plugins, any_sim.world)
        for worker in set(self.sims) - set(layout.workers):
            del self.sims[worker]
        return moved

    def run(self, ticks: int, persist_every: int = 10):
        reports = []
        for i in range(ticks):
            last = i == ticks - 1
            reports.append(
                self.tick(checkpoint=last or (self.replication.tick + 1) % persist_every == 0)
            )
        return reports
