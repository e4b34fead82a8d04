"""The planner: reshapes the mesh from measured costs (sans-io).

Fed the CPU milliseconds each leaf cost on each tick, :class:`Planner` keeps
a moving average per leaf and, when asked, proposes a new layout: split hot
leaves into four, merge cold sibling quartets, start or stop a worker, and
move leaves from the most to the least loaded worker, preferring leaves that
touch the receiver's (fewer ghosts). Hysteresis keeps it from flapping: the
split and merge thresholds lie far apart, a leaf that just changed dwells
before it changes again, and worker starts and stops have a cool-down.

The planner only ever decides *where* entities are simulated, never what
happens to them, so no decision of it can change the world (its hash is the same
for any layout).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import attrs

from meshd.mesh.layout import Layout, children, leaf_rect, parent

DRAIN_COOLDOWN = 3
"""Stopping a worker waits this many cool-downs after the last start or stop."""


@attrs.frozen
class PlannerSettings:
    """Thresholds, in CPU milliseconds per tick unless named otherwise."""

    budget_ms: float
    """What one worker may spend per tick (the tick interval x target utilisation)."""
    split_ms: float
    merge_ms: float
    """Four sibling leaves merge when their costs sum below this."""
    imbalance_ms: float
    """Move leaves while the most and least loaded workers differ by more than this
    and by more than ``imbalance_share`` of the busiest one's load."""
    min_cell: float
    """Metres: no leaf is split below this side."""
    min_workers: int
    max_workers: int
    dwell_ticks: int
    cooldown_ticks: int
    scale_up: float = 0.9
    """Start a worker when the mean load exceeds this share of the budget..."""
    scale_down: float = 0.7
    """...stop one when the others would carry the load under this share."""
    imbalance_share: float = 0.2
    max_moves: int = 4
    smoothing: float = 0.1
    """Weight of a new sample in the moving average (about a second at 20 Hz)."""


@attrs.frozen
class Plan:
    """A new layout and what changed to get there."""

    owners: dict[str, int]
    splits: list[str] = attrs.field(factory=list)
    merges: list[str] = attrs.field(factory=list)
    moves: list[tuple[str, int, int]] = attrs.field(factory=list)
    started: list[int] = attrs.field(factory=list)
    stopped: list[int] = attrs.field(factory=list)


class Planner:
    """Moving costs per leaf, and the decisions taken from them."""

    def __init__(self, settings: PlannerSettings, layout: Layout, tick: int) -> None:
        self.settings = settings
        self.size = layout.size
        self.cost: dict[str, float] = {}
        self.changed_at: dict[str, int] = dict.fromkeys(layout.owners, tick)
        self.scaled_at = tick

    def observe(self, costs: Mapping[str, float]) -> None:
        """Fold one tick's measured cost per leaf into the moving averages."""
        weight = self.settings.smoothing
        average = self.cost
        for leaf, ms in costs.items():
            old = average.get(leaf)
            average[leaf] = ms if old is None else old + weight * (ms - old)

    def loads(self, owners: Mapping[str, int]) -> dict[int, float]:
        loads: dict[int, float] = {}
        for leaf, worker in owners.items():
            loads[worker] = loads.get(worker, 0.0) + self.cost.get(leaf, 0.0)
        return loads

    def plan(
        self,
        tick: int,
        layout: Layout,
        *,
        frozen_workers: Collection[int] = (),
        can_start: bool = True,
    ) -> Plan | None:
        """The layout to switch to at this tick boundary, or None to keep the current one.

        Leaves of ``frozen_workers`` (quarantined) are left alone. A worker is
        started only when ``can_start`` (a warm spare is ready), so applying
        the plan never waits for a process to boot.
        """
        s = self.settings
        owners = {leaf: w for leaf, w in layout.owners.items() if w not in frozen_workers}
        if not owners:
            return None
        cost = self.cost
        plan = Plan(owners=dict(layout.owners))
        fresh: set[str] = set()

        def ready(leaf: str) -> bool:
            return leaf in fresh or tick - self.changed_at.get(leaf, tick) >= s.dwell_ticks

        for leaf in sorted(owners, key=lambda leaf: -cost.get(leaf, 0.0)):
            rect = leaf_rect(self.size, leaf)
            if (
                cost.get(leaf, 0.0) > s.split_ms
                and (rect.x1 - rect.x0) / 2 >= s.min_cell
                and ready(leaf)
            ):
                worker = owners.pop(leaf)
                share = cost.pop(leaf, 0.0) / 4
                for child in children(leaf):
                    owners[child] = worker
                    cost[child] = share
                    fresh.add(child)
                plan.splits.append(leaf)

        siblings: dict[str, list[str]] = {}
        for leaf in owners:
            up = parent(leaf)
            if up is not None:
                siblings.setdefault(up, []).append(leaf)
        for up, group in sorted(siblings.items()):
            if (
                len(group) == 4
                and not any(leaf in fresh for leaf in group)
                and all(ready(leaf) for leaf in group)
                and sum(cost.get(leaf, 0.0) for leaf in group) < s.merge_ms
            ):
                heaviest = max(group, key=lambda leaf: (cost.get(leaf, 0.0), -owners[leaf]))
                owners[up] = owners[heaviest]
                cost[up] = sum(cost.pop(leaf, 0.0) for leaf in group)
                for leaf in group:
                    del owners[leaf]
                fresh.add(up)
                plan.merges.append(up)

        loads = self.loads(owners)
        workers = len(loads)
        total = sum(loads.values())
        since = tick - self.scaled_at
        if (
            since >= s.cooldown_ticks
            and can_start
            and workers < s.max_workers
            and total / workers > s.scale_up * s.budget_ms
        ):
            taken = {*loads, *frozen_workers}
            new = next(w for w in range(len(taken) + 1) if w not in taken)
            loads[new] = 0.0
            plan.started.append(new)
        elif (
            since >= DRAIN_COOLDOWN * s.cooldown_ticks  # a crowd often pauses: stop slowly
            and workers > s.min_workers
            and total / (workers - 1) < s.scale_down * s.budget_ms
        ):
            victim = min(loads, key=lambda w: (loads[w], -w))
            del loads[victim]
            mine = [leaf for leaf, w in owners.items() if w == victim]
            for leaf in sorted(mine, key=lambda leaf: -cost.get(leaf, 0.0)):
                to = self._receiver(leaf, owners, loads)
                owners[leaf] = to
                loads[to] += cost.get(leaf, 0.0)
                plan.moves.append((leaf, victim, to))
            plan.stopped.append(victim)

        for _ in range(s.max_moves):
            busiest = max(loads, key=lambda w: (loads[w], -w))
            idlest = min(loads, key=lambda w: (loads[w], w))
            gap = loads[busiest] - loads[idlest]
            if (
                loads[busiest] < s.scale_down * s.budget_ms  # comfortable: leave it be
                or gap <= max(s.imbalance_ms, s.imbalance_share * loads[busiest])
            ):
                break
            movable = [
                leaf
                for leaf, w in owners.items()
                if w == busiest and ready(leaf) and cost.get(leaf, 0.0) < gap
            ]
            if not movable:
                break
            near = self._touching(idlest, owners)
            leaf = min(
                movable,
                key=lambda leaf: (leaf not in near, abs(cost.get(leaf, 0.0) - gap / 2), leaf),
            )
            owners[leaf] = idlest
            loads[busiest] -= cost.get(leaf, 0.0)
            loads[idlest] += cost.get(leaf, 0.0)
            plan.moves.append((leaf, busiest, idlest))
            fresh.add(leaf)

        for new in list(plan.started):
            if new not in owners.values():  # nothing could move to it
                plan.started.remove(new)
        if not (plan.splits or plan.merges or plan.moves):
            return None
        plan.owners.clear()
        plan.owners.update(owners)
        plan.owners.update({leaf: w for leaf, w in layout.owners.items() if w in frozen_workers})
        for leaf in fresh:
            self.changed_at[leaf] = tick
        gone = [*plan.splits, *(child for up in plan.merges for child in children(up))]
        for leaf in gone:
            self.changed_at.pop(leaf, None)
        if plan.started or plan.stopped:
            self.scaled_at = tick
        return plan

    def _touching(self, worker: int, owners: Mapping[str, int]) -> set[str]:
        """Leaves of other workers that share an edge or corner with ``worker``'s."""
        mine = [leaf_rect(self.size, leaf) for leaf, w in owners.items() if w == worker]
        return {
            leaf
            for leaf, w in owners.items()
            if w != worker and any(leaf_rect(self.size, leaf).intersects(r) for r in mine)
        }

    def _receiver(self, leaf: str, owners: Mapping[str, int], loads: Mapping[int, float]) -> int:
        """The least loaded worker of ``loads``, preferring one whose leaves touch ``leaf``."""
        rect = leaf_rect(self.size, leaf)
        touching = {
            w
            for other, w in owners.items()
            if other != leaf and leaf_rect(self.size, other).intersects(rect)
        }
        return min(loads, key=lambda w: (w not in touching, loads[w], w))
