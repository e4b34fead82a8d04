"""The simulation step: what a worker does with one ``Step`` (pure, no I/O).

:class:`WorkerSim` is the state machine a worker process wraps: ``Step`` in,
``Reply`` out; :func:`run_entity` runs one entity's handlers and systems
(the plugin API they see is :mod:`meshd.plugin`). Its guarantees, which make
the world independent of how it is partitioned (same world hash for any
worker count, layout, re-layout or failure):

- systems read only the previous tick: other entities are seen as :class:`View`
  snapshots taken before anything moves, ghosts are the previous tick's state;
- an entity's next state depends only on its previous state, its neighbours
  within its declared reach, the events sent to it (delivered sorted by
  sender then sequence) and ``ctx.rng`` seeded by (world seed, tick, id);
- outputs (events, spawns) are keyed by their source entity, so the core can
  order them without caring which worker produced them.

It is long because a worker's whole step is here: the hot loop over
entities and everything it calls per entity, kept together so that the cost
of each line on the hot path stays in view.
"""

from __future__ import annotations

import gc
import math
import os
import time
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

from meshd.common.wire import check_wire_value, input_args
from meshd.mesh.layout import Layout, cell_of
from meshd.mesh.messages import Reply, Restore, Step, WorldParams
from meshd.mesh.plugins import KindCodec, PluginSet
from meshd.plugin import (
    GATEWAY,
    Context,
    Entity,
    Event,
    EventHandler,
    System,
    View,
    WorldBuilder,
    finite_position,
)


def collect_between_ticks(tick: int, full_every: int = 100) -> None:
    """Run the cyclic garbage collector now, between ticks, instead of mid-tick.

    A tick allocates a fresh state object per entity; left to itself the
    collector would walk the whole heap many times per tick. Callers disable
    automatic collection and call this after each tick: the youngest
    generation every tick, the middle one every tenth, everything every
    ``full_every`` ticks (almost all garbage here is freed by reference
    counting; the collector only has the rare cycle to find).
    """
    gc.collect(2 if tick % full_every == 0 else 1 if tick % 10 == 0 else 0)


class SpatialIndex:
    """Uniform grid hash of views, rebuilt every tick from the previous tick's positions.

    Its grid (side: the halo) is this index's own, not the interest cells of
    :func:`~meshd.mesh.layout.cell_of`; its cell math is inlined, on the hot path.
    """

    def __init__(self, cell: float) -> None:
        self.cell = cell
        self.cells: dict[tuple[int, int], list[View]] = {}

    def add(self, view: View) -> None:
        cell = self.cell
        key = (int(view.x // cell), int(view.y // cell))
        bucket = self.cells.get(key)
        if bucket is None:
            self.cells[key] = [view]
        else:
            bucket.append(view)

    def query(
        self, x: float, y: float, radius: float, kinds: frozenset[str] | None, exclude: int
    ) -> list[View]:
        """Views within ``radius`` of (x, y) (of ``kinds``, if given), sorted by id."""
        cell, cells, r2 = self.cell, self.cells, radius * radius
        found: list[View] = []
        for cx in range(int((x - radius) // cell), int((x + radius) // cell) + 1):
            for cy in range(int((y - radius) // cell), int((y + radius) // cell) + 1):
                bucket = cells.get((cx, cy))
                if bucket is None:
                    continue
                for view in bucket:
                    dx, dy = view.x - x, view.y - y
                    if (
                        dx * dx + dy * dy <= r2
                        and view.id != exclude
                        and (kinds is None or view.kind in kinds)
                    ):
                        found.append(view)
        found.sort()
        return found


def run_entity(
    entity: Entity,
    prev: View,
    ctx: Context,
    inbox: Sequence[Event],
    handlers: dict[str, EventHandler],
    systems: Sequence[System],
    codec: KindCodec,
    max_step: float,
    input_seqs: Sequence[int] = (),
    failed_inputs: list[list[Any]] | None = None,
) -> list[str] | None:
    """Run one entity's event handlers and systems; ``[where, error]`` or None.

    On any plugin error (including a move faster than ``max_step``, a
    position that is not finite or a new state that cannot cross the wire)
    the entity keeps its previous state and everything it emitted this tick
    is withdrawn, so a faulty entity cannot corrupt others or the worker's
    reply. ``where`` names the plugin function and its innermost line that
    failed ("" when meshd's own checks refused the outcome).

    The first ``len(input_seqs)`` events of ``inbox`` are player inputs (the
    gateway's events sort first), with those step sequence numbers. Each
    runs on its own: a failing input is undone alone (state, emissions,
    randomness drawn) and reported in ``failed_inputs`` as ``[entity id,
    seq, where, error]``; it is the input's failure, not the entity's.
    """
    ctx.begin(entity, prev)
    mark = ctx.mark()
    try:
        for index, event in enumerate(inbox):
            if index < len(input_seqs):
                failure = _run_input(entity, prev, event, ctx, handlers, codec, max_step)
                if failure is not None and failed_inputs is not None:
                    failed_inputs.append([entity.id, input_seqs[index], *failure])
            else:
                handlers[event.name](entity, event, ctx)
        for system in systems:
            system(entity, ctx)
        _check_outcome(entity, prev, ctx, codec, max_step)
    except (Exception, SystemExit) as exc:
        entity.x, entity.y, entity.z, entity.state = prev.x, prev.y, prev.z, prev.state
        ctx.withdraw(mark)
        ctx.despawned.discard(entity.id)
        return describe_failure(exc)
    return None


def _run_input(
    entity: Entity,
    prev: View,
    event: Event,
    ctx: Context,
    handlers: dict[str, EventHandler],
    codec: KindCodec,
    max_step: float,
) -> list[str] | None:
    """One player input on its own; undone entirely if it fails (``[where, error]``)."""
    before = entity.x, entity.y, entity.z, entity.state
    mark = ctx.mark()
    despawned = entity.id in ctx.despawned
    saved = ctx.save()
    try:
        handlers[event.name](entity, event, ctx)
        _check_outcome(entity, prev, ctx, codec, max_step)
    except (Exception, SystemExit) as exc:
        entity.x, entity.y, entity.z, entity.state = before
        ctx.withdraw(mark)
        if not despawned:
            ctx.despawned.discard(entity.id)
        ctx.restore(saved)
        return describe_failure(exc)
    return None


def _check_outcome(
    entity: Entity, prev: View, ctx: Context, codec: KindCodec, max_step: float
) -> None:
    """Refuse what a plugin may not do to its entity; clamp the position into the world."""
    if entity.x != prev.x or entity.y != prev.y or entity.z != prev.z:
        x, y, z = float(entity.x), float(entity.y), float(entity.z)
        if math.hypot(x - prev.x, y - prev.y) > max_step:
            raise ValueError(
                f"moved {math.hypot(x - prev.x, y - prev.y):.3f} m in one "
                f"tick, more than its kind's max_speed allows ({max_step:.3f} m)"
            )
        entity.x, entity.y, entity.z = finite_position(x, y, z, ctx.world_size)
    if entity.state is not prev.state:
        if type(entity.state) is not codec.cls:
            raise TypeError(f"state must stay a {codec.cls.__name__}")
        check_wire_value(codec.to_wire(entity.state))


_MESHD = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""meshd's own code: a failure raised there is a check of meshd's, not a plugin's line."""


def describe_failure(exc: BaseException) -> list[str]:
    """``[where, error]`` of an exception raised by plugin code under :func:`run_entity`.

    ``where`` is the plugin function that was called and the innermost line
    of the plugin's own code (its folder), e.g. ``"patron (plugins/tavern.py:142)"``;
    empty when the exception came from meshd's checks of the outcome.
    """
    frames = list(traceback.walk_tb(exc.__traceback__))
    where = ""
    if len(frames) > 1:
        called = frames[1][0].f_code
        home = os.path.dirname(os.path.abspath(called.co_filename))
        if home != _MESHD and not home.startswith(_MESHD + os.sep):
            path, line = called.co_filename, frames[1][1]
            for frame, lineno in frames[2:]:
                if os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == home:
                    path, line = frame.f_code.co_filename, lineno
            where = f"{called.co_qualname} ({path}:{line})"
    return [where, f"{type(exc).__name__}: {exc}"]


def snapshot_views(
    entities: Iterable[Entity], ghosts: Iterable[View], cell: float
) -> tuple[dict[int, View], SpatialIndex]:
    """The previous-tick views of owned entities, and an index over them and the ghosts."""
    index = SpatialIndex(max(cell, 1e-6))
    prev: dict[int, View] = {}
    add = index.add
    for entity in entities:
        view = View(entity.id, entity.kind, entity.x, entity.y, entity.z, entity.state)
        prev[entity.id] = view
        add(view)
    for view in ghosts:
        add(view)
    return prev, index


def group_events(
    events: Iterable[Sequence[Any]],
) -> tuple[dict[int, list[Event]], dict[int, list[int]]]:
    """Events per target, each target's sorted by (sender, sequence); and per target,
    the sequence numbers of its player inputs (sent by ``GATEWAY``, so they come first)."""
    inbox: dict[int, list[Any]] = {}
    for target, sender, seq, name, data in events:
        inbox.setdefault(target, []).append((sender, seq, name, data))
    grouped, inputs = {}, {}
    for target, items in inbox.items():
        items.sort()
        grouped[target] = [
            Event(sender, name, input_args(data) if sender == GATEWAY else data)
            for sender, _seq, name, data in items
        ]
        seqs = [seq for sender, seq, _name, _data in items if sender == GATEWAY]
        if seqs:
            inputs[target] = seqs
    return grouped, inputs


def create_world(plugins: PluginSet, world: WorldParams) -> list[list[Any]]:
    """Run every plugin's world-creation hook; entity ids start at 1."""
    builder = WorldBuilder(plugins, world)
    for plugin in plugins.plugins:
        if plugin.create_world is not None:
            builder.settings = plugins.settings.get(plugin.name)
            plugin.create_world(builder)
    return builder.records


class WorkerSim:
    """A worker's working copy of its partitions: applies ``Step``, returns ``Reply``."""

    def __init__(self, worker: int, epoch: int, plugins: PluginSet, world: WorldParams) -> None:
        self.worker = worker
        self.epoch = epoch
        self.plugins = plugins
        self.world = world
        self.layout: Layout | None = None
        self.entities: dict[int, Entity] = {}
        self.members: dict[str, dict[int, Entity]] = {}
        self.ghosts: dict[int, View] = {}
        self.targets: dict[int, tuple[int, ...]] = {}
        self.dirty: set[int] = set()
        self.frozen: set[int] = set()
        self.watch: set[tuple[int, int]] = set()
        self.watch_cell = 0.0
        self._unreported_in: set[tuple[int, int]] = set()

    def record(self, entity: Entity) -> list[Any]:
        return [
            entity.id,
            entity.kind,
            entity.x,
            entity.y,
            entity.z,
            self.plugins.codecs[entity.kind].to_wire(entity.state),
        ]

    def _entity(self, record: Sequence[Any]) -> Entity:
        entity_id, kind, x, y, z, state = record
        return Entity(entity_id, kind, x, y, z, self.plugins.codecs[kind].from_wire(state))

    def _view(self, record: Sequence[Any]) -> View:
        entity_id, kind, x, y, z, state = record
        return View(entity_id, kind, x, y, z, self.plugins.codecs[kind].from_wire(state))

    def _set_layout(self, owners: dict[str, int]) -> None:
        """Adopt a new layout: re-file owned entities by leaf, recompute their ghost targets.

        The core computes the same targets from the same positions, so both
        sides agree without sending them.
        """
        self.layout = layout = Layout(self.world.size, self.world.halo, owners)
        self.members = {leaf: {} for leaf in layout.leaves_of(self.worker)}
        self.targets = {}
        for entity in self.entities.values():
            x, y = entity.x, entity.y
            leaf = layout.partition_of(x, y)
            self.members[leaf][entity.id] = entity
            if not layout.safe_rect(leaf).contains(x, y):
                targets = layout.ghost_targets(x, y, self.worker)
                if targets:
                    self.targets[entity.id] = targets

    def restore(self, restore: Restore) -> None:
        """Load a checkpoint's share (layout, owned entities, ghosts) into a fresh worker."""
        if self.entities or self.ghosts:
            raise RuntimeError("restore needs a fresh worker")
        self._set_layout(restore.layout)
        self._apply_inbound(
            Step(
                tick=restore.tick,
                epoch=self.epoch,
                ghost_upsert=restore.ghost_upsert,
                acquire=restore.acquire,
                freeze=restore.frozen,
                watch=restore.watch,
                watch_cell=restore.watch_cell,
            )
        )

    def _apply_inbound(self, step: Step) -> None:
        for entity_id in step.release:
            self._release(entity_id)
        if step.layout is not None:
            self._set_layout(step.layout)
        layout = self.layout
        if layout is None:
            raise RuntimeError("the first step must carry a layout")
        for entity_id in step.ghost_remove:
            self.ghosts.pop(entity_id, None)
        for record in step.ghost_upsert:
            self.ghosts[record[0]] = self._view(record)
        for record, targets in step.acquire:
            entity = self._entity(record)
            self.entities[entity.id] = entity
            self.members[layout.partition_of(entity.x, entity.y)][entity.id] = entity
            self.ghosts.pop(entity.id, None)
            if targets:
                self.targets[entity.id] = tuple(targets)
        self.frozen.update(step.freeze)
        self.frozen.difference_update(step.unfreeze)
        if step.watch is not None:
            self._set_watch(step.watch, step.watch_cell)

    def _set_watch(self, cells: Sequence[Sequence[int]], size: float) -> None:
        """Look where players look; anything changed unreported in a new cell goes out now."""
        watch = {(int(cx), int(cy)) for cx, cy in cells}
        added = watch - self.watch
        self.watch, self.watch_cell = watch, size
        if added:
            self._unreported_in = added

    def _report_watched(self, changed: list[int], prev: dict[int, View], reply: Reply) -> None:
        """Full records of changed entities in (or just out of) watched cells, for the views."""
        watch, dirty, size = self.watch, self.dirty, self.watch_cell
        candidates: Iterable[int] = changed
        if self._unreported_in:
            candidates = list(dirty)
            self._unreported_in = set()
        for entity_id in candidates:
            entity = self.entities.get(entity_id)
            if entity is None or entity_id not in dirty:
                continue
            before = prev.get(entity_id)
            if cell_of(entity.x, entity.y, size) in watch or (
                before is not None and cell_of(before.x, before.y, size) in watch
            ):
                reply.dirty.append(self.record(entity))
                dirty.discard(entity_id)

    def _release(self, entity_id: int) -> None:
        """Forget an owned entity that a new layout gives to another worker."""
        entity = self.entities.pop(entity_id, None)
        if entity is None:
            return  # a replacement replaying from a later checkpoint never had it
        assert self.layout is not None
        self.members[self.layout.partition_of(entity.x, entity.y)].pop(entity_id, None)
        self.targets.pop(entity_id, None)
        self.dirty.discard(entity_id)
        self.frozen.discard(entity_id)

    def step(self, step: Step) -> Reply:
        """Simulate tick ``step.tick`` for the owned entities."""
        started_cpu = time.process_time()
        reply = Reply(tick=step.tick, worker=self.worker, epoch=self.epoch)
        self._apply_inbound(step)
        layout = self.layout
        assert layout is not None
        plugins = self.plugins

        prev, index = snapshot_views(self.entities.values(), self.ghosts.values(), self.world.halo)
        ctx = Context(plugins, self.world, step.tick, index)
        ctx.worlds = {
            name: plugins.world_codecs[name].from_wire(values)
            for name, values in step.world.items()
        }
        inbox, input_seqs = group_events(step.events)
        handlers, systems, codecs = plugins.handlers, plugins.systems, plugins.codecs
        max_step = ctx.max_step
        owners, targets, dirty, worker = layout.owners, self.targets, self.dirty, self.worker
        no_events: list[Event] = []
        moves: list[tuple[Entity, str, str]] = []
        leaving: list[tuple[Entity, str]] = []
        despawned, frozen = ctx.despawned, self.frozen
        watch, changed = self.watch, []

        for leaf, members in self.members.items():
            leaf_started = time.process_time()
            rect, safe = layout.rects[leaf], layout.safe_rect(leaf)
            for entity in members.values():
                if frozen and entity.id in frozen:
                    continue
                view = prev[entity.id]
                error = run_entity(
                    entity,
                    view,
                    ctx,
                    inbox.get(entity.id, no_events),
                    handlers,
                    systems[entity.kind],
                    codecs[entity.kind],
                    max_step[entity.kind],
                    input_seqs.get(entity.id, ()),
                    reply.input_errors,
                )
                if error is not None:
                    reply.errors.append([entity.id, *error])
                    continue
                if entity.id in despawned:
                    leaving.append((entity, leaf))
                    continue
                if (
                    entity.x == view.x
                    and entity.y == view.y
                    and entity.z == view.z
                    and entity.state is view.state
                ):
                    continue
                x, y = entity.x, entity.y
                if not rect.contains(x, y):
                    new_leaf = layout.partition_of(x, y)
                    if owners[new_leaf] != worker:
                        reply.handoff.append(self.record(entity))
                        leaving.append((entity, leaf))
                        continue
                    moves.append((entity, leaf, new_leaf))
                    here = layout.safe_rect(new_leaf)
                else:
                    here = safe
                new_targets = () if here.contains(x, y) else layout.ghost_targets(x, y, worker)
                old_targets = targets.get(entity.id, ())
                if new_targets or old_targets:
                    reply.border.append([self.record(entity), list(new_targets)])
                    dirty.discard(entity.id)
                    if new_targets:
                        targets[entity.id] = new_targets
                    else:
                        del targets[entity.id]
                else:
                    dirty.add(entity.id)
                    if watch:
                        changed.append(entity.id)
            reply.cost_ms[leaf] = (time.process_time() - leaf_started) * 1000.0

        for entity, old_leaf, new_leaf in moves:
            del self.members[old_leaf][entity.id]
            self.members[new_leaf][entity.id] = entity
        for entity, leaf in leaving:
            del self.entities[entity.id]
            del self.members[leaf][entity.id]
            targets.pop(entity.id, None)
            dirty.discard(entity.id)
        reply.despawn = sorted(despawned)
        if watch:
            self._report_watched(changed, prev, reply)
        if step.checkpoint:
            reply.dirty.extend(self.record(self.entities[i]) for i in sorted(dirty))
            dirty.clear()
        reply.spawns = ctx.spawns
        reply.events = ctx.events
        reply.timers = ctx.timers
        reply.messages = ctx.messages
        reply.world_events = ctx.world_events
        reply.counts = {leaf: len(members) for leaf, members in self.members.items()}
        reply.cpu_ms = (time.process_time() - started_cpu) * 1000.0
        return reply
