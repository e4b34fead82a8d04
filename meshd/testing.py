"""In-process worlds for plugin tests: ``meshd.testing`` (public).

A plugin's rules tested with pytest, without a daemon::

    from meshd.testing import World, assert_deterministic

    def test_a_player_walks_east() -> None:
        world = World(["tavern"], dirs=["plugins"], settings={"tavern": {"npcs": 0}})
        ann = world.add_player("ann")
        x = world.entity(ann).x
        world.send(ann, "move", {"dx": 1.0, "dy": 0.0})
        world.step(10)
        assert world.entity(ann).x > x

    def test_the_tavern_is_deterministic() -> None:
        assert_deterministic(["tavern"], dirs=["plugins"], settings={"tavern": {"npcs": 200}})

:class:`World` runs meshd's own tick pipeline and workers' code
(:mod:`meshd.mesh.inprocess`): the same rules, inputs and failures as
``meshd serve``, in one process, with no sockets or database.
:func:`assert_deterministic` is ``meshd check`` as one assertion.

This module sits above the operator's surface (it uses ``meshd check``);
nothing in meshd imports it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from meshd.common.wire import CONVERTER, compact_args
from meshd.mesh.inprocess import InProcessMesh, new_world, records_digest
from meshd.mesh.layout import Layout
from meshd.mesh.messages import WorldParams
from meshd.mesh.plugins import INPUT_PREFIX, find_plugin, plugin_set
from meshd.ops.check import DEFAULT_TICKS, WorldSpec, check, format_report
from meshd.players.protocol import check_args
from meshd.plugin import (
    FORGET,
    GATEWAY,
    JOIN,
    LEAVE,
    Plugin,
    PluginError,
    View,
    WorldBuilder,
    check_input,
)

__all__ = ["Failure", "PlayerMessage", "World", "assert_deterministic"]


@attrs.frozen
class Failure:
    """A system, handler or player input raised: the entity's tick (or that input) was undone."""

    tick: int
    entity: int
    where: str
    """The plugin function and line that failed ("" when meshd refused the outcome)."""
    error: str
    input: bool
    """True for a player input (undone alone), False for the entity's whole tick."""


@attrs.frozen
class PlayerMessage:
    """A message the rules sent to players (``Context.tell``/``announce``) at ``tick``."""

    tick: int
    sender: int
    player: int | None
    """The one player told (None: an announcement)."""
    x: float
    y: float
    radius: float | None
    """An announcement to those within ``radius`` of (x, y); None: to everyone."""
    data: Any


class World:
    """A world of the given plugins, stepped tick by tick in this process.

    ``plugins``: :class:`~meshd.Plugin` objects, or names found in ``dirs``
    (then the installed plugins); ``settings``: plain values per plugin name,
    as in ``[plugins.NAME]``. ``halo`` defaults to what the kinds need;
    ``workers`` > 1 splits the world over that many in-process workers.
    """

    def __init__(
        self,
        plugins: Sequence[Plugin | str],
        *,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
        dirs: Sequence[str | Path] = (),
        size: float = 100.0,
        seed: int = 1,
        dt: float = 0.05,
        halo: float | None = None,
        workers: int = 1,
    ) -> None:
        folders = [Path(folder) for folder in dirs]
        loaded = [p if isinstance(p, Plugin) else find_plugin(p, folders) for p in plugins]
        self.plugins = plugin_set(loaded, settings or {}, CONVERTER)
        need, _kind = self.plugins.required_halo(dt)
        self.world = WorldParams(size=size, seed=seed, dt=dt, halo=need if halo is None else halo)
        grid = 1 << max(0, workers - 1).bit_length()
        layout = Layout.grid(size, self.world.halo, grid, workers)
        self._mesh = InProcessMesh(
            self.plugins, self.world, layout, new_world(self.plugins, self.world)
        )
        self._inputs: list[list[Any]] = []
        self._seq = 0
        self.failures: list[Failure] = []
        """Everything that raised so far, oldest first."""
        self.messages: list[PlayerMessage] = []
        """What the rules sent to players so far, oldest first (in the order clients get it)."""

    @property
    def tick(self) -> int:
        """The last tick stepped (0 before the first)."""
        return self._mesh.replication.tick

    def add_player(self, name: str) -> int:
        """A new player's entity, made by the plugins' ``new_player`` hook; it joins next tick."""
        plugin = self.plugins.new_player
        if plugin is None or plugin.new_player is None:
            raise PluginError("no loaded plugin defines new_player")
        repl = self._mesh.replication
        builder = WorldBuilder(self.plugins, self.world, first_id=repl.next_id, tick=self.tick + 1)
        builder.settings = self.plugins.settings.get(plugin.name)
        plugin.new_player(name, builder)
        if len(builder.records) != 1:
            raise PluginError(f"new_player spawned {len(builder.records)} entities, not one")
        repl.add_entity(builder.records[0])
        if self.plugins.accepts(JOIN):
            self._inputs.append([builder.records[0][0], JOIN, {}])
        return builder.records[0][0]

    def leave(self, entity: int) -> None:
        """The player's connection ends: its ``leave`` input, next tick (if a plugin takes it)."""
        if self.plugins.accepts(LEAVE):
            self._inputs.append([entity, LEAVE, {}])

    def forget(self, entity: int) -> None:
        """An operator deleted the player's account: its ``forget`` input, next tick (the
        plugin's handler decides; without one, meshd despawns the entity)."""
        self._inputs.append([entity, FORGET, {}])

    def send(self, entity: int, action: str, args: Mapping[str, Any] | None = None) -> None:
        """A player input for the next tick, checked as the gateway checks it.

        Raises ``KeyError`` for an action no plugin handles and ``ValueError``
        for arguments a client could not send or its handler did not declare
        (``meshd.takes``: the message the player would get).
        """
        if not self.plugins.accepts(action):
            raise KeyError(f"no plugin handles input {action!r}")
        args = dict(args or {})
        for name, value in args.items():
            check_args(value, name, 1)
        shape = self.plugins.input_shapes.get(action)
        if shape is not None:
            args = check_input(shape, args)
        self._inputs.append([entity, action, compact_args(args)])  # as a gateway sends it

    def step(self, ticks: int = 1) -> None:
        """Run ``ticks`` ticks; the queued inputs go into the first."""
        for _ in range(ticks):
            # As the core orders them: by entity, then in the order they were sent.
            inputs, self._inputs = sorted(self._inputs, key=lambda item: item[0]), []
            events = []
            for entity, action, args in inputs:
                self._seq += 1
                events.append([entity, GATEWAY, self._seq, INPUT_PREFIX + action, args])
            report = self._mesh.tick(inputs=([], events))
            self.failures += [
                Failure(self.tick, entity, where, error, False)
                for _worker, entity, where, error in report.errors
            ]
            self.failures += [
                Failure(self.tick, entity, where, error, True)
                for entity, _seq, where, error in report.input_errors
            ]
            self.messages += [
                PlayerMessage(
                    self.tick, sender, player or None, x, y, None if radius < 0 else radius, data
                )
                for sender, _seq, player, x, y, radius, data in report.messages
            ]
            self.failures += [
                Failure(self.tick, sender, f"{event}: {where}", error, False)
                for sender, event, where, error in report.world_errors
            ]

    def entity(self, entity_id: int) -> View | None:
        """Entity ``entity_id`` as of the last tick (None if it does not exist)."""
        record = self._mesh.records().get(entity_id)
        return None if record is None else self._view(record)

    def entities(self, kind: str | None = None) -> list[View]:
        """Every entity (of ``kind``), by id."""
        records = self._mesh.records()
        return [
            self._view(records[entity_id])
            for entity_id in sorted(records)
            if kind is None or records[entity_id][1] == kind
        ]

    def worker_of(self, entity_id: int) -> int:
        """The worker that simulates entity ``entity_id`` now (which one depends on
        ``workers`` and where the entity is; a plugin must not care, a test may).
        Raises :class:`KeyError` if there is no such entity."""
        return self._mesh.replication.owner[entity_id]

    def world_state(self, plugin: str) -> Any:
        """``plugin``'s world state as of the last tick (its ``Plugin.world`` class)."""
        codec = self.plugins.world_codecs[plugin]
        return codec.from_wire(self._mesh.replication.world_state[plugin])

    def digest(self) -> str:
        """A digest of every entity and the world state: equal digests, equal worlds."""
        return records_digest(self._mesh.records(), self._mesh.replication.world_fields())

    def _view(self, record: list[Any]) -> View:
        entity_id, kind, x, y, z, state = record
        return View(entity_id, kind, x, y, z, self.plugins.codecs[kind].from_wire(state))


def assert_deterministic(
    plugins: Sequence[str],
    *,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    dirs: Sequence[str | Path] = (),
    size: float = 100.0,
    seed: int = 1,
    dt: float = 0.05,
    halo: float | None = None,
    ticks: int = DEFAULT_TICKS,
) -> None:
    """``meshd check`` on these plugins: AssertionError with its report if any way differs.

    The plugins are named (found in ``dirs``, then installed): each way runs
    in its own process.
    """
    if halo is None:
        world = World(plugins, settings=settings, dirs=dirs, size=size, seed=seed, dt=dt)
        halo = world.world.halo
    spec = WorldSpec(
        plugins=list(plugins),
        dirs=[str(Path(folder).resolve()) for folder in dirs],
        settings={name: dict(values) for name, values in (settings or {}).items()},
        size=size,
        seed=seed,
        dt=dt,
        halo=halo,
    )
    report = check(spec, ticks)
    if not report.same:
        raise AssertionError("\n".join(format_report(report)))
