"""Configuration: ``meshd.toml``, overridden by ``MESHD_*`` variables, overridden by flags.

Pure apart from reading the one file it is given (and ``os.environ`` when no
environment is passed).

Every setting lives at ``section.key``; its environment variable is
``MESHD_SECTION_KEY`` (for example ``MESHD_WORLD_SEED``, ``MESHD_TICK_RATE``).
A plugin's settings (``[plugins.NAME]``) are ``MESHD_PLUGINS_NAME_KEY``.
Environment values are read as TOML values when they parse as one
(``7``, ``0.5``, ``true``, ``["a", "b"]``) and as plain strings otherwise.
Any bad value, and any ``MESHD_*`` variable that names no setting (a typo
would otherwise be silently ignored), stops startup with a
:class:`ConfigError` naming the key and the expected form.

It is long because every setting is declared here, with what it means and
the check of its value, so one file answers "what can I set?".
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import cattrs

from meshd.common.wire import CONVERTER

DEFAULT_CONFIG = Path("meshd.toml")
COMMAND_LINE_VARIABLES = frozenset({"MESHD_CONFIG"})
"""``MESHD_*`` variables that the command line reads and that name no setting."""
PLUGIN_VARIABLE = "MESHD_PLUGINS_"


class ConfigError(Exception):
    """The configuration is invalid; the message names the key and what it expects."""


@attrs.frozen
class WorldConfig:
    size: float = 400.0
    seed: int = 1
    dt: float = 0.05
    halo: float = 5.0


@attrs.frozen
class TickConfig:
    rate: float = 20.0
    persist_every: int = 10
    checkpoint_every: int = 10


@attrs.frozen
class DataConfig:
    dir: str = "data"
    synchronous: Literal["normal", "full"] = "normal"
    journal: bool = False
    """Append the world's inputs, tick by tick, to ``journal.cbor`` in the data folder."""


@attrs.frozen
class MeshConfig:
    mode: Literal["dynamic", "static"] = "dynamic"
    workers: int = 2
    """Static mode: the fixed worker count."""
    grid: int = 4
    """Static mode: grid x grid partitions; dynamic mode: the starting grid."""
    step_deadline: float = 0.25
    min_workers: int = 1
    max_workers: int = 0
    """0 = the number of CPU cores."""
    utilisation: float = 0.7
    budget_ms: float = 0.0
    """CPU ms one worker may spend per tick; 0 = the tick interval x ``utilisation``."""
    split: float = 0.25
    merge: float = 0.08
    imbalance: float = 0.2
    min_cell: float = 0.0
    """Metres; 0 = four halos (or world.size / 64 if larger)."""
    dwell: float = 2.0
    cooldown: float = 3.0
    strict: bool = False
    """Workers note plugin code that reads the clock or the global random, or changes a
    previous state in place, and the core logs each place once (the tavern's simulation
    takes about a fifth more CPU)."""


@attrs.frozen
class GatewayConfig:
    listen: str = "127.0.0.1:7777"
    """HOST:PORT for player connections; an empty string turns the gateway off."""
    processes: int = 0
    """Gateway processes serving the players (0: one per two CPUs, at least one)."""
    view_radius: float = 30.0
    view_max: int = 64
    view_every: int = 1
    """Send each player a view update every this many ticks."""
    max_clients: int = 2000
    """Players in the world at once (connections still logging in count apart)."""
    login_timeout: float = 5.0
    """Seconds from connecting to the ``Welcome``: the whole login, hashing included."""
    max_pending: int = 256
    """Connections still logging in, per gateway process..."""
    max_pending_per_address: int = 8
    """...and from one address (``address_prefix_v4`` / ``_v6``)."""
    max_players_per_address: int = 64
    address_prefix_v4: int = 32
    address_prefix_v6: int = 64
    """Addresses are counted by prefix: one IPv4 host, one IPv6 /64 by default."""
    login_failures: int = 5
    """Failed logins from an address (or for one name from it) before each further attempt
    from there waits, twice as long after each failure (up to 5 minutes)."""
    input_rate: float = 30.0
    """Inputs per second a connection may send on average (token bucket)..."""
    input_burst: int = 60
    """...and at most this many at once."""
    input_bytes_rate: float = 4096.0
    """Bytes per second a connection may send on average (charged as they arrive, before
    anything is decoded)..."""
    input_bytes_burst: int = 16384
    """...and at most this many at once."""
    send_queue: int = 32
    """Messages queued for a player before it counts as too slow and is dropped."""
    hash_cost: int = 17
    """log2 of scrypt's N for player secrets (17, with r = 8 and p = 1, is the current
    recommendation: 128 MiB and about a third of a second of a core per login by secret;
    each step down halves both). Stored with each account; an account hashed with other
    parameters is hashed again at its next login."""
    hash_threads: int = 0
    """Secrets hashed at once per gateway process (0: one per CPU); more wait their turn."""
    min_secret: int = 8
    """Characters a new name's secret needs at least."""
    tls_cert: str = ""
    """PEM certificate (chain) the players' port serves TLS with ("" = plain TCP); a
    relative path is taken from the config file's folder, as plugins.dirs is."""
    tls_key: str = ""
    """The certificate's PEM private key (set with tls_cert)."""
    allow_plaintext: bool = False
    """Serve plain TCP on an address that is not loopback: names and secrets cross the
    network in clear (without it, such a listen refuses to start)."""
    signup: Literal["open", "closed"] = "open"
    """open: a login with a new name claims it; closed: only names an operator created
    (``meshd accounts create``) log in."""
    signup_per_address: int = 3
    """New names a minute that players may claim from one address..."""
    signup_per_minute: int = 30
    """...and from all addresses together."""
    signup_trusted: list[str] = attrs.field(factory=lambda: ["127.0.0.1", "::1"])
    """Addresses whose new names are not limited (bots and tests on the server's own host;
    empty it when a proxy on this host forwards players)."""

    def address(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


@attrs.frozen
class SuperviseConfig:
    max_restarts: int = 5
    restart_window: float = 30.0
    quarantine_after: int = 10
    spares: int = 1


@attrs.frozen
class AdminConfig:
    group: str = ""
    """A group whose members may use the admin socket's read views (``meshd inspect``)
    besides the daemon's own user; changes stay the daemon's user's."""


@attrs.frozen
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    json: bool | None = None


@attrs.frozen
class PluginsConfig:
    load: list[str] = attrs.field(factory=lambda: ["tavern"])
    dirs: list[str] = attrs.field(factory=lambda: ["plugins"])
    settings: dict[str, dict[str, Any]] = attrs.field(factory=dict)


@attrs.frozen
class Config:
    world: WorldConfig = WorldConfig()
    tick: TickConfig = TickConfig()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    supervise: SuperviseConfig = SuperviseConfig()
    gateway: GatewayConfig = GatewayConfig()
    admin: AdminConfig = AdminConfig()
    log: LogConfig = LogConfig()
    plugins: PluginsConfig = PluginsConfig()
    base_dir: str = "."
    """Folder that relative plugin folders are resolved against (the config file's)."""

    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir)

    @property
    def plugin_dirs(self) -> list[Path]:
        return [Path(self.base_dir, folder).resolve() for folder in self.plugins.dirs]


_SECTIONS: dict[str, type] = {
    field.name: field.type  # type: ignore[misc]
    for field in attrs.fields(Config)
    if field.name != "base_dir"
}


def _resolve_section(name: str) -> type:
    section = _SECTIONS[name]
    if isinstance(section, str):  # postponed annotations
        section = globals()[section]
    return section


def _parse_env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def _setting_variables() -> dict[str, str]:
    """``MESHD_SECTION_KEY`` -> ``"section.key"`` for every setting."""
    names = {}
    for section in _SECTIONS:
        for field in attrs.fields(_resolve_section(section)):
            if section == "plugins" and field.name == "settings":
                continue
            names[f"MESHD_{section}_{field.name}".upper()] = f"{section}.{field.name}"
    return names


def env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings named by ``MESHD_*`` variables, as dotted keys, and the plugin
    variables (``MESHD_PLUGINS_NAME_KEY``), matched later against the loaded plugins.

    Raises :class:`ConfigError` for a variable that names nothing.
    """
    known = _setting_variables()
    found: dict[str, Any] = {}
    plugin_variables: dict[str, str] = {}
    for name, text in sorted(environ.items()):
        if not name.startswith("MESHD_") or name in COMMAND_LINE_VARIABLES:
            continue
        if name in known:
            found[known[name]] = _parse_env_value(text)
        elif name.startswith(PLUGIN_VARIABLE):
            plugin_variables[name] = text
        else:
            close = difflib.get_close_matches(name, [*known, *COMMAND_LINE_VARIABLES], n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(
                f"environment variable {name} names no setting{hint} "
                "(settings are MESHD_SECTION_KEY, plugin settings MESHD_PLUGINS_NAME_KEY)"
            )
    return found, plugin_variables


def _plugin_settings_from_env(
    variables: Mapping[str, str], loaded: list[str], settings: dict[str, Any]
) -> None:
    """Put ``MESHD_PLUGINS_NAME_KEY`` values into ``settings[name][key]``."""
    for variable, text in variables.items():
        rest = variable.removeprefix(PLUGIN_VARIABLE)
        for name in sorted(loaded, key=len, reverse=True):  # "my_game" before "my"
            prefix = f"{name.upper()}_"
            if rest.startswith(prefix) and len(rest) > len(prefix):
                table = settings.setdefault(name, {})
                table[rest.removeprefix(prefix).lower()] = _parse_env_value(text)
                break
        else:
            raise ConfigError(
                f"environment variable {variable} names no loaded plugin's setting "
                f"(plugins.load = {loaded}; plugin settings are MESHD_PLUGINS_NAME_KEY)"
            )


def _apply(raw: dict[str, Any], dotted: Mapping[str, Any]) -> None:
    for key, value in dotted.items():
        section, _, field = key.partition(".")
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: expected a table, got {table!r}")
        table[field] = value


def _format_cattrs(exc: Exception) -> list[str]:
    messages = []
    for line in cattrs.transform_error(exc, path="$"):
        message, _, where = line.rpartition(" @ ")
        key = where.removeprefix("$").lstrip(".") or "(top level)"
        messages.append(f"{key}: {message}")
    return messages


def _validate(config: Config) -> list[str]:
    problems = []

    def need(ok: bool, key: str, expected: str, value: Any) -> None:
        if not ok:
            problems.append(f"{key}: expected {expected}, got {value!r}")

    world, tick, mesh = config.world, config.tick, config.mesh
    need(world.size > 0, "world.size", "a size in metres > 0", world.size)
    need(world.dt > 0, "world.dt", "simulated seconds per tick > 0", world.dt)
    need(world.halo > 0, "world.halo", "a ghost radius in metres > 0", world.halo)
    need(0 <= world.seed < 2**63, "world.seed", "an integer in [0, 2**63)", world.seed)
    need(tick.rate >= 0, "tick.rate", "ticks per second >= 0 (0 = as fast as possible)", tick.rate)
    need(tick.persist_every >= 1, "tick.persist_every", "a tick count >= 1", tick.persist_every)
    need(
        tick.checkpoint_every >= 1,
        "tick.checkpoint_every",
        "a tick count >= 1",
        tick.checkpoint_every,
    )
    need(mesh.workers >= 1, "mesh.workers", "a worker count >= 1", mesh.workers)
    need(
        mesh.grid >= 1 and mesh.grid & (mesh.grid - 1) == 0,
        "mesh.grid",
        "a power of two (1, 2, 4, 8, ...)",
        mesh.grid,
    )
    need(mesh.step_deadline > 0, "mesh.step_deadline", "seconds > 0", mesh.step_deadline)
    need(mesh.min_workers >= 1, "mesh.min_workers", "a worker count >= 1", mesh.min_workers)
    need(
        mesh.max_workers == 0 or mesh.max_workers >= mesh.min_workers,
        "mesh.max_workers",
        f"0 (= CPU cores) or a count >= mesh.min_workers ({mesh.min_workers})",
        mesh.max_workers,
    )
    need(0 < mesh.utilisation <= 1, "mesh.utilisation", "a share in (0, 1]", mesh.utilisation)
    need(mesh.budget_ms >= 0, "mesh.budget_ms", "milliseconds >= 0", mesh.budget_ms)
    need(0 < mesh.split <= 1, "mesh.split", "a share of the budget in (0, 1]", mesh.split)
    need(
        0 <= mesh.merge < mesh.split,
        "mesh.merge",
        f"a share of the budget below mesh.split ({mesh.split})",
        mesh.merge,
    )
    need(
        0 < mesh.imbalance <= 1, "mesh.imbalance", "a share of the budget in (0, 1]", mesh.imbalance
    )
    need(mesh.min_cell >= 0, "mesh.min_cell", "metres >= 0 (0 = automatic)", mesh.min_cell)
    need(mesh.dwell >= 0, "mesh.dwell", "seconds >= 0", mesh.dwell)
    need(mesh.cooldown >= 0, "mesh.cooldown", "seconds >= 0", mesh.cooldown)
    supervise = config.supervise
    need(supervise.spares >= 0, "supervise.spares", "a count >= 0", supervise.spares)
    need(
        supervise.max_restarts >= 1,
        "supervise.max_restarts",
        "a count >= 1",
        supervise.max_restarts,
    )
    need(
        supervise.restart_window > 0,
        "supervise.restart_window",
        "seconds > 0",
        supervise.restart_window,
    )
    need(
        supervise.quarantine_after >= 1,
        "supervise.quarantine_after",
        "a tick count >= 1",
        supervise.quarantine_after,
    )
    gateway = config.gateway
    if gateway.listen:
        try:
            host, port = gateway.address()
            ok = bool(host) and 0 <= port < 65536
        except ValueError:
            ok = False
        need(ok, "gateway.listen", 'HOST:PORT (or "" for no gateway)', gateway.listen)
    need(gateway.view_radius > 0, "gateway.view_radius", "metres > 0", gateway.view_radius)
    need(gateway.view_max >= 1, "gateway.view_max", "a count >= 1", gateway.view_max)
    need(gateway.view_every >= 1, "gateway.view_every", "a tick count >= 1", gateway.view_every)
    need(gateway.max_clients >= 1, "gateway.max_clients", "a count >= 1", gateway.max_clients)
    need(
        0 <= gateway.processes <= 64,
        "gateway.processes",
        "a count from 1 to 64, or 0 for one per two CPUs",
        gateway.processes,
    )
    need(gateway.login_timeout > 0, "gateway.login_timeout", "seconds > 0", gateway.login_timeout)
    need(gateway.input_rate > 0, "gateway.input_rate", "inputs per second > 0", gateway.input_rate)
    need(gateway.input_burst >= 1, "gateway.input_burst", "a count >= 1", gateway.input_burst)
    need(gateway.send_queue >= 1, "gateway.send_queue", "a count >= 1", gateway.send_queue)
    need(10 <= gateway.hash_cost <= 20, "gateway.hash_cost", "10..20", gateway.hash_cost)
    need(gateway.max_pending >= 1, "gateway.max_pending", "a count >= 1", gateway.max_pending)
    for key in ("max_pending_per_address", "max_players_per_address", "login_failures"):
        need(getattr(gateway, key) >= 1, f"gateway.{key}", "a count >= 1", getattr(gateway, key))
    for key, bits in (("address_prefix_v4", 32), ("address_prefix_v6", 128)):
        value = getattr(gateway, key)
        need(1 <= value <= bits, f"gateway.{key}", f"prefix bits 1..{bits}", value)
    need(
        gateway.input_bytes_rate > 0,
        "gateway.input_bytes_rate",
        "bytes per second > 0",
        gateway.input_bytes_rate,
    )
    need(
        gateway.input_bytes_burst >= 1024,
        "gateway.input_bytes_burst",
        "bytes >= 1024 (one input)",
        gateway.input_bytes_burst,
    )
    need(0 <= gateway.hash_threads <= 64, "gateway.hash_threads", "0..64", gateway.hash_threads)
    need(1 <= gateway.min_secret <= 128, "gateway.min_secret", "1..128", gateway.min_secret)
    need(
        bool(gateway.tls_key) == bool(gateway.tls_cert),
        "gateway.tls_key",
        "a key file with gateway.tls_cert, and none without",
        gateway.tls_key,
    )
    need(
        gateway.signup_per_address >= 1,
        "gateway.signup_per_address",
        "new names a minute >= 1",
        gateway.signup_per_address,
    )
    need(
        gateway.signup_per_minute >= 1,
        "gateway.signup_per_minute",
        "new names a minute >= 1",
        gateway.signup_per_minute,
    )
    for address in gateway.signup_trusted:
        need(_is_ip(address), "gateway.signup_trusted", "a list of IP addresses", address)
    need(bool(config.plugins.load), "plugins.load", "a list of plugin names", config.plugins.load)
    return problems


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def load_config(
    path: Path | None = None,
    *,
    search_default: bool = True,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read the config file, then apply environment variables, then flag ``overrides``.

    ``path=None`` reads ``meshd.toml`` in the current folder if there is one
    (unless ``search_default`` is false: then only the built-in defaults).
    ``overrides`` maps dotted keys (``"world.seed"``) to values; None values
    are ignored so unset flags fall through.
    """
    raw: dict[str, Any] = {}
    base_dir = Path(".")
    chosen = path
    if chosen is None and search_default and DEFAULT_CONFIG.exists():
        chosen = DEFAULT_CONFIG
    if chosen is not None:
        try:
            raw = tomllib.loads(chosen.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {chosen} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {chosen} is not valid TOML: {exc}") from None
        base_dir = chosen.resolve().parent
        data = raw.get("data")
        if data is None or isinstance(data, dict):
            # The world lives beside its config file, wherever meshd is started from (a
            # folder given by the environment or a flag is taken from the current one).
            data = raw["data"] = dict(data or {})
            folder = data.get("dir", DataConfig().dir)
            if isinstance(folder, str) and not Path(folder).is_absolute():
                data["dir"] = str(base_dir / folder)
    from_env, plugin_variables = env_overrides(os.environ if environ is None else environ)
    _apply(raw, from_env)
    _apply(raw, {key: value for key, value in (overrides or {}).items() if value is not None})

    plugins = raw.get("plugins", {})
    if isinstance(plugins, dict):
        plugins = dict(plugins)
        settings = {
            name: dict(value)
            for name, value in plugins.items()
            if name not in ("load", "dirs") and isinstance(value, dict)
        }
        for name in settings:
            del plugins[name]
        loaded = plugins.get("load", PluginsConfig().load)
        if plugin_variables and isinstance(loaded, list):
            _plugin_settings_from_env(plugin_variables, [str(n) for n in loaded], settings)
        plugins["settings"] = settings
        raw["plugins"] = plugins
    raw["base_dir"] = str(base_dir)
    try:
        config = CONVERTER.structure(raw, Config)
    except Exception as exc:
        raise ConfigError("bad config: " + "; ".join(_format_cattrs(exc))) from None
    problems = _validate(config)
    if problems:
        raise ConfigError("bad config: " + "; ".join(problems))
    gateway = config.gateway
    if gateway.tls_cert:  # beside the config file, wherever they were set
        gateway = attrs.evolve(
            gateway,
            tls_cert=str(Path(base_dir, gateway.tls_cert).resolve()),
            tls_key=str(Path(base_dir, gateway.tls_key).resolve()),
        )
        config = attrs.evolve(config, gateway=gateway)
    return config
