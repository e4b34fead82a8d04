"""Plugin discovery and the loaded plugins' tables (pure, apart from importing plugin files).

Plugins (see :mod:`meshd.plugin`) are named in ``meshd.toml`` and found in
the plugin folders or through the ``meshd.plugins`` entry-point group. The
core and every worker load the same plugins into a :class:`PluginSet`, which
flattens them into the tables the hot path uses: a tuple of systems per kind
and one handler per event name, so a tick is plain function calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import math
import operator
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import attrs
import cattrs

from meshd.common.config import Config, ConfigError
from meshd.common.wire import CONVERTER
from meshd.plugin import (
    FORGET,
    Arg,
    Context,
    Entity,
    Event,
    EventHandler,
    Kind,
    Plugin,
    PluginError,
    System,
)

INPUT_PREFIX = "input:"
"""Player inputs travel as events named ``input:<action>``, sent by ``meshd.plugin.GATEWAY``."""

ENTRY_POINT_GROUP = "meshd.plugins"


@attrs.frozen
class KindCodec:
    """Converts one kind's state between its attrs class, a wire tuple and a dict."""

    cls: type
    fields: tuple[str, ...]
    _getter: Callable[[Any], Any]
    migrate: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    """The kind's migration of stored states that do not fit the class (``Kind.migrate``)."""

    @classmethod
    def for_kind(cls, kind: Kind) -> KindCodec:
        state_cls = kind.state
        names = tuple(field.name for field in attrs.fields(state_cls))
        if not names:
            getter: Callable[[Any], Any] = lambda _state: ()  # noqa: E731
        elif len(names) == 1:
            single = operator.attrgetter(names[0])
            getter = lambda state: (single(state),)  # noqa: E731
        else:
            getter = operator.attrgetter(*names)
        return cls(state_cls, names, getter, kind.migrate)

    @property
    def signature(self) -> list[list[str]]:
        """The state class's fields and their declared types (stored with the world): states
        stored under a class with the same signature are restored exactly as they were."""
        return [[field.name, str(field.type)] for field in attrs.fields(self.cls)]

    def to_wire(self, state: Any) -> tuple[Any, ...]:
        return self._getter(state)

    def from_wire(self, values: Sequence[Any]) -> Any:
        return self.cls(*values)

    def to_dict(self, values: Sequence[Any]) -> dict[str, Any]:
        return dict(zip(self.fields, values, strict=True))

    def from_dict(self, data: Mapping[str, Any], converter: cattrs.Converter) -> tuple[Any, ...]:
        """Validate stored or user data (missing fields take their defaults)."""
        return self.to_wire(converter.structure(dict(data), self.cls))


def despawn_forgotten(me: Entity, event: Event, ctx: Context) -> None:
    """``forget`` where no plugin handles it: the deleted player's entity leaves the world."""
    ctx.despawn()


def _check_frozen(kind_name: str, cls: type) -> None:
    if not attrs.has(cls):
        raise PluginError(f"kind {kind_name!r}: state must be an attrs class, got {cls!r}")
    if cls.__setattr__ is object.__setattr__:
        raise PluginError(
            f"kind {kind_name!r}: state class {cls.__name__} must be frozen (@attrs.frozen): "
            "systems read the previous tick's state while writing the next"
        )


@attrs.define(eq=False)
class PluginSet:
    """All loaded plugins, flattened for the hot path."""

    plugins: list[Plugin]
    settings: dict[str, Any]
    kinds: dict[str, Kind] = attrs.field(init=False)
    codecs: dict[str, KindCodec] = attrs.field(init=False)
    systems: dict[str, tuple[System, ...]] = attrs.field(init=False)
    handlers: dict[str, EventHandler] = attrs.field(init=False)
    kind_settings: dict[str, Any] = attrs.field(init=False)
    new_player: Plugin | None = attrs.field(init=False)
    """The plugin that creates player entities, if any."""
    input_shapes: dict[str, dict[str, Arg]] = attrs.field(init=False)
    """Per action, the arguments its handler declared with ``meshd.takes``."""
    kind_plugin: dict[str, str] = attrs.field(init=False)
    """The plugin that defines each kind."""
    world_codecs: dict[str, KindCodec] = attrs.field(init=False)
    """Per plugin with world state, its codec."""
    world_reducers: dict[tuple[str, str], Callable[[Any, Any], Any]] = attrs.field(init=False)
    """(plugin, world event) -> its reducer."""

    def __attrs_post_init__(self) -> None:
        self.kinds, self.handlers, self.kind_settings = {}, {}, {}
        for plugin in self.plugins:
            for name, kind in plugin.kinds.items():
                if name in self.kinds:
                    raise PluginError(f"kind {name!r} is defined by two plugins")
                _check_frozen(name, kind.state)
                self.kinds[name] = kind
                self.kind_settings[name] = self.settings.get(plugin.name)
            named = [*plugin.events.items()]
            named += [(INPUT_PREFIX + action, handler) for action, handler in plugin.inputs.items()]
            for event, handler in named:
                if event in self.handlers:
                    raise PluginError(f"event {event!r} is handled by two plugins")
                self.handlers[event] = handler
        # A deleted player's entity leaves the world, unless a plugin decides otherwise.
        self.handlers.setdefault(INPUT_PREFIX + FORGET, despawn_forgotten)
        with_players = [plugin for plugin in self.plugins if plugin.new_player is not None]
        if len(with_players) > 1:
            names = [plugin.name for plugin in with_players]
            raise PluginError(f"only one plugin may define new_player, got {names}")
        self.new_player = with_players[0] if with_players else None
        self.codecs = {name: KindCodec.for_kind(kind) for name, kind in self.kinds.items()}
        self.systems = {name: tuple(kind.systems) for name, kind in self.kinds.items()}
        self.kind_plugin = {kind: p.name for p in self.plugins for kind in p.kinds}
        self.world_codecs, self.world_reducers = {}, {}
        for plugin in self.plugins:
            if plugin.world is not None:
                _check_frozen(f"{plugin.name} world", plugin.world)
                if any(f.default is attrs.NOTHING for f in attrs.fields(plugin.world)):
                    raise PluginError(
                        f"plugin {plugin.name!r}: every field of its world state needs a default"
                    )
                self.world_codecs[plugin.name] = KindCodec.for_kind(Kind(plugin.world))
            elif plugin.world_events:
                raise PluginError(f"plugin {plugin.name!r} has world_events but no world class")
            for event, reducer in plugin.world_events.items():
                self.world_reducers[(plugin.name, event)] = reducer
        self.input_shapes = {
            action: dict(handler.meshd_args)
            for plugin in self.plugins
            for action, handler in plugin.inputs.items()
            if hasattr(handler, "meshd_args")
        }

    def required_halo(self, dt: float) -> tuple[float, str | None]:
        """The smallest halo that covers every kind's reach, and the kind needing it."""
        best, which = 0.0, None
        for name, kind in self.kinds.items():
            reach = kind.radius + kind.max_speed * dt
            if reach > best:
                best, which = reach, name
        return best, which

    def reach(self, kind: str, dt: float) -> float:
        spec = self.kinds[kind]
        return spec.radius + spec.max_speed * dt

    def accepts(self, action: str) -> bool:
        """Whether some plugin handles player input ``action``."""
        return INPUT_PREFIX + action in self.handlers

    def input_actions(self) -> list[str]:
        """Every player input action some plugin handles, sorted."""
        prefix = len(INPUT_PREFIX)
        return sorted(
            event[prefix:]
            for event, handler in self.handlers.items()
            if event.startswith(INPUT_PREFIX) and handler is not despawn_forgotten
        )

    def code_digest(self) -> str:
        """SHA-256 of the source files of the plugins' functions (systems, handlers, hooks,
        migrations): changes when their code does."""
        functions = [
            plugin_function
            for plugin in self.plugins
            for plugin_function in (
                *(system for kind in plugin.kinds.values() for system in kind.systems),
                *(kind.migrate for kind in plugin.kinds.values()),
                *plugin.events.values(),
                *plugin.inputs.values(),
                plugin.create_world,
                plugin.new_player,
            )
            if plugin_function is not None
        ]
        files = sorted(
            {
                code.co_filename
                for function in functions
                if (code := getattr(inspect.unwrap(function), "__code__", None)) is not None
            }
        )
        digest = hashlib.sha256()
        for name in files:
            digest.update(name.encode())
            with contextlib.suppress(OSError):
                digest.update(Path(name).read_bytes())
        return digest.hexdigest()

    def classes(self) -> dict[str, dict[str, list[list[str]]]]:
        """The signature of each kind's state class and each plugin's world class."""
        return {
            "kinds": {kind: codec.signature for kind, codec in self.codecs.items()},
            "worlds": {name: codec.signature for name, codec in self.world_codecs.items()},
        }

    def schema(self) -> dict[str, tuple[str, ...]]:
        return {name: codec.fields for name, codec in self.codecs.items()}


def _load_module_file(path: Path) -> Any:
    module_name = f"meshd_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot load plugin file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise PluginError(f"plugin file {path} failed to import: {exc!r}") from exc
    return module


def find_plugin(name: str, dirs: Sequence[Path], *, fresh: bool = False) -> Plugin:
    """Find plugin ``name`` in the plugin folders, then in the entry-point group.

    A plugin file is executed anew on every call. An installed plugin's
    module is imported once per process, unless ``fresh`` (``meshd reload``)
    asks for its current code: then it is reloaded (its own module only,
    not the modules it imports).
    """
    for folder in dirs:
        candidate = folder / f"{name}.py"
        if candidate.is_file():
            found = getattr(_load_module_file(candidate), "plugin", None)
            break
    else:
        matches = entry_points(group=ENTRY_POINT_GROUP, name=name)
        if not matches:
            searched = ", ".join(str(d) for d in dirs) or "no folders"
            raise PluginError(
                f"plugin {name!r} not found in {searched} "
                f"nor in the {ENTRY_POINT_GROUP!r} entry-point group"
            )
        entry = next(iter(matches))
        if fresh and entry.module in sys.modules:
            try:
                importlib.reload(sys.modules[entry.module])
            except Exception as exc:
                raise PluginError(
                    f"plugin module {entry.module} failed to import: {exc!r}"
                ) from exc
        loaded = entry.load()
        found = getattr(loaded, "plugin", loaded)
    if not isinstance(found, Plugin):
        raise PluginError(f"plugin {name!r} does not expose a meshd.Plugin named 'plugin'")
    return found


def load_plugins(
    names: Sequence[str],
    dirs: Sequence[Path],
    raw_settings: Mapping[str, Mapping[str, Any]],
    converter: cattrs.Converter,
    *,
    fresh: bool = False,
) -> PluginSet:
    """Load and validate the named plugins and their ``[plugins.NAME]`` settings."""
    found = [find_plugin(name, dirs, fresh=fresh) for name in names]
    return plugin_set(found, raw_settings, converter)


def plugin_set(
    plugins: Sequence[Plugin],
    raw_settings: Mapping[str, Mapping[str, Any]],
    converter: cattrs.Converter,
) -> PluginSet:
    """Validate ``plugins`` together with their settings (plain values, by plugin name)."""
    settings: dict[str, Any] = {}
    for plugin in plugins:
        raw = dict(raw_settings.get(plugin.name, {}))
        if plugin.settings is None:
            if raw:
                raise PluginError(f"plugin {plugin.name!r} takes no settings, got {sorted(raw)}")
            continue
        try:
            settings[plugin.name] = converter.structure(raw, plugin.settings)
        except Exception as exc:
            details = "; ".join(cattrs.transform_error(exc, path=f"plugins.{plugin.name}"))
            raise PluginError(f"bad settings for plugin {plugin.name!r}: {details}") from exc
    unknown = set(raw_settings) - {plugin.name for plugin in plugins}
    if unknown:
        raise PluginError(f"settings given for plugins that are not loaded: {sorted(unknown)}")
    return PluginSet(list(plugins), settings)


def load_plugin_set(config: Config, *, fresh: bool = False) -> PluginSet:
    """The configured plugins, checked against the world's halo (``fresh``: see
    :func:`find_plugin`). Raises :class:`PluginError` or :class:`ConfigError`."""
    plugins = load_plugins(
        config.plugins.load, config.plugin_dirs, config.plugins.settings, CONVERTER, fresh=fresh
    )
    need, kind = plugins.required_halo(config.world.dt)
    if need > config.world.halo:
        raise ConfigError(
            f"world.halo = {config.world.halo} m is too small: kind {kind!r} reaches {need:g} m "
            f"in one tick (radius + max_speed * dt); set world.halo >= {math.ceil(need)}"
        )
    return plugins
