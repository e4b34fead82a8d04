"""Messages between the core and its workers (pure data: attrs classes, converted with cattrs).

Bulk per-entity data travels as plain lists, not attrs objects, so that one
message costs one cattrs call however many entities it carries:

- record: ``[id, kind, x, y, z, state]`` with ``state`` the kind's field values in order
- acquire / border item: ``[record, ghost_targets]``
- event: ``[target, sender, seq, name, data]``
- spawn: ``[parent, seq, kind, x, y, z, state]``
- error: ``[entity_id, where, text]`` (``where``: the plugin function and line, or "")
- input error: ``[entity_id, seq, where, text]`` (``seq``: the input event's sequence)
"""

from __future__ import annotations

from typing import Any

import attrs

from meshd.common.wire import Bulk


@attrs.frozen
class WorldParams:
    size: float
    seed: int
    dt: float
    halo: float


@attrs.define
class Hello:
    """Child process -> core, first frame: proves the process was started by this core.

    ``role`` says what it was started as (``"worker"``, or ``"gateway"`` for
    the players' gateway processes); ``worker`` is its slot in that role.
    """

    worker: int
    epoch: int
    token: str
    pid: int
    role: str = "worker"


@attrs.define
class Init:
    """Core -> worker: what world to simulate and which plugins to load."""

    world: WorldParams
    plugins: list[str]
    plugin_dirs: list[str]
    settings: dict[str, dict[str, Any]]
    strict: bool = False
    """Run the plugins under :mod:`meshd.mesh.guards` (``mesh.strict``)."""


@attrs.define
class Ready:
    """Worker -> core: plugins loaded, ready to step."""

    worker: int
    code: str = ""
    """The digest of the plugin code it loaded (:meth:`PluginSet.code_digest`)."""


@attrs.define
class Assign:
    """Core -> worker: from now on you are worker ``worker``, incarnation ``epoch``.

    Sent right after ``Ready`` to a worker started for a slot, or later to
    a warm spare that takes over a failed slot.
    """

    worker: int
    epoch: int


@attrs.define
class Step:
    """Core -> worker: simulate tick ``tick``.

    Applied in this order: releases (owned entities handed to another
    worker by a new layout), the new layout, ghost removals, ghost upserts,
    acquisitions, freezes (quarantined entities stop running), unfreezes
    (an operator released them), then events are delivered during the tick.
    With ``checkpoint`` the reply carries every entity changed since the last
    checkpoint, so the core then holds the whole world at ``tick``.
    """

    tick: int
    epoch: int
    layout: dict[str, int] | None = None
    release: Bulk = attrs.field(factory=list)
    ghost_remove: Bulk = attrs.field(factory=list)
    ghost_upsert: Bulk = attrs.field(factory=list)
    acquire: Bulk = attrs.field(factory=list)
    events: Bulk = attrs.field(factory=list)
    freeze: Bulk = attrs.field(factory=list)
    unfreeze: Bulk = attrs.field(factory=list)
    checkpoint: bool = False
    world: dict[str, Bulk] = attrs.field(factory=dict)
    """Each plugin's world state as of the previous tick (wire values), in every step."""
    watch: Bulk | None = None
    """When set: the cells (``[cx, cy]``, side ``watch_cell``) where players look; every
    change there is reported in ``Reply.dirty`` on the tick it happens."""
    watch_cell: float = 0.0


@attrs.define
class Restore:
    """Core -> a replacement worker: the failed worker's state at checkpoint ``tick``.

    The core then replays every ``Step`` the failed worker received since
    that checkpoint; the simulation being deterministic, the replacement
    ends in exactly the failed worker's state.
    """

    tick: int
    layout: dict[str, int]
    acquire: Bulk = attrs.field(factory=list)
    ghost_upsert: Bulk = attrs.field(factory=list)
    frozen: Bulk = attrs.field(factory=list)
    watch: Bulk = attrs.field(factory=list)
    watch_cell: float = 0.0


@attrs.define
class Reply:
    """Worker -> core: the outcome of one ``Step``.

    ``border`` holds changed entities that some other worker must see as a
    ghost (or no longer see); ``handoff`` the entities that left this
    worker's partitions; ``dirty`` (checkpoints only) every other entity
    changed since the last checkpoint. ``errors`` are entities whose tick
    failed (they kept their previous state); ``input_errors`` player inputs
    that failed on their own (undone; the entity ticked on). ``counts`` and
    ``cost_ms`` are per partition.
    """

    tick: int
    worker: int
    epoch: int
    border: Bulk = attrs.field(factory=list)
    handoff: Bulk = attrs.field(factory=list)
    despawn: Bulk = attrs.field(factory=list)
    spawns: Bulk = attrs.field(factory=list)
    events: Bulk = attrs.field(factory=list)
    dirty: Bulk = attrs.field(factory=list)
    errors: Bulk = attrs.field(factory=list)
    input_errors: Bulk = attrs.field(factory=list)
    timers: Bulk = attrs.field(factory=list)
    """Events sent for a later tick: ``[target, sender, seq, name, data, due tick]``."""
    messages: Bulk = attrs.field(factory=list)
    """For players (``Context.tell``, ``announce``): ``[sender, seq, player, x, y, radius,
    data]``."""
    world_events: Bulk = attrs.field(factory=list)
    """``ctx.change_world`` of this tick: ``[sender, seq, plugin, event, data]``."""
    hazards: Bulk = attrs.field(factory=list)
    """Strict mode: ``[what, where, count]`` the guards noted since the last reply."""
    counts: dict[str, int] = attrs.field(factory=dict)
    cost_ms: dict[str, float] = attrs.field(factory=dict)
    cpu_ms: float = 0.0


@attrs.define
class Fatal:
    """Either side: an unrecoverable error, sent before closing the link."""

    message: str
