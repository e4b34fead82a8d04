"""The replication layer: the authoritative world, ownership and ghosts (sans-io).

:class:`Replication` is the core's state machine. :meth:`build_steps` turns
what the last commit decided into one ``Step`` per worker; :meth:`commit`
folds all workers' ``Reply`` messages for the tick into the world. It never
waits on anything, so it is tested in-process with :class:`~meshd.mesh.step.WorkerSim`
objects standing in for the worker processes.

It is long because it is one state machine: every method keeps the same
tables (records, owners, ghost targets, outboxes, step logs, the checkpoint)
consistent with each other, and those invariants are easier to check in one
place than across files.

What the core knows, and when:

- ownership (which worker owns which entity) and ghost targets: always exact;
- full entity records: exact at checkpoint ticks (``S(T)`` as a whole), and
  between checkpoints for the entities that crossed a worker boundary or are
  ghosts somewhere; other entities are reported at the next checkpoint.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import attrs

from meshd.common.wire import CONVERTER, check_wire_value
from meshd.mesh.layout import Layout, cell_of, sorted_leaves
from meshd.mesh.messages import Reply, Restore, Step, WorldParams
from meshd.mesh.plugins import KindCodec, PluginSet
from meshd.mesh.step import describe_failure
from meshd.plugin import GATEWAY, PluginError
from meshd.store.codec import (
    Delta,
    Row,
    StoreError,
    WorldSnapshot,
    decode_state,
    restore_state,
    to_row,
    world_hash,
)

TIMER_SEQ = 1 << 32
"""Sequence numbers of one sender's events in one tick stay below this."""


@attrs.define
class Outbox:
    """What the next ``Step`` of one worker will carry."""

    release: list[int] = attrs.field(factory=list)
    ghost_remove: list[int] = attrs.field(factory=list)
    ghost_upsert: list[list[Any]] = attrs.field(factory=list)
    acquire: list[list[Any]] = attrs.field(factory=list)
    events: list[list[Any]] = attrs.field(factory=list)
    freeze: list[int] = attrs.field(factory=list)
    unfreeze: list[int] = attrs.field(factory=list)


@attrs.frozen
class Checkpoint:
    """The world as of the last checkpoint: where a replacement worker starts from.

    Shallow copies are enough: records are replaced, never mutated.
    """

    tick: int
    layout: dict[str, int]
    records: dict[int, list[Any]]
    owner: dict[int, int]
    targets: dict[int, tuple[int, ...]]
    quarantined: frozenset[int]


@attrs.define
class CommitReport:
    """What a commit noticed that the shell should log or count."""

    errors: list[tuple[int, int, str, str]] = attrs.field(factory=list)
    """(worker, entity, where, error) of entities whose tick failed."""
    input_errors: list[tuple[int, int, str, str]] = attrs.field(factory=list)
    """(entity, input event seq, where, error) of player inputs that failed."""
    quarantined: list[int] = attrs.field(factory=list)
    messages: list[list[Any]] = attrs.field(factory=list)
    """For players, by sender then sequence: ``[sender, seq, player, x, y, radius, data]``."""
    hazards: list[tuple[str, str]] = attrs.field(factory=list)
    """Strict mode: (what, where) the workers' guards noted this tick."""
    world_errors: list[tuple[int, str, str, str]] = attrs.field(factory=list)
    """(sender, plugin and world event, where, error) of world events skipped."""
    dropped_events: int = 0
    handoffs: int = 0
    spawned: int = 0
    despawned: int = 0


@attrs.frozen
class Adoption:
    """What :meth:`Replication.adopt` did to the world for new plugin code."""

    converted: list[int]
    """Entities whose state was converted to their kind's new class."""
    migrated: list[int]
    """Of those, the ones that went through ``Kind.migrate``."""
    released: list[int]
    """Quarantined entities that run again (the code changed)."""


class Replication:
    """The authoritative world state ``S(T)`` and the routing between workers."""

    def __init__(
        self,
        plugins: PluginSet,
        world: WorldParams,
        layout: Layout,
        snapshot: WorldSnapshot,
        *,
        quarantine_after: int = 10,
        cell_size: float = 0.0,
    ) -> None:
        self.plugins = plugins
        self.world = world
        self.layout = layout
        self.tick = snapshot.tick
        self.next_id = snapshot.next_id
        self.records: dict[int, list[Any]] = {record[0]: record for record in snapshot.records}
        self.owner: dict[int, int] = {}
        self.targets: dict[int, tuple[int, ...]] = {}
        self.outboxes: dict[int, Outbox] = {w: Outbox() for w in layout.workers}
        self.layout_pending: set[int] = set(layout.workers)
        self.pending_events: list[list[Any]] = []
        self.timers: dict[int, list[list[Any]]] = {}
        """Events for a later tick than the next, by the tick they are due: ``[target, sender,
        seq, name, data]``, the seq made unique and earliest-sent first (:meth:`commit`)."""
        for due, *event in snapshot.timers:
            self.timers.setdefault(due, []).append(event)
        self.dirty: set[int] = set(snapshot.converted)
        self.code = plugins.code_digest()
        """The plugins' code digest, written with each delta."""
        stored_worlds = snapshot.classes.get("worlds", {})
        self.world_state: dict[str, list[Any]] = {
            name: _stored_world(name, codec, snapshot.world.get(name, {}), stored_worlds.get(name))
            for name, codec in plugins.world_codecs.items()
        }
        """Each plugin's world state (wire values) as of the last commit."""
        self.deleted: set[int] = set()
        self.counts: dict[str, int] = {}
        self.cost_ms: dict[str, float] = {}
        self.worker_cpu_ms: dict[int, float] = {}
        self.errors_total = 0
        self.quarantine_after = quarantine_after
        self.quarantined: set[int] = set(snapshot.quarantined)
        self.error_streaks: dict[int, int] = {}
        self.checkpoint_tick = snapshot.tick
        self.down: set[int] = set()
        self.cell_size = cell_size
        """Side of the interest cells (0: no players, no cell index)."""
        self.cells: dict[tuple[int, int], set[int]] = {}
        self.watch: list[list[int]] = []
        """Cells where players look: workers report every change there at once."""
        self.watch_pending: set[int] = set()
        if cell_size:
            for record in self.records.values():
                cell = cell_of(record[2], record[3], cell_size)
                self.cells.setdefault(cell, set()).add(record[0])
        for record in sorted(self.records.values()):
            self._place(record)
        self._route_events(snapshot.events)
        self.step_log: dict[int, list[Step]] = {w: [] for w in layout.workers}
        self.checkpoint = self._take_checkpoint()

    # -- building steps -------------------------------------------------

    def build_steps(self, tick: int, checkpoint: bool) -> dict[int, Step]:
        """One ``Step(tick)`` per live worker, emptying the outboxes."""
        if tick != self.tick + 1:
            raise ValueError(f"tick {tick} does not follow committed tick {self.tick}")
        steps = {}
        for worker in self.layout.workers:
            box = self.outboxes[worker]
            if worker in self.down:
                self.outboxes[worker] = Outbox()
                continue
            steps[worker] = Step(
                tick=tick,
                epoch=0,
                layout=self.layout.to_wire() if worker in self.layout_pending else None,
                release=box.release,  # type: ignore[arg-type]
                watch=self.watch  # type: ignore[arg-type]
                if worker in self.watch_pending or worker in self.layout_pending
                else None,
                watch_cell=self.cell_size,
                ghost_remove=box.ghost_remove,  # type: ignore[arg-type]
                ghost_upsert=box.ghost_upsert,  # type: ignore[arg-type]
                acquire=box.acquire,  # type: ignore[arg-type]
                events=box.events,  # type: ignore[arg-type]
                freeze=box.freeze,  # type: ignore[arg-type]
                unfreeze=box.unfreeze,  # type: ignore[arg-type]
                checkpoint=checkpoint,
                world=self.world_state,  # type: ignore[arg-type]
            )
            self.outboxes[worker] = Outbox()
            self.step_log[worker].append(steps[worker])
        self.layout_pending.clear()
        self.watch_pending.clear()
        return steps

    # -- committing replies ---------------------------------------------

    def commit(self, tick: int, replies: Sequence[Reply], checkpoint: bool) -> CommitReport:
        """Fold every worker's reply for ``tick`` into the world; ``S(tick)`` results."""
        if tick != self.tick + 1:
            raise ValueError(f"tick {tick} does not follow committed tick {self.tick}")
        report = CommitReport()
        spawns: list[list[Any]] = []
        events: list[list[Any]] = []
        world_events: list[list[Any]] = []
        for reply in sorted(replies, key=lambda r: r.worker):
            for entity_id in reply.despawn:
                self._remove(entity_id)
                report.despawned += 1
            for record, new_targets in reply.border:
                self._set_record(record)
                self._retarget(record, tuple(new_targets))
            for record in reply.handoff:
                self._set_record(record)
                self._place(record)
                report.handoffs += 1
            for record in reply.dirty:
                self._set_record(record)
            for entity_id, where, text in reply.errors:
                report.errors.append((reply.worker, entity_id, where, text))
            if reply.input_errors:
                self._forget_failed_inputs(reply)
                report.input_errors.extend(map(tuple, reply.input_errors))
            spawns.extend(reply.spawns)
            report.hazards.extend((what, where) for what, where, _count in reply.hazards)
            report.messages.extend(reply.messages)
            world_events.extend(reply.world_events)
            events.extend(reply.events)
            for target, sender, seq, name, data, due in reply.timers:
                # Delivered with others of its sender by seq: timers before this
                # tick's events, the earliest sent first, each seq unique.
                seq += (tick - due) * TIMER_SEQ
                self.timers.setdefault(due, []).append([target, sender, seq, name, data])
            self.counts.update(reply.counts)
            self.cost_ms.update(reply.cost_ms)
            self.worker_cpu_ms[reply.worker] = reply.cpu_ms
        spawns.sort(key=lambda spawn: (spawn[0], spawn[1]))
        report.messages.sort(key=lambda message: (message[0], message[1]))
        if world_events:
            self._reduce_world(world_events, report)
        for _parent, _seq, kind, x, y, z, state in spawns:
            record = [self.next_id, kind, x, y, z, state]
            self.next_id += 1
            self._set_record(record)
            self._place(record)
        report.spawned = len(spawns)
        report.dropped_events = self._route_events(self.timers.pop(tick + 1, []) + events)
        self.errors_total += len(report.errors)
        self._count_errors(report)
        self.tick = tick
        if checkpoint:
            self.checkpoint_tick = tick
            self.checkpoint = self._take_checkpoint()
        return report

    def _forget_failed_inputs(self, reply: Reply) -> None:
        """Drop inputs that failed from the step log: a replay must not run them again.

        A failed input was undone entirely (state, emissions, randomness), so
        a replay without it reaches the same state, and never meets whatever
        made it fail (a handler that ran out of memory, say) a second time.
        """
        log = self.step_log.get(reply.worker)
        if not log or log[-1].tick != reply.tick:
            return
        failed = {seq for _entity, seq, _where, _text in reply.input_errors}
        step = log[-1]
        step.events = [  # type: ignore[assignment]
            event for event in step.events if not (event[1] == GATEWAY and event[2] in failed)
        ]

    # -- players --------------------------------------------------------

    def set_watch(self, cells: list[list[int]]) -> None:
        """Cells around the players: from the next step, changes there are reported each tick."""
        if cells != self.watch:
            self.watch = cells
            self.watch_pending = {w for w in self.layout.workers if w not in self.down}

    def add_entity(self, record: list[Any]) -> None:
        """A new entity made by the core between ticks (a new player's), id ``next_id``."""
        if record[0] != self.next_id:
            raise ValueError(f"new entity {record[0]} must take the next id {self.next_id}")
        self.next_id += 1
        self._set_record(record)
        self._place(record)

    def _reduce_world(self, world_events: list[list[Any]], report: CommitReport) -> None:
        """Apply a tick's world events, by sender then sequence; a failing one is skipped."""
        world_events.sort(key=lambda event: (event[0], event[1]))
        changed = dict(self.world_state)
        for sender, _seq, plugin, event, data in world_events:
            codec = self.plugins.world_codecs[plugin]
            try:
                new = self.plugins.world_reducers[(plugin, event)](
                    codec.from_wire(changed[plugin]), data
                )
                if type(new) is not codec.cls:
                    raise TypeError(f"a world event must return a {codec.cls.__name__}")
                values = codec.to_wire(new)
                check_wire_value(values)
            except Exception as exc:
                report.world_errors.append((sender, f"{plugin}.{event}", *describe_failure(exc)))
                continue
            changed[plugin] = list(values)
        self.world_state = changed

    def inject(self, events: Iterable[list[Any]]) -> int:
        """Queue events from outside the simulation (player inputs) for the next step.

        Returns how many were dropped because their target is gone or frozen.
        """
        dropped = 0
        for event in events:
            owner = self.owner.get(event[0])
            if owner is None or owner in self.down:
                dropped += 1
                continue
            self.outboxes[owner].events.append(event)
            self.pending_events.append(event)
        return dropped

    # -- failover -------------------------------------------------------

    def _take_checkpoint(self) -> Checkpoint:
        """Remember ``S(T)`` and clear the step logs (called right after a whole-world commit).

        Entities still on their way to a new owner (in an outbox) are
        counted as the new owner's: the next logged step delivers them.
        """
        for log in self.step_log.values():
            log.clear()
        in_transit = {
            record[0] for box in self.outboxes.values() for record, _targets in box.acquire
        }
        owner = {i: w for i, w in self.owner.items() if i not in in_transit}
        return Checkpoint(
            self.tick,
            self.layout.to_wire(),
            dict(self.records),
            owner,
            dict(self.targets),
            frozenset(self.quarantined),
        )

    def recovery(self, worker: int) -> tuple[Restore, list[Step]]:
        """What a replacement for ``worker`` needs to reach the tick now in flight.

        The ``Restore`` loads ``worker``'s share of the last checkpoint; the
        steps are the ones the failed worker received since, the last of
        them the step of the tick in flight. Replaying them reproduces the
        failed worker's state exactly, so the world loses no tick.
        """
        base = self.checkpoint
        acquire = [
            [base.records[i], list(base.targets.get(i, ()))]
            for i, owner in sorted(base.owner.items())
            if owner == worker
        ]
        ghosts = [
            base.records[i] for i, targets in sorted(base.targets.items()) if worker in targets
        ]
        frozen = sorted(i for i in base.quarantined if base.owner.get(i) == worker)
        restore = Restore(
            tick=base.tick,
            layout=base.layout,
            acquire=acquire,
            ghost_upsert=ghosts,
            frozen=frozen,
            watch=self.watch,  # type: ignore[arg-type]
            watch_cell=self.cell_size,
        )
        return restore, list(self.step_log[worker])

    def relayout(self, layout: Layout) -> int:
        """Switch to ``layout`` at this tick boundary (a bulk handoff); return entities re-homed.

        Called right after a checkpoint commit, when the core holds all of
        ``S(T)``. Every entity is re-homed by its position under the new
        layout, and only the difference travels with the next steps: a
        release and an acquisition for each entity that changes owner, ghost
        removals and upserts for each ghost target that changes, and the new
        layout for every worker (a split or merge inside one worker costs
        nothing else). Operations already queued for the next step that the
        new layout contradicts (an acquisition by the old owner, a ghost
        upsert to a worker that no longer needs it) are withdrawn, and queued
        events follow their targets. A new checkpoint is taken on the new
        layout, so a failover right after replays from it.
        """
        if self.checkpoint_tick != self.tick:
            raise RuntimeError("the layout can only change right after a checkpoint commit")
        old_owner, old_targets = self.owner, self.targets
        boxes = {w: self.outboxes.get(w) or Outbox() for w in layout.workers}
        in_transit = {item[0][0]: item for box in boxes.values() for item in box.acquire}
        # (worker, id) of queued acquisitions and ghost upserts the new layout contradicts
        unacquired: set[tuple[int, int]] = set()
        unghosted: set[tuple[int, int]] = set()
        self.layout = layout
        self.owner, self.targets = {}, {}
        moved = 0
        for entity_id, record in self.records.items():
            x, y = record[2], record[3]
            leaf = layout.partition_of(x, y)
            owner = self.owner[entity_id] = layout.owners[leaf]
            targets = (
                () if layout.safe_rect(leaf).contains(x, y) else layout.ghost_targets(x, y, owner)
            )
            if targets:
                self.targets[entity_id] = targets
            was = old_owner[entity_id]
            if was != owner:
                moved += 1
                if entity_id in in_transit:
                    unacquired.add((was, entity_id))  # it never reached ``was``
                elif was in boxes:
                    boxes[was].release.append(entity_id)
                boxes[owner].acquire.append([record, list(targets)])
                if entity_id in self.quarantined:
                    boxes[owner].freeze.append(entity_id)
            elif entity_id in in_transit:
                in_transit[entity_id][1] = list(targets)
            previous = old_targets.get(entity_id, ())
            if previous != targets:
                for worker in previous:
                    if worker not in targets and worker in boxes:
                        boxes[worker].ghost_remove.append(entity_id)
                        unghosted.add((worker, entity_id))
                for worker in targets:
                    if worker not in previous:
                        boxes[worker].ghost_upsert.append(record)
        for worker, box in boxes.items():
            box.acquire = [i for i in box.acquire if (worker, i[0][0]) not in unacquired]
            box.ghost_upsert = [r for r in box.ghost_upsert if (worker, r[0]) not in unghosted]
            box.events = []
        self.outboxes = boxes
        self._route_events(self.pending_events)
        self.counts = {leaf: n for leaf, n in self.counts.items() if leaf in layout.owners}
        self.cost_ms = {leaf: ms for leaf, ms in self.cost_ms.items() if leaf in layout.owners}
        self.step_log = {w: [] for w in layout.workers}
        self.layout_pending = {w for w in layout.workers if w not in self.down}
        self.checkpoint = self._take_checkpoint()
        return moved

    def take_down(self, worker: int) -> list[str]:
        """Stop simulating ``worker``'s partitions; return them.

        For a worker slot whose every incarnation dies (its restart budget
        is spent): its entities freeze as the core last knew them (the last
        checkpoint, or a later border report), entities that walk into its
        partitions freeze there, events sent to them are dropped, and the
        other workers keep seeing them as ghosts. Lasts until an operator
        releases them (:meth:`bring_up`) or the core restarts.
        """
        self.down.add(worker)
        self.step_log[worker].clear()
        self.outboxes[worker] = Outbox()
        return sorted_leaves(self.layout.leaves_of(worker))

    def release_entities(self, entity_ids: Iterable[int]) -> list[int]:
        """Run quarantined entities again from the next step on; return those released."""
        released = []
        for entity_id in sorted(set(entity_ids)):
            if entity_id in self.quarantined:
                self.quarantined.discard(entity_id)
                self.error_streaks.pop(entity_id, None)
                owner = self.owner[entity_id]
                if owner not in self.down:
                    self.outboxes[owner].unfreeze.append(entity_id)
                released.append(entity_id)
        return released

    def bring_up(self, worker: int) -> Restore:
        """Simulate ``worker``'s quarantined partitions again; the ``Restore`` for its new process.

        Called right after a checkpoint commit, when the core holds all of
        ``S(T)``: the new process starts from the world as it is now (the
        slot's entities as they froze, and those that walked in since).
        """
        if self.checkpoint_tick != self.tick:
            raise RuntimeError("partitions can only come back right after a checkpoint commit")
        self.down.discard(worker)
        self.outboxes[worker] = Outbox()  # arrivals queued while down are in the restore
        self.checkpoint = self._take_checkpoint()
        restore, _log = self.recovery(worker)
        return restore

    def adopt(self, plugins: PluginSet) -> Adoption:
        """Run ``plugins`` (their code as it is now: ``meshd reload``) from the next tick.

        Called right after a checkpoint commit, when the core holds all of
        ``S(T)``. What a restart would do to the stored world is done here:
        states whose class changed are converted (new fields take their
        defaults, ``Kind.migrate`` for the rest), the world state likewise,
        and quarantined entities run again if the code changed. Raises
        :class:`PluginError` with the reason, changing nothing, if a kind that
        still has entities is gone or a state does not convert.
        """
        if self.checkpoint_tick != self.tick:
            raise RuntimeError("plugins can only change right after a checkpoint commit")
        old = self.plugins
        orphans = Counter(r[1] for r in self.records.values() if r[1] not in plugins.codecs)
        if orphans:
            kind, count = sorted(orphans.items())[0]
            raise PluginError(
                f"the new code defines no kind {kind!r}, and {count} entities are of that kind: "
                "keep the kind (it may have no systems) until they are gone"
            )
        changed = {
            kind
            for kind, codec in plugins.codecs.items()
            if kind in old.codecs and codec.signature != old.codecs[kind].signature
        }
        converted: dict[int, list[Any]] = {}
        migrated: list[int] = []
        for entity_id, (_id, kind, x, y, z, values) in self.records.items():
            if kind not in changed:
                continue
            stored = old.codecs[kind].to_dict(values)
            try:
                state, was_migrated = decode_state(entity_id, kind, stored, plugins.codecs[kind])
            except StoreError as exc:
                raise PluginError(str(exc).replace("stored entity", "entity", 1)) from None
            converted[entity_id] = [entity_id, kind, x, y, z, state]
            if was_migrated:
                migrated.append(entity_id)
        world_state = {
            name: _stored_world(
                name,
                codec,
                old.world_codecs[name].to_dict(self.world_state[name])
                if name in self.world_state
                else {},
                old.world_codecs[name].signature if name in old.world_codecs else None,
            )
            for name, codec in plugins.world_codecs.items()
        }
        code = plugins.code_digest()
        released = self.release_entities(self.quarantined) if code != self.code else []
        self.plugins, self.code, self.world_state = plugins, code, world_state
        self.error_streaks = {}  # as after a restart
        self.records.update(converted)
        self.dirty.update(converted)
        if converted:  # what the next step hands over goes in the new form too
            for box in self.outboxes.values():
                box.acquire = [[converted.get(r[0], r), targets] for r, targets in box.acquire]
                box.ghost_upsert = [converted.get(r[0], r) for r in box.ghost_upsert]
        self.checkpoint = self._take_checkpoint()
        return Adoption(sorted(converted), migrated, released)

    def _count_errors(self, report: CommitReport) -> None:
        """Quarantine entities whose systems failed ``quarantine_after`` ticks in a row."""
        streaks = {}
        for _worker, entity_id, _where, _text in report.errors:
            streak = streaks[entity_id] = self.error_streaks.get(entity_id, 0) + 1
            if streak >= self.quarantine_after and entity_id not in self.quarantined:
                self.quarantined.add(entity_id)
                self.outboxes[self.owner[entity_id]].freeze.append(entity_id)
                report.quarantined.append(entity_id)
        self.error_streaks = streaks

    def _place(self, record: list[Any]) -> None:
        """Give an entity to the owner of its position, with its ghosts."""
        entity_id, _kind, x, y = record[0], record[1], record[2], record[3]
        owner = self.layout.owner_of(x, y)
        self.owner[entity_id] = owner
        new_targets = self.layout.ghost_targets(x, y, owner)
        self.outboxes[owner].acquire.append([record, list(new_targets)])
        if entity_id in self.quarantined:
            self.outboxes[owner].freeze.append(entity_id)
        self._retarget(record, new_targets)

    def _retarget(self, record: list[Any], new_targets: tuple[int, ...]) -> None:
        entity_id = record[0]
        old_targets = self.targets.get(entity_id, ())
        for worker in old_targets:
            if worker not in new_targets:
                self.outboxes[worker].ghost_remove.append(entity_id)
        for worker in new_targets:
            self.outboxes[worker].ghost_upsert.append(record)
        if new_targets:
            self.targets[entity_id] = new_targets
        else:
            self.targets.pop(entity_id, None)

    def _set_record(self, record: list[Any]) -> None:
        """Take a newer record of an entity; keep the interest cells in step."""
        entity_id = record[0]
        old = self.records.get(entity_id)
        self.records[entity_id] = record
        self.dirty.add(entity_id)
        if self.cell_size:
            size = self.cell_size
            cell = cell_of(record[2], record[3], size)
            if old is not None:
                before = cell_of(old[2], old[3], size)
                if before == cell:
                    return
                self._leave_cell(before, entity_id)
            self.cells.setdefault(cell, set()).add(entity_id)

    def _leave_cell(self, cell: tuple[int, int], entity_id: int) -> None:
        members = self.cells.get(cell)
        if members is not None:
            members.discard(entity_id)
            if not members:
                del self.cells[cell]

    def _remove(self, entity_id: int) -> None:
        if self.cell_size:
            old = self.records[entity_id]
            self._leave_cell(cell_of(old[2], old[3], self.cell_size), entity_id)
        del self.records[entity_id]
        del self.owner[entity_id]
        for worker in self.targets.pop(entity_id, ()):
            self.outboxes[worker].ghost_remove.append(entity_id)
        self.dirty.discard(entity_id)
        self.deleted.add(entity_id)

    def _route_events(self, events: Iterable[list[Any]]) -> int:
        """Queue a commit's events for their targets' owners; return how many had no target."""
        self.pending_events = []
        return self.inject(events)

    # -- persistence and inspection -------------------------------------

    def take_delta(self) -> Delta:
        """The changes since the last delta, as of the last (checkpoint) commit."""
        if self.checkpoint_tick != self.tick:
            raise RuntimeError("a delta can only be taken right after a checkpoint commit")
        delta = Delta(
            tick=self.tick,
            seed=self.world.seed,
            next_id=self.next_id,
            events=list(self.pending_events),
            upserts=[self.records[i] for i in self.dirty],
            deletes=sorted(self.deleted),
            quarantined=sorted(self.quarantined),
            timers=self.stored_timers(),
            code=self.code,
            world=self.world_fields(),
            classes=self.plugins.classes(),
        )
        self.dirty = set()
        self.deleted = set()
        return delta

    def world_fields(self) -> dict[str, dict[str, Any]]:
        """Each plugin's world state as a field map (stored, hashed, shown)."""
        return {
            name: self.plugins.world_codecs[name].to_dict(values)
            for name, values in self.world_state.items()
        }

    def stored_timers(self) -> list[list[Any]]:
        """The timers as stored: ``[due tick, target, sender, seq, name, data]``, sorted."""
        return sorted([due, *event] for due, events in self.timers.items() for event in events)

    def rows(self) -> Iterator[Row]:
        schema = self.plugins.schema()
        for entity_id in sorted(self.records):
            yield to_row(self.records[entity_id], schema)

    def hash(self) -> str:
        """The world hash as of the last checkpoint (exact only at a checkpoint tick)."""
        return world_hash(
            self.rows(),
            self.next_id,
            self.pending_events,
            self.quarantined,
            self.stored_timers(),
            self.world_fields(),
        )


def _stored_world(
    plugin: str, codec: KindCodec, stored: dict[str, Any], stored_signature: Any
) -> list[Any]:
    """A plugin's stored world state as its world class has it now: exactly as stored under
    the same class (:func:`restore_state`); else converted, fields it no longer has dropped
    and new ones taking their defaults."""
    exact = restore_state(stored, codec, stored_signature)
    if exact is not None:
        return list(exact)
    try:
        known = {name: value for name, value in stored.items() if name in codec.fields}
        return list(codec.from_dict(known, CONVERTER))
    except Exception as exc:
        raise PluginError(
            f"plugin {plugin!r}: the stored world state {stored!r} does not fit "
            f"{codec.cls.__name__}: {exc}"
        ) from None
