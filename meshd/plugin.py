"""The plugin API: everything a game's rules are written with, in one module.

A plugin is a module exposing ``plugin = meshd.Plugin(...)``: entity kinds
(:class:`Kind`: a frozen attrs state class, systems, speed and reach), event
handlers, player input handlers, a world-creation hook and a new-player hook.
Each tick every entity's handlers and systems run with :class:`Entity` (the
entity being simulated, the only thing a system writes) and :class:`Context`
(the previous tick's neighbours, events, spawns, deterministic randomness).
``meshd`` re-exports all of it; ``docs/architecture.md`` says why a system
may read and write only what it does.

This module is longer than the others on purpose: plugin authors read it top
to bottom, so the whole contract lives here, and nothing else (loading,
flattening plugins for the hot path, running a tick) does: that is
:mod:`meshd.mesh.plugins` and :mod:`meshd.mesh.step`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import attrs
import cbor2

from meshd.common.wire import check_wire_value

if TYPE_CHECKING:
    from meshd.mesh.messages import WorldParams
    from meshd.mesh.plugins import PluginSet
    from meshd.mesh.step import SpatialIndex

__all__ = [
    "FORGET",
    "GATEWAY",
    "JOIN",
    "LEAVE",
    "Arg",
    "Context",
    "Entity",
    "Event",
    "EventHandler",
    "Kind",
    "PlayerHook",
    "Plugin",
    "PluginError",
    "ReachError",
    "System",
    "TickRng",
    "View",
    "WorldBuilder",
    "WorldHook",
    "choice",
    "first_hit",
    "flag",
    "integer",
    "list_of",
    "number",
    "takes",
    "text",
]


GATEWAY = 0
"""The sender of player inputs (entity ids start at 1)."""


JOIN, LEAVE = "join", "leave"
"""Inputs the gateway sends itself when a player connects or disconnects."""


FORGET = "forget"
"""The input a player's entity gets when an operator deletes the player's account
(``meshd accounts delete``), after its ``leave``: a plugin that handles it decides what
becomes of the entity (keep it, hand it over, despawn it); without a handler meshd
despawns the entity."""


System = Callable[["Entity", "Context"], None]


EventHandler = Callable[["Entity", "Event", "Context"], None]


WorldHook = Callable[["WorldBuilder"], None]


PlayerHook = Callable[[str, "WorldBuilder"], None]


class PluginError(Exception):
    """A plugin could not be found, loaded or validated."""


@attrs.frozen
class Kind:
    """An entity kind.

    ``state`` is a frozen attrs class whose fields hold plain values: None,
    bool, int (64 bits), finite float, str, bytes, and lists and dicts with
    string keys of those (at most 15 levels of them inside a field; a tuple
    is taken, and comes back as a list); anything else fails the entity's
    tick. Frozen does not freeze a list inside: never
    change one in place (``state.items.append``), give :func:`attrs.evolve`
    a new one (``meshd check`` finds the mistake). ``max_speed`` is in metres
    per simulated second, ``radius`` the farthest (in metres) a system of this
    kind looks from the entity's position; together they set the minimum halo.

    The state class may gain fields with defaults: stored entities load
    with the default. A field removed, renamed or given another type needs
    ``migrate``: a function from a stored state's field map to one the class
    takes (``lambda old: {"health": old.pop("hp"), **old}``), run when a
    stored entity that does not fit the class as it is loads from world.db.
    Without it such a world is refused at start, naming the kind and field.
    """

    state: type
    systems: tuple[System, ...] = ()
    max_speed: float = 0.0
    radius: float = 0.0
    migrate: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    colour: str = ""
    """How ``meshd inspect map`` draws this kind: a matplotlib colour (``"tab:red"``,
    ``"#e4572e"``); empty, the next of the map's palette."""


@attrs.frozen
class Plugin:
    """What a plugin module exports as ``plugin``."""

    name: str
    kinds: Mapping[str, Kind] = attrs.field(factory=dict)
    events: Mapping[str, EventHandler] = attrs.field(factory=dict)
    create_world: WorldHook | None = None
    settings: type | None = None
    new_player: PlayerHook | None = None
    """Called once per new player name: spawns that player's entity (exactly one)."""
    world: type | None = None
    """World-wide state of this plugin (team scores, weather, prices): a frozen attrs class
    whose fields all have defaults (a new world starts from them). Systems read it as
    ``ctx.world`` as of the previous tick and change it only through ``ctx.change_world``."""
    world_events: Mapping[str, Callable[[Any, Any], Any]] = attrs.field(factory=dict)
    """Per world event, ``reduce(world, data) -> world``: run by the core when a tick
    commits, for every ``ctx.change_world`` of that tick in order of sender, then sequence.
    One that raises (or returns something else than the world class) is skipped and logged."""
    inputs: Mapping[str, EventHandler] = attrs.field(factory=dict)
    """Input handlers by action, run on the player's entity at the next tick with the
    client's arguments as ``event.data``. A handler decorated with :func:`takes`
    gets only arguments of the declared shapes (defaults filled in): the gateway
    refuses others with ``bad_input`` naming the argument. Without a
    declaration the arguments are plain values, finite numbers, at most 8
    levels deep (the gateway checked). An exception undoes that input alone and is
    sent to the player as ``bad_input`` with its message, so name the argument in it.
    ``join`` and ``leave`` (optional) come from the gateway itself when the player
    connects and when the connection ends."""


@attrs.frozen
class Arg:
    """The shape of one argument of a player input: made by :func:`number`,
    :func:`integer`, :func:`text`, :func:`flag`, :func:`choice` or :func:`list_of`,
    declared with :func:`takes`."""

    type: str
    low: float | None = None
    high: float | None = None
    max_length: int = 0
    choices: list[Any] = attrs.field(factory=list)
    item: Arg | None = None
    required: bool = True
    default: Any = None

    def check(self, value: Any, path: str) -> Any:
        """``value`` if it has this shape (a number as a float); ``ValueError`` naming ``path``."""
        kind = type(value)
        if self.type in ("number", "integer"):
            wanted = (int,) if self.type == "integer" else (int, float)
            if kind not in wanted:
                raise ValueError(f"argument {path} must be {_A[self.type]}, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"argument {path} is {value}: numbers must be finite")
            assert self.low is not None and self.high is not None
            if not self.low <= value <= self.high:
                raise ValueError(
                    f"argument {path} must be {self.low:g} to {self.high:g}, got {value}"
                )
            return float(value) if self.type == "number" else value
        if self.type == "text":
            if kind is not str:
                raise ValueError(f"argument {path} must be text, got {value!r}")
            if len(value) > self.max_length:
                raise ValueError(f"argument {path} is longer than {self.max_length} characters")
            return value
        if self.type == "flag":
            if kind is not bool:
                raise ValueError(f"argument {path} must be true or false, got {value!r}")
            return value
        if self.type == "choice":
            if not any(type(c) is kind and c == value for c in self.choices):
                shown = ", ".join(map(repr, self.choices))
                raise ValueError(f"argument {path} must be one of {shown}, got {value!r}")
            return value
        if self.type == "list":
            if kind is not list:
                raise ValueError(f"argument {path} must be a list, got {value!r}")
            if len(value) > self.max_length:
                raise ValueError(f"argument {path} has more than {self.max_length} items")
            assert self.item is not None
            return [self.item.check(item, f"{path}[{i}]") for i, item in enumerate(value)]
        raise ValueError(f"argument {path}: unknown shape {self.type!r}")


_A = {"number": "a number", "integer": "a whole number"}
_REQUIRED: Any = object()


def _arg(type_: str, default: Any, **shape: Any) -> Arg:
    if default is _REQUIRED:
        return Arg(type_, **shape)
    arg = Arg(type_, **shape, required=False)
    return attrs.evolve(arg, default=arg.check(default, "default"))


def number(low: float, high: float, *, default: Any = _REQUIRED) -> Arg:
    """A finite number (integer or float; the handler gets a float) from ``low`` to ``high``."""
    return _arg("number", default, low=float(low), high=float(high))


def integer(low: int, high: int, *, default: Any = _REQUIRED) -> Arg:
    """A whole number from ``low`` to ``high``."""
    return _arg("integer", default, low=low, high=high)


def text(max_length: int, *, default: Any = _REQUIRED) -> Arg:
    """A string of at most ``max_length`` characters."""
    return _arg("text", default, max_length=max_length)


def flag(*, default: Any = _REQUIRED) -> Arg:
    """``true`` or ``false``."""
    return _arg("flag", default)


def choice(*choices: str | int, default: Any = _REQUIRED) -> Arg:
    """One of ``choices`` (strings or whole numbers)."""
    return _arg("choice", default, choices=list(choices))


def list_of(item: Arg, max_length: int, *, default: Any = _REQUIRED) -> Arg:
    """A list of at most ``max_length`` values, each of shape ``item``."""
    return _arg("list", default, item=item, max_length=max_length)


def takes(**args: Arg) -> Callable[[EventHandler], EventHandler]:
    """Declare an input handler's arguments, next to it::

        @takes(dx=number(-1.0, 1.0, default=0.0), dy=number(-1.0, 1.0, default=0.0))
        def on_move(me, event, ctx): ...

    The gateway then refuses an input with a missing, unexpected or
    misshapen argument (``bad_input`` naming it), before it reaches the
    world: the handler only ever sees valid arguments, defaults filled in.
    """

    def declare(handler: EventHandler) -> EventHandler:
        handler.meshd_args = dict(args)  # type: ignore[attr-defined]
        return handler

    return declare


def check_input(shape: Mapping[str, Arg], args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` as the handler declared by :func:`takes` gets them; ``ValueError`` naming
    the argument otherwise."""
    unexpected = sorted(set(args) - set(shape))
    if unexpected:
        takes_ = ", ".join(shape) or "no arguments"
        raise ValueError(f"unexpected argument {unexpected[0]} (it takes {takes_})")
    checked = {}
    for name, arg in shape.items():
        if name in args:
            checked[name] = arg.check(args[name], name)
        elif arg.required:
            raise ValueError(f"argument {name} is missing")
        else:
            checked[name] = arg.default
    return checked


class View(NamedTuple):
    """A read-only snapshot of an entity as it was at the end of the previous tick."""

    id: int
    kind: str
    x: float
    y: float
    z: float
    state: Any


class Event(NamedTuple):
    """A message to an entity, sent during the previous tick."""

    sender: int
    name: str
    data: Any


class Entity:
    """The entity being simulated: systems assign ``x``, ``y``, ``z`` and ``state``."""

    __slots__ = ("id", "kind", "state", "x", "y", "z")

    def __init__(self, entity_id: int, kind: str, x: float, y: float, z: float, state: Any):
        self.id = entity_id
        self.kind = kind
        self.x = x
        self.y = y
        self.z = z
        self.state = state

    def __repr__(self) -> str:
        return f"Entity({self.id}, {self.kind!r}, x={self.x:.3f}, y={self.y:.3f}, {self.state!r})"


class ReachError(Exception):
    """A system looked farther than its kind declared (the halo would not cover it)."""


_MASK64 = (1 << 64) - 1
MAX_MESSAGE = 4096
"""Bytes a message to players (``Context.tell``/``announce``) may take, encoded."""
MAX_AFTER = 1 << 31
"""The farthest a timer (``Context.send(..., after=...)``) may reach, in ticks."""


class TickRng(random.Random):
    """``random.Random`` driven by splitmix64.

    Seeding a Mersenne Twister costs several microseconds, too much to do
    for every entity on every tick; splitmix64 seeds in one assignment and
    keeps the whole ``random.Random`` API (uniform, choice, gauss, ...).
    """

    _state: int

    def seed(self, a: Any = None, version: int = 2) -> None:
        self._state = int(a or 0) & _MASK64

    def _next64(self) -> int:
        self._state = state = (self._state + 0x9E3779B97F4A7C15) & _MASK64
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK64
        return state ^ (state >> 31)

    def random(self) -> float:
        return (self._next64() >> 11) * (1.0 / 9007199254740992.0)

    def getrandbits(self, k: int) -> int:
        bits, have = 0, 0
        while have < k:
            bits = (bits << 64) | self._next64()
            have += 64
        return bits >> (have - k)

    def getstate(self) -> Any:
        return self._state

    def setstate(self, state: Any) -> None:
        self._state = state


def seed_for(seed: int, tick: int, entity_id: int) -> int:
    """The rng seed of one entity on one tick."""
    mixed = (seed * 0x9E3779B97F4A7C15 + tick * 0xC2B2AE3D27D4EB4F) & _MASK64
    return (mixed ^ (entity_id * 0x165667B19E3779F9)) & _MASK64


class Context:
    """What a system or event handler may do besides changing its own entity.

    One Context serves a whole tick; the core of the loop points it at each
    entity in turn.
    """

    def __init__(self, plugins: PluginSet, world: WorldParams, tick: int, index: SpatialIndex):
        self.tick = tick
        """The tick being simulated (the first tick of a new world is 1)."""
        self.dt = world.dt
        """Simulated seconds per tick (``world.dt``), whatever the wall-clock rate."""
        self.world_size = world.size
        """The world is the square ``[0, world_size)`` x ``[0, world_size)``, in metres."""
        self.settings: Any = None
        """This entity's plugin's settings (its ``Plugin.settings`` class, ``[plugins.NAME]``)."""
        self.events: list[list[Any]] = []
        self.timers: list[list[Any]] = []
        """Events for a later tick than the next: ``[target, sender, seq, name, data, due]``."""
        self.spawns: list[list[Any]] = []
        self.messages: list[list[Any]] = []
        """For players: ``[sender, seq, player or 0, x, y, radius or -1, data]``."""
        self.world_events: list[list[Any]] = []
        """``[sender, seq, plugin, event, data]`` for the core to reduce at commit."""
        self.worlds: dict[str, Any] = {}
        """Each plugin's world state as of the previous tick (set by the worker)."""
        self.despawned: set[int] = set()
        self._plugins = plugins
        self._seed = world.seed
        self._index = index
        self._reach = {kind: plugins.reach(kind, world.dt) for kind in plugins.kinds}
        self.max_step = {
            kind: spec.max_speed * world.dt * (1 + 1e-9) for kind, spec in plugins.kinds.items()
        }
        self._kinds: dict[str, frozenset[str]] = {}
        """``nearby``'s single kinds, checked once a tick."""
        self._me: Entity | None = None
        self._prev: View | None = None
        self._rng: TickRng | None = None
        self._sent = 0
        self._spawned = 0

    def begin(self, entity: Entity, prev: View) -> None:
        self._me, self._prev, self._rng = entity, prev, None
        self._sent = self._spawned = 0
        self.settings = self._plugins.kind_settings[entity.kind]

    def _emitted(self) -> tuple[list[list[Any]], ...]:
        return self.events, self.timers, self.spawns, self.messages, self.world_events

    def mark(self) -> tuple[int, ...]:
        """How much was emitted so far this tick, for :meth:`withdraw`."""
        return tuple(map(len, self._emitted()))

    def withdraw(self, mark: tuple[int, ...]) -> None:
        """Take back everything emitted since ``mark`` (events, timers, spawns, messages,
        world events): what a failed entity or input sent never happened."""
        for emitted, length in zip(self._emitted(), mark, strict=True):
            del emitted[length:]

    def save(self) -> tuple[Any, int, int]:
        """What :meth:`restore` needs to undo one player input's randomness and emissions."""
        return (None if self._rng is None else self._rng.getstate()), self._sent, self._spawned

    def restore(self, saved: tuple[Any, int, int]) -> None:
        rng_state, self._sent, self._spawned = saved
        if rng_state is None:
            self._rng = None
        else:
            assert self._rng is not None
            self._rng.setstate(rng_state)

    @property
    def rng(self) -> TickRng:
        """Deterministic randomness for this entity on this tick."""
        if self._rng is None:
            assert self._me is not None
            self._rng = TickRng(seed_for(self._seed, self.tick, self._me.id))
        return self._rng

    def nearby(
        self,
        radius: float,
        kind: str | Iterable[str] | None = None,
        *,
        x: float | None = None,
        y: float | None = None,
    ) -> list[View]:
        """Other entities within ``radius`` of a point (default: this entity's last position),
        sorted by id; of one kind, of any of several (``("mug", "bottle")``) or of any.

        Positions and states are those at the end of the previous tick.
        Raises :class:`ReachError` beyond the kind's declared reach and
        ``KeyError`` for a kind no plugin defines.
        """
        if kind is None:
            kinds = None
        elif isinstance(kind, str):
            kinds = self._kinds.get(kind) or self._kind_set(kind)
        else:
            kinds = self._kind_set(kind)
        me, prev = self._me, self._prev
        assert me is not None and prev is not None
        cx = prev.x if x is None else x
        cy = prev.y if y is None else y
        if math.hypot(cx - prev.x, cy - prev.y) + radius > self._reach[me.kind] * (1 + 1e-9) + 1e-9:
            raise ReachError(
                f"{me.kind} {me.id} looked {radius} m around ({cx:.2f}, {cy:.2f}), beyond its "
                f"declared reach of {self._reach[me.kind]} m (raise Kind.radius)"
            )
        return self._index.query(cx, cy, radius, kinds, me.id)

    def _kind_set(self, kind: str | Iterable[str]) -> frozenset[str]:
        kinds = frozenset((kind,) if isinstance(kind, str) else kind)
        unknown = sorted(kinds - self._plugins.kinds.keys())
        if unknown:
            raise KeyError(f"no plugin defines entity kind(s) {', '.join(map(repr, unknown))}")
        if isinstance(kind, str):
            self._kinds[kind] = kinds
        return kinds

    def send(self, target: int, name: str, data: Any = None, *, after: int = 1) -> None:
        """Deliver event ``name`` to entity ``target`` ``after`` ticks from now (the next tick).

        A timer: ``ctx.send(me.id, "respawn", after=100)`` arrives 100 ticks
        later; the core keeps it (in world.db too), so it survives a worker's
        failure, a re-layout and a restart. It is dropped if its target no
        longer exists. Delivered events are sorted by sender; from one sender,
        timers first (the earliest sent first), then this tick's events in the
        order they were sent.
        """
        me = self._me
        assert me is not None
        if name not in self._plugins.handlers:
            raise KeyError(f"no plugin handles event {name!r}")
        if type(after) is not int or not 1 <= after <= MAX_AFTER:
            raise ValueError(f"after must be a whole number of ticks, 1 to {MAX_AFTER}")
        check_wire_value(data)
        if after == 1:
            self.events.append([int(target), me.id, self._sent, name, data])
        else:
            self.timers.append([int(target), me.id, self._sent, name, data, self.tick + after])
        self._sent += 1

    @property
    def world(self) -> Any:
        """This entity's plugin's world state as of the previous tick (None if it has none)."""
        assert self._me is not None
        return self.worlds.get(self._plugins.kind_plugin[self._me.kind])

    def change_world(self, event: str, data: Any = None) -> None:
        """Ask for world event ``event`` of this entity's plugin: reduced when the tick
        commits (every entity's, by sender then sequence), seen by all from the next tick."""
        me = self._me
        assert me is not None
        plugin = self._plugins.kind_plugin[me.kind]
        if (plugin, event) not in self._plugins.world_reducers:
            raise KeyError(f"plugin {plugin!r} has no world event {event!r}")
        check_wire_value(data)
        self.world_events.append([me.id, self._sent, plugin, event, data])
        self._sent += 1

    def tell(self, player: int, data: Any) -> None:
        """Send ``data`` to the player whose entity is ``player``, once this tick commits.

        ``data``: plain values (as in a state), at most ``MAX_MESSAGE`` bytes
        encoded. It reaches the player's client as a ``Message`` (not stored;
        a player who is not connected misses it).
        """
        if type(player) is not int or player < 1:
            raise ValueError(f"player must be a player's entity id, got {player!r}")
        self._message(player, 0.0, 0.0, -1.0, data)

    def announce(
        self,
        data: Any,
        *,
        radius: float | None = None,
        x: float | None = None,
        y: float | None = None,
    ) -> None:
        """Send ``data`` to every connected player, or to those whose entity is within
        ``radius`` of (``x``, ``y``) (default: this entity's position), once this tick commits."""
        me = self._me
        assert me is not None
        if radius is not None and not (math.isfinite(radius) and radius >= 0):
            raise ValueError(f"radius must be a finite number >= 0, got {radius}")
        cx = me.x if x is None else float(x)
        cy = me.y if y is None else float(y)
        if not (math.isfinite(cx) and math.isfinite(cy)):
            raise ValueError(f"({cx}, {cy}) is not a finite point")
        self._message(0, cx, cy, -1.0 if radius is None else float(radius), data)

    def _message(self, player: int, x: float, y: float, radius: float, data: Any) -> None:
        me = self._me
        assert me is not None
        check_wire_value(data)
        size = len(cbor2.dumps(data))
        if size > MAX_MESSAGE:
            raise ValueError(f"a message is at most {MAX_MESSAGE} bytes encoded, this is {size}")
        self.messages.append([me.id, self._sent, player, x, y, radius, data])
        self._sent += 1

    def spawn(self, kind: str, x: float, y: float, z: float = 0.0, state: Any = None) -> None:
        """Create an entity at the end of this tick; its id is assigned by the core."""
        me = self._me
        assert me is not None
        codec = self._plugins.codecs.get(kind)
        if codec is None:
            raise KeyError(f"unknown entity kind {kind!r}")
        if state is None:
            state = codec.cls()
        elif type(state) is not codec.cls:
            raise TypeError(f"state of a {kind} must be a {codec.cls.__name__}")
        values = codec.to_wire(state)
        check_wire_value(values)
        x, y, z = finite_position(x, y, z, self.world_size)
        self.spawns.append([me.id, self._spawned, kind, x, y, z, values])
        self._spawned += 1

    def despawn(self) -> None:
        """Remove this entity at the end of this tick."""
        assert self._me is not None
        self.despawned.add(self._me.id)


class WorldBuilder:
    """Handed to ``Plugin.create_world`` to populate a new world, and to
    ``Plugin.new_player`` (between ticks) to spawn a new player's entity."""

    def __init__(
        self, plugins: PluginSet, world: WorldParams, *, first_id: int = 1, tick: int = 0
    ) -> None:
        self.size = world.size
        """The world's side in metres (positions are clamped into ``[0, size)``)."""
        self.rng = TickRng(seed_for(world.seed, tick, 0 if tick == 0 else first_id))
        """Deterministic randomness: the same seed and plugins make the same world."""
        self.settings: Any = None
        """The plugin's settings (its ``Plugin.settings`` class), as for systems."""
        self.records: list[list[Any]] = []
        self._plugins = plugins
        self._first_id = first_id

    def spawn(self, kind: str, x: float, y: float, z: float = 0.0, state: Any = None) -> int:
        codec = self._plugins.codecs.get(kind)
        if codec is None:
            raise KeyError(f"unknown entity kind {kind!r}")
        entity_id = self._first_id + len(self.records)
        state = codec.cls() if state is None else state
        values = codec.to_wire(state)
        check_wire_value(values)
        self.records.append([entity_id, kind, *finite_position(x, y, z, self.size), values])
        return entity_id


def clamp(value: float, size: float) -> float:
    """Clamp a coordinate into ``[0, size)``; NaN goes to 0."""
    if not value >= 0.0:  # also catches NaN
        return 0.0
    if value >= size:
        return math.nextafter(size, 0.0)
    return value


def finite_position(x: float, y: float, z: float, size: float) -> tuple[float, float, float]:
    """``(x, y, z)`` as floats with x and y clamped into the world; ``ValueError`` if not finite."""
    x, y, z = float(x), float(y), float(z)
    if not (math.isfinite(x) and math.isfinite(y) and math.isfinite(z)):
        raise ValueError(f"position ({x}, {y}, {z}) is not finite")
    return clamp(x, size), clamp(y, size), z


def first_hit(
    x0: float,
    y0: float,
    x1: float,
    y1: float,
    candidates: Iterable[View],
    radius: float,
    skip: int | None = None,
) -> int | None:
    """The id of the candidate first touched by a point moving from (x0, y0) to (x1, y1).

    A candidate is touched when it comes within ``radius`` of the segment;
    ties along the segment go to the lowest id, so the answer does not depend
    on the order of ``candidates``. ``skip`` excludes one id (the shooter).
    """
    dx, dy = x1 - x0, y1 - y0
    length2 = dx * dx + dy * dy or 1e-12
    best: tuple[float, int] | None = None
    for other in candidates:
        if other.id == skip:
            continue
        t = max(0.0, min(1.0, ((other.x - x0) * dx + (other.y - y0) * dy) / length2))
        px, py = x0 + t * dx - other.x, y0 + t * dy - other.y
        if px * px + py * py <= radius * radius and (best is None or (t, other.id) < best):
            best = (t, other.id)
    return None if best is None else best[1]
