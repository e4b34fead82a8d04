"""The tick pipeline: what a tick does and in which order, without any I/O (pure).

:class:`Pipeline` is the orchestration both the daemon's tick loop
(:mod:`meshd.mesh.core`) and the in-process mesh of the tests drive, so the
tests exercise the real thing: which ticks are checkpoints, building one
``Step`` per worker, what a replacement worker replays after a failure,
committing the replies and feeding the planner their costs, and reshaping
the mesh at a checkpoint boundary. The callers only move the messages (over
sockets, or by calling :class:`~meshd.mesh.step.WorkerSim` directly).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import attrs

from meshd.mesh.layout import Layout
from meshd.mesh.messages import Reply, Restore, Step
from meshd.mesh.planner import Plan, Planner
from meshd.mesh.replication import CommitReport, Replication


@attrs.frozen
class TickPlan:
    """One tick: its number, and whether the core will hold (and write) all of ``S(tick)``."""

    tick: int
    checkpoint: bool
    persist: bool
    final: bool


@attrs.frozen
class Recovery:
    """How a replacement reaches a failed worker's state: load ``restore``, then
    step through ``replay`` (their replies are not needed), then answer the step
    in flight again."""

    restore: Restore
    replay: list[Step]


class Pipeline:
    """The order of a tick's work, over one :class:`Replication` (and a :class:`Planner`)."""

    def __init__(
        self,
        replication: Replication,
        *,
        checkpoint_every: int = 10,
        persist_every: int = 10,
        planner: Planner | None = None,
    ) -> None:
        self.replication = replication
        self.checkpoint_every = checkpoint_every
        self.persist_every = persist_every
        self.planner = planner

    def next(self, *, final: bool = False, checkpoint: bool = False) -> TickPlan:
        """The next tick. It is a checkpoint every ``checkpoint_every`` ticks, on every
        persist tick (every ``persist_every`` and the ``final`` one), and when asked."""
        tick = self.replication.tick + 1
        persist = final or tick % self.persist_every == 0
        return TickPlan(
            tick=tick,
            checkpoint=checkpoint or persist or tick % self.checkpoint_every == 0,
            persist=persist,
            final=final,
        )

    def steps(self, plan: TickPlan) -> dict[int, Step]:
        """One ``Step`` per live worker."""
        return self.replication.build_steps(plan.tick, plan.checkpoint)

    def recovery(self, worker: int) -> Recovery:
        """What a replacement for failed ``worker`` needs before the step in flight."""
        restore, logged = self.replication.recovery(worker)
        return Recovery(restore, logged[:-1])

    def commit(self, plan: TickPlan, replies: Collection[Reply]) -> CommitReport:
        """Fold the tick's replies into the world, and their costs into the planner."""
        report = self.replication.commit(plan.tick, list(replies), plan.checkpoint)
        if self.planner is not None:
            for reply in replies:
                self.planner.observe(leaf_costs(reply))
        return report

    def replan(self, *, can_start: bool) -> Plan | None:
        """The planner's new layout, asked right after a checkpoint commit (None: keep it)."""
        if self.planner is None:
            return None
        repl = self.replication
        return self.planner.plan(
            repl.tick, repl.layout, frozen_workers=repl.down, can_start=can_start
        )

    def reshape(self, owners: Mapping[str, int]) -> int:
        """Switch to the layout ``owners`` (a bulk handoff); how many entities changed worker."""
        repl = self.replication
        return repl.relayout(Layout(repl.world.size, repl.world.halo, dict(owners)))


def leaf_costs(reply: Reply) -> dict[str, float]:
    """CPU ms per leaf in one reply, the whole step's CPU spread over the leaves pro rata.

    Leaves are timed around their entities' systems only; the rest of the
    step (inbound, views, the reply) is the workers' cost too.
    """
    measured = sum(reply.cost_ms.values())
    scale = reply.cpu_ms / measured if measured > 0 else 1.0
    return {leaf: ms * scale for leaf, ms in reply.cost_ms.items()}
