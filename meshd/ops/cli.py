"""The ``meshd`` command line: thin typer commands over the library.

Precedence for every setting: flag > ``MESHD_*`` environment > ``meshd.toml``.
Exit codes: 0 success (a clean SIGTERM/Ctrl-C stop included), 1 runtime
failure, 2 usage or configuration error.

It is long because it holds every command's options (typer reads them from
the signatures) and the ``bench players`` tables; each command is a few lines
over the library.
"""

from __future__ import annotations

import getpass
import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import trio
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from meshd.common.config import Config, ConfigError, load_config
from meshd.common.log import configure
from meshd.mesh.plugins import load_plugin_set
from meshd.mesh.reload import RELOAD_TIMEOUT
from meshd.mesh.supervisor import STARTUP_TIMEOUT, WorkerFailed
from meshd.ops import admin, scaffold
from meshd.ops.check import DEFAULT_TICKS, CheckFailed, WorldSpec, check, format_report
from meshd.ops.serve import SOCKET_NAME, StartupError, serve
from meshd.players.accounts import AccountError
from meshd.plugin import PluginError
from meshd.store.offline import offline_world
from meshd.store.schema import StoreError

app = typer.Typer(
    name="meshd",
    help="Dynamic server meshing: one continuous world simulated by many worker processes.",
    no_args_is_help=True,
    add_completion=False,
)
inspect_app = typer.Typer(
    help="Look at a running daemon through its admin socket (world also works offline).",
    no_args_is_help=True,
)
app.add_typer(inspect_app, name="inspect")
bench_app = typer.Typer(
    help="Run a benchmark end to end and print its measured figures.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")
new_app = typer.Typer(help="Start something new from a commented template.", no_args_is_help=True)
app.add_typer(new_app, name="new")
accounts_app = typer.Typer(
    help="Players' accounts: list, create, rename, disable, enable, delete. Through the running "
    "daemon (changes: its own user only; it logs who asked), or on the data folder when none "
    "runs (delete needs the daemon).",
    no_args_is_help=True,
)
app.add_typer(accounts_app, name="accounts")

console = Console()
errors = Console(stderr=True, soft_wrap=True)  # one error, one line, however long

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", envvar="MESHD_CONFIG", help="Config file [default: ./meshd.toml]."
    ),
]
DataOption = Annotated[
    Path | None,
    typer.Option("--data", envvar="MESHD_DATA_DIR", help="Data folder (database, admin socket)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]


def _fail(message: str, code: int) -> typer.Exit:
    errors.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _config(config: Path | None, **overrides: Any) -> Config:
    try:
        return load_config(config, overrides=overrides)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None


@app.command("serve")
def serve_command(
    config: ConfigOption = None,
    data: DataOption = None,
    workers: Annotated[
        int | None,
        typer.Option(
            envvar="MESHD_MESH_WORKERS",
            help="Fixed worker count: a static mesh (without it, mesh.mode decides).",
        ),
    ] = None,
    ticks: Annotated[
        int | None, typer.Option(min=0, help="Stop gracefully after this many more ticks.")
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(envvar="MESHD_TICK_RATE", help="Ticks per second; 0 = as fast as possible."),
    ] = None,
    seed: Annotated[int | None, typer.Option(envvar="MESHD_WORLD_SEED", help="World seed.")] = None,
    log_json: Annotated[
        bool | None,
        typer.Option("--log-json/--log-console", help="Log format [default: JSON unless a TTY]."),
    ] = None,
    listen: Annotated[
        str | None,
        typer.Option(
            envvar="MESHD_GATEWAY_LISTEN",
            help='Player gateway HOST:PORT ("" = none) [default: 127.0.0.1:7777].',
        ),
    ] = None,
    strict: Annotated[
        bool | None,
        typer.Option(
            "--strict/--no-strict",
            help="Log plugin code that reads the clock or the global random, or changes "
            "a previous state in place (mesh.strict).",
        ),
    ] = None,
) -> None:
    """Run the world: a core process and its worker processes."""
    cfg = _config(
        config,
        **{
            "data.dir": str(data) if data is not None else None,
            "mesh.workers": workers,
            "mesh.mode": "static" if workers is not None else None,
            "tick.rate": rate,
            "world.seed": seed,
            "log.json": log_json,
            "gateway.listen": listen,
            "mesh.strict": strict,
        },
    )
    configure(json=cfg.log.json, level=cfg.log.level)
    try:
        summary = trio.run(lambda: serve(cfg, ticks=ticks))
    except (ConfigError, PluginError) as exc:
        raise _fail(str(exc), 2) from None
    except (StartupError, StoreError, WorkerFailed) as exc:
        raise _fail(str(exc), 1) from None
    except KeyboardInterrupt:
        raise _fail("interrupted twice: stopped without writing the final tick", 1) from None
    errors.print(
        f"stopped at tick {summary.last_tick}; world hash {summary.hash[:16]}", highlight=False
    )


def _data_dir(config: Path | None, data: Path | None) -> Path:
    return data if data is not None else _config(config).data_dir


def _ask(
    config: Path | None, data: Path | None, request: admin.AdminRequest, timeout: float = 60.0
) -> Any:
    try:
        return admin.request(_data_dir(config, data) / SOCKET_NAME, request, timeout)
    except admin.AdminError as exc:
        raise _fail(str(exc), 1) from None


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=_bytes_as_hex) + "\n")


def _bytes_as_hex(value: Any) -> str:
    """Plugin states may hold bytes, which JSON has no type for."""
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _table(rows: list[dict[str, Any]], title: str) -> None:
    if not rows:
        console.print(f"{title}: none")
        return
    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column, justify="right" if column != "partitions" else "left")
    for row in rows:
        table.add_row(*(_cell(value) for value in row.values()))
    console.print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list):
        return " ".join(str(v) if not isinstance(v, float) else f"{v:g}" for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    return "-" if value is None else str(value)


def _pairs(value: dict[str, Any], title: str) -> None:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, item in value.items():
        table.add_row(key, _cell(item))
    console.print(table)


@inspect_app.command("status")
def inspect_status(
    config: ConfigOption = None, data: DataOption = None, as_json: JsonOption = False
) -> None:
    """Tick, entity and worker counts, tick times."""
    result = _ask(config, data, admin.AdminRequest("status"))
    _print_json(result) if as_json else _pairs(result, "meshd status")


@inspect_app.command("workers")
def inspect_workers(
    config: ConfigOption = None, data: DataOption = None, as_json: JsonOption = False
) -> None:
    """Worker processes: pid, epoch, partitions, entities, cost."""
    result = _ask(config, data, admin.AdminRequest("workers"))
    _print_json(result) if as_json else _table(result, "workers")


@inspect_app.command("gateways")
def inspect_gateways(
    config: ConfigOption = None, data: DataOption = None, as_json: JsonOption = False
) -> None:
    """Gateway processes: pid, epoch, players, CPU seconds, queue depths, restarts."""
    result = _ask(config, data, admin.AdminRequest("gateways"))
    _print_json(result) if as_json else _table(result, "gateways")


@inspect_app.command("partitions")
def inspect_partitions(
    config: ConfigOption = None, data: DataOption = None, as_json: JsonOption = False
) -> None:
    """Partitions (quadtree leaves): bounds, owner, entities, cost."""
    result = _ask(config, data, admin.AdminRequest("partitions"))
    _print_json(result) if as_json else _table(result, "partitions")


@inspect_app.command("stats")
def inspect_stats(
    config: ConfigOption = None, data: DataOption = None, as_json: JsonOption = False
) -> None:
    """The cost report: worker-seconds used vs. static provisioning for the peak."""
    result = _ask(config, data, admin.AdminRequest("stats"))
    _print_json(result) if as_json else _pairs(result, "meshd stats")


@inspect_app.command("map")
def inspect_map(
    png: Annotated[Path, typer.Option("--png", help="Write the map to this PNG file.")],
    config: ConfigOption = None,
    data: DataOption = None,
) -> None:
    """Draw the world: partitions coloured by worker, entities as dots."""
    from meshd.ops.plots import MapError, draw_map

    result = _ask(config, data, admin.AdminRequest("map"))
    try:
        draw_map(result, png)
    except MapError as exc:
        raise _fail(str(exc), 1) from None
    errors.print(f"wrote {png} (tick {result['tick']})", highlight=False)


@inspect_app.command("entity")
def inspect_entity(
    entity_id: Annotated[int, typer.Argument(metavar="ID", help="Entity id.")],
    config: ConfigOption = None,
    data: DataOption = None,
    as_json: JsonOption = False,
) -> None:
    """One entity: kind, position, owner and state."""
    result = _ask(config, data, admin.AdminRequest("entity", entity=entity_id))
    _print_json(result) if as_json else _pairs(result, f"entity {entity_id}")


@inspect_app.command("world")
def inspect_world(
    config: ConfigOption = None,
    data: DataOption = None,
    with_hash: Annotated[bool, typer.Option("--hash", help="Compute the world hash.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Tick, entity count and world hash; read from the database when no daemon runs."""
    data_dir = _data_dir(config, data)
    request = admin.AdminRequest("world", hash=with_hash)
    try:
        result = admin.request(data_dir / SOCKET_NAME, request)
    except admin.AdminError as exc:
        if (data_dir / SOCKET_NAME).exists() and "no meshd daemon" not in str(exc):
            raise _fail(str(exc), 1) from None
        try:
            result = offline_world(data_dir, with_hash)
        except StoreError as store_exc:
            raise _fail(str(store_exc), 1) from None
    _print_json(result) if as_json else _pairs(result, "world")


@app.command("release")
def release_command(
    entity: Annotated[
        list[int] | None,
        typer.Option("--entity", metavar="ID", help="A quarantined entity (repeatable)."),
    ] = None,
    partitions: Annotated[
        bool,
        typer.Option(
            "--partitions", help="Every quarantined partition (its worker slot starts again)."
        ),
    ] = False,
    everything: Annotated[
        bool, typer.Option("--all", help="Every quarantined entity and partition.")
    ] = False,
    config: ConfigOption = None,
    data: DataOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run what was quarantined again, without a restart (once the plugin is fixed).

    Only the daemon's own user may do this; the daemon logs who did.
    """
    if not (entity or partitions or everything):
        raise _fail("nothing to release: give --entity ID, --partitions or --all", 2)
    result = _ask(
        config,
        data,
        admin.AdminRequest(
            "release",
            entities=entity or [],
            all_entities=everything,
            partitions=partitions or everything,
        ),
    )
    _print_json(result) if as_json else _pairs(result, "released")


@app.command("reload")
def reload_command(
    config: ConfigOption = None,
    data: DataOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run the plugins' current code: every worker is replaced at a tick boundary.

    Players stay connected and no tick is skipped. Refused, with the reason,
    when the new code does not load or cannot take the current world's
    states. Only the daemon's own user may do this; the daemon logs who did.
    """
    # Starting the new workers takes up to their start-up timeout, then a tick boundary.
    result = _ask(config, data, admin.AdminRequest("reload"), STARTUP_TIMEOUT + RELOAD_TIMEOUT)
    _print_json(result) if as_json else _pairs(result, "reloaded")


def _account_request(config: Path | None, data: Path | None, request: admin.AdminRequest) -> Any:
    """The daemon's answer to an account request, or the same done offline when none runs."""
    from meshd.ops.accounts import offline

    cfg = _config(config, **{"data.dir": str(data) if data is not None else None})
    try:
        return admin.request(cfg.data_dir / SOCKET_NAME, request)
    except admin.NoDaemon:
        pass
    except admin.AdminError as exc:
        raise _fail(str(exc), 1) from None
    try:
        return offline(cfg, request)
    except (AccountError, StartupError, StoreError) as exc:
        raise _fail(str(exc), 1) from None


AccountName = Annotated[str, typer.Argument(metavar="NAME", help="The account's name.")]


@accounts_app.command("list")
def accounts_list(
    config: ConfigOption = None, data: DataOption = None, as_json: JsonOption = False
) -> None:
    """Every account: its entity, whether its player is online, whether it is disabled."""
    rows = _account_request(config, data, admin.AdminRequest("accounts"))
    _print_json(rows) if as_json else _table(rows, "accounts")


def _read_secret() -> str:
    """The new account's secret: asked twice on a terminal, else the first line of stdin."""
    if sys.stdin.isatty():
        secret = getpass.getpass("secret: ")
        if getpass.getpass("again: ") != secret:
            raise _fail("the two secrets differ", 2)
    else:
        secret = sys.stdin.readline().rstrip("\r\n")
    if not secret:
        raise _fail("no secret given (type it when asked, or give it on standard input)", 2)
    return secret


@accounts_app.command("create")
def accounts_create(
    name: AccountName,
    config: ConfigOption = None,
    data: DataOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create an account (also when gateway.signup is closed).

    The secret is asked for on a terminal, or read from the first line of
    standard input: never from the command line.
    """
    secret = _read_secret()
    result = _account_request(
        config, data, admin.AdminRequest("create_account", name=name, secret=secret)
    )
    _print_json(result) if as_json else _pairs(result, "created")


@accounts_app.command("rename")
def accounts_rename(
    old: Annotated[str, typer.Argument(metavar="OLD", help="The account's name.")],
    new: Annotated[str, typer.Argument(metavar="NEW", help="Its new name.")],
    config: ConfigOption = None,
    data: DataOption = None,
    as_json: JsonOption = False,
) -> None:
    """Give an account another name; it keeps its entity and secret.

    Its player, if connected, is told and disconnected, and logs in with the new name.
    """
    request = admin.AdminRequest("rename_account", name=old, new_name=new)
    result = _account_request(config, data, request)
    _print_json(result) if as_json else _pairs(result, "renamed")


@accounts_app.command("disable")
def accounts_disable(
    name: AccountName,
    config: ConfigOption = None,
    data: DataOption = None,
    as_json: JsonOption = False,
) -> None:
    """Disable an account: it cannot log in, and its player is disconnected now."""
    result = _account_request(config, data, admin.AdminRequest("disable_account", name=name))
    _print_json(result) if as_json else _pairs(result, "disabled")


@accounts_app.command("enable")
def accounts_enable(
    name: AccountName,
    config: ConfigOption = None,
    data: DataOption = None,
    as_json: JsonOption = False,
) -> None:
    """Let a disabled account log in again."""
    result = _account_request(config, data, admin.AdminRequest("enable_account", name=name))
    _print_json(result) if as_json else _pairs(result, "enabled")


@accounts_app.command("delete")
def accounts_delete(
    name: AccountName,
    config: ConfigOption = None,
    data: DataOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete an account; the name is free again (a running daemon only).

    Its player, if connected, is disconnected; its entity gets a forget input
    (the plugin decides what becomes of it; without a handler it leaves the
    world).
    """
    result = _account_request(config, data, admin.AdminRequest("delete_account", name=name))
    _print_json(result) if as_json else _pairs(result, "deleted")


@app.command("check")
def check_command(
    config: ConfigOption = None,
    ticks: Annotated[
        int, typer.Option(min=1, help="Ticks to run each way (about 30 s for the default world).")
    ] = DEFAULT_TICKS,
    seed: Annotated[int | None, typer.Option(envvar="MESHD_WORLD_SEED", help="World seed.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Check the plugins keep the world deterministic: run it five ways, compare every tick.

    Twice on one worker, on four workers, with a re-layout and a worker
    killed, and stopped and restarted from world.db; at the first tick a way
    differs, the entities and fields that differ and the likely causes.
    Exit code 1 on any difference (usable in a plugin's CI).
    """
    cfg = _config(config, **{"world.seed": seed})
    try:
        load_plugin_set(cfg)  # what serve would refuse, refused here the same way
        report = check(WorldSpec.from_config(cfg), ticks)
    except (CheckFailed, PluginError, ConfigError) as exc:
        raise _fail(str(exc), 2) from None
    if as_json:
        _print_json(report.to_json())
    else:
        for line in format_report(report):
            console.print(line, highlight=False, markup=False, soft_wrap=True)
    if not report.same:
        raise typer.Exit(1)


@new_app.command("plugin")
def new_plugin_command(
    name: Annotated[str, typer.Argument(help="The plugin's name: a Python identifier.")],
    folder: Annotated[
        Path, typer.Option("--dir", help="Where plugins/, tests/ and meshd.toml go.")
    ] = Path("."),
) -> None:
    """Write a commented plugin, its test, and a meshd.toml that loads it if there is none.

    Exit code 2 for a name that is not a Python identifier, 1 if the plugin or
    its test exists already (nothing is written then).
    """
    try:
        made = scaffold.new_plugin(name, folder)
    except scaffold.BadName as exc:
        raise _fail(str(exc), 2) from None
    except scaffold.ScaffoldError as exc:
        raise _fail(str(exc), 1) from None
    for line in made.report():
        console.print(line, highlight=False, markup=False, soft_wrap=True)


class BotsEngine(StrEnum):
    native = "native"
    python = "python"


def _bench_output(result: dict[str, Any], as_json: bool, title: str) -> None:
    _print_json(result) if as_json else _pairs(result, title)


@bench_app.callback()
def bench_callback() -> None:
    """Run a benchmark end to end and print its measured figures (side by side in one run)."""
    configure(json=True, level="error")


@bench_app.command("sim")
def bench_sim_command(
    npcs: Annotated[int, typer.Option(min=1, help="Tavern NPCs.")] = 10_000,
    ticks: Annotated[int, typer.Option(min=1, help="Ticks per run.")] = 200,
    repeat: Annotated[int, typer.Option(min=1, help="Runs per variant (medians).")] = 1,
    as_json: JsonOption = False,
) -> None:
    """A bare single-process loop against the mesh on 1 and 2 workers, same plugin."""
    from meshd.ops import bench

    _bench_output(bench.bench_sim(npcs=npcs, ticks=ticks, repeat=repeat), as_json, "bench sim")


@bench_app.command("failover")
def bench_failover_command(
    npcs: Annotated[int, typer.Option(min=1, help="Tavern NPCs.")] = 10_000,
    seconds: Annotated[float, typer.Option(min=1.0, help="Seconds of ticks per run.")] = 20.0,
    rate: Annotated[float, typer.Option(min=1.0, help="Ticks per second.")] = 20.0,
    checkpoint_every: Annotated[
        int, typer.Option(min=1, help="Ticks between full-state checkpoints.")
    ] = 10,
    as_json: JsonOption = False,
) -> None:
    """A worker SIGKILLed every 2 s: the stalls, against a calm run of the same world."""
    from meshd.ops import bench

    result = bench.bench_failover(
        npcs=npcs, seconds=seconds, rate=rate, checkpoint_every=checkpoint_every
    )
    _bench_output(result, as_json, "bench failover")


@bench_app.command("rush")
def bench_rush_command(
    npcs: Annotated[
        int | None, typer.Option(min=1, help="Tavern NPCs [default: sized to this machine].")
    ] = None,
    day_ticks: Annotated[int, typer.Option(min=48, help="Ticks in one tavern day.")] = 2400,
    rate: Annotated[float, typer.Option(min=1.0, help="Ticks per second.")] = 20.0,
    max_workers: Annotated[
        int | None, typer.Option(min=1, help="Worker cap for both meshes [default: cores].")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write workers and tick times to this PNG.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """A tavern day with a rush at noon: the dynamic mesh against a static grid."""
    from meshd.ops import bench

    result = bench.bench_rush(
        npcs=npcs, day_ticks=day_ticks, rate=rate, max_workers=max_workers, plot=plot
    )
    _bench_output(result, as_json, "bench rush")


class PlayerCounts(tuple[int, ...]):
    """``bench players --players``: the bot counts of a series, one run each."""


def _player_counts(value: str | PlayerCounts) -> PlayerCounts:
    """Parse ``300,1000,1500`` (or one count); :class:`typer.BadParameter` names a bad item."""
    if isinstance(value, PlayerCounts):  # typer passes the default through the parser too
        return value
    counts = []
    for item in value.split(","):
        try:
            count = int(item.strip())
        except ValueError:
            raise typer.BadParameter(
                f"{item.strip()!r} is not a whole number; give counts like 300,1000,1500"
            ) from None
        if count < 1:
            raise typer.BadParameter(f"{count} players: each count must be at least 1")
        counts.append(count)
    return PlayerCounts(counts)


DEFAULT_PLAYERS = PlayerCounts((1000,))


def _pair(value: dict[str, Any] | None, digits: int = 1) -> str:
    """``p50/p99`` of a percentile pair; ``-`` when it was not measured."""
    if not value:
        return "-"
    return f"{value['p50']:.{digits}f}/{value['p99']:.{digits}f}"


def _number(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


PLAYERS_FELT = (
    ("players", "bots asked for"),
    ("conn", "bots connected"),
    ("Hz", "measured tick rate"),
    ("tick ms", "the work of a tick, p50/p99"),
    ("interval ms", "wall time between tick starts, p50/p99"),
    ("views/s", "views per client per second, mean/min"),
    ("RTT ms", "p50/p99"),
    ("disc/gaps/rec", "disconnects/ticks missing from views/the bots' reconnects"),
)
PLAYERS_COST = (
    ("players", "bots asked for"),
    ("cores", "the server's CPU in cores, of..."),
    ("core/wk/gw", "...the core, the workers, the gateways"),
    ("bots", "the bots' CPU in cores"),
    ("ms/pl·s", "server CPU ms per player-second..."),
    ("@rate", "...scaled to the target rate when below it"),
    ("B/cl·s", "bytes per client per second"),
    ("gateways", "players of each gateway process (core: the core holds them)"),
    ("load", "1-minute load average before the run"),
)
"""The ``bench players`` tables' columns, short (the legend under each says what they are):
what the players felt, then what it cost; two tables, so that each fits 80 columns."""
WRAPPING = frozenset({"disc/gaps/rec", "gateways"})
"""The columns that may grow (many gateways, reconnect counters): they wrap at spaces."""


def _felt(row: dict[str, Any]) -> list[str]:
    views = row["updates_per_s"]
    return [
        str(row["players"]),
        _cell(row["connected"]),
        _number(row["measured_rate_hz"]),
        _pair(row["tick_ms"]),
        _pair(row["tick_interval_ms"]),
        "-" if views is None else f"{views:.1f}/{row['updates_per_s_min']:.1f}",
        _pair(row["rtt_ms"], 0),
        "/".join(_cell(row[key]) for key in ("disconnects", "tick_gaps", "reconnects")),
    ]


def _cost(row: dict[str, Any]) -> list[str]:
    cpu = row["server_cpu"]
    return [
        str(row["players"]),
        f"{cpu['cores']:.2f}",
        f"{cpu['core']:.2f}/{cpu['workers']:.2f}/{cpu['gateways']:.2f}",
        _number(row["bots_cpu"]),
        _number(row["server_cpu_ms_per_player_s"]),
        _number(row["server_cpu_ms_per_player_s_at_20hz"]),
        _number(row["bytes_per_client_s"], ",.0f"),
        _cell(row["gateway_players"]) if row["gateway_players"] else "core",
        _number(row["load_before"]),
    ]


def _players_table(rows: list[dict[str, Any]], seconds: float) -> None:
    """``bench players``: a row per measured count in two tables with legends, then notes."""
    measured = [row for row in rows if "error" not in row]
    if not measured:
        return
    first = measured[0]
    console.print(
        f"bench players: {first['engine']} bots, {seconds:g} s each, target "
        f"{first['rate_hz']:g} Hz; {first['cpus']} CPUs, Python {first['python']}",
        style="bold",
        highlight=False,
    )
    for title, columns, cells in (
        ("what the players felt", PLAYERS_FELT, _felt),
        ("what it cost", PLAYERS_COST, _cost),
    ):
        table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for header, _ in columns:
            table.add_column(header, justify="right", no_wrap=header not in WRAPPING)
        for row in measured:
            table.add_row(*cells(row))
        console.print(table)
        legend = "; ".join(f"{header}: {meaning}" for header, meaning in columns[1:])
        console.print(legend, style="dim", highlight=False)
    for row in measured:  # what the columns cannot hold
        if row["incomplete"]:
            console.print(f"{row['players']} players: {row['incomplete']}", highlight=False)
        if row["disconnect_reasons"]:
            reasons = _cell(row["disconnect_reasons"])
            console.print(f"{row['players']} players: disconnected: {reasons}", highlight=False)
        if row["reconnects"]:
            keys = ("reconnected_bots", "reconnect_ms", "reconnect_gaps", "entity_changed")
            details = _cell({key: row[key] for key in keys})
            console.print(
                f"{row['players']} players: {row['reconnects']} reconnects: {details}",
                highlight=False,
            )


@bench_app.command("players")
def bench_players_command(
    players: Annotated[
        PlayerCounts,
        typer.Option(
            parser=_player_counts,
            metavar="N[,N...]",
            help="Bot connections; a comma-separated list runs one fresh server per count.",
        ),
    ] = DEFAULT_PLAYERS,
    seconds: Annotated[float, typer.Option(min=1.0, help="Seconds of play per count.")] = 20.0,
    rate: Annotated[float, typer.Option(min=1.0, help="Ticks per second.")] = 20.0,
    gateways: Annotated[
        int,
        typer.Option(
            min=0, help="Gateway processes (gateway.processes); 0 = the server's default."
        ),
    ] = 0,
    bots: Annotated[BotsEngine, typer.Option(help="The bots' engine.")] = BotsEngine.native,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON list: one object per count.")
    ] = False,
) -> None:
    """Bot connections from a separate process against a separate server, a row per count.

    A count that could not be measured is reported (an "error" object in
    the JSON list) and the series goes on; the exit code is then 1.
    """
    from meshd.ops import bench

    rows: list[dict[str, Any]] = []
    for count in players:
        errors.print(f"bench players: {count} players, {seconds:g} s ...", highlight=False)
        try:
            row = bench.bench_players(
                players=count, seconds=seconds, rate=rate, engine=bots.value, gateways=gateways
            )
        except (bench.BenchError, admin.AdminError) as exc:
            errors.print(f"[bold red]error:[/] {count} players: {exc}", highlight=False)
            row = {"players": count, "error": str(exc)}
        rows.append(row)
    _print_json(rows) if as_json else _players_table(rows, seconds)
    if any("error" in row for row in rows):
        raise typer.Exit(1)


@app.command("bots")
def bots_command(
    connect: Annotated[
        str, typer.Option("--connect", help="Gateway HOST:PORT.", envvar="MESHD_GATEWAY_LISTEN")
    ] = "127.0.0.1:7777",
    count: Annotated[int, typer.Option(min=1, help="Connections.")] = 10,
    duration: Annotated[
        float, typer.Option(min=0.1, help="Seconds of play, all connected.")
    ] = 10.0,
    scenario: Annotated[str, typer.Option(help="wander, rush, cross or crowd.")] = "wander",
    target: Annotated[str, typer.Option(help="rush: X,Y as shares of the world size.")] = "0.5,0.5",
    engine: Annotated[
        str,
        typer.Option(help="python (meshd.client) or native (C, built on first use)."),
    ] = "python",
    tls: Annotated[
        bool,
        typer.Option(
            "--tls",
            help="Connect with TLS, verifying the server's certificate against the system's "
            "authorities (python engine).",
        ),
    ] = False,
    tls_ca: Annotated[
        Path | None,
        typer.Option(
            "--tls-ca",
            exists=True,
            dir_okay=False,
            help="Connect with TLS, trusting this PEM file's authorities (or the server's "
            "self-signed certificate) instead of the system's.",
        ),
    ] = None,
    tls_insecure: Annotated[
        bool,
        typer.Option(
            "--tls-insecure",
            help="DANGEROUS: connect with TLS without verifying the server's certificate "
            "(anyone on the way can pose as the server and read the secrets); tests only.",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Drive N real player connections from one process; exit 1 on unexpected disconnects."""
    from meshd.client import tls_context
    from meshd.ops.bots import SCENARIOS, run_bots
    from meshd.ops.loadgen import LoadgenError, run_native

    if scenario not in SCENARIOS:
        raise _fail(f"unknown scenario {scenario!r}; available: {', '.join(SCENARIOS)}", 2)
    try:
        host, port = connect.rsplit(":", 1)
        tx, ty = (float(v) for v in target.split(","))
        address = (host, int(port))
    except ValueError:
        raise _fail("--connect takes HOST:PORT and --target X,Y", 2) from None
    if tls_ca is not None and tls_insecure:
        raise _fail("--tls-ca trusts an authority, --tls-insecure trusts anyone: not both", 2)
    with_tls = tls or tls_ca is not None or tls_insecure
    if engine == "native" and with_tls:
        raise _fail("the native bots do not speak TLS: use --engine python", 2)
    if engine == "native":
        try:
            result = run_native(*address, count, duration, scenario, (tx, ty))
        except LoadgenError as exc:
            raise _fail(str(exc), 1) from None
    elif engine == "python":
        context = tls_context(tls_ca, insecure=tls_insecure) if with_tls else None
        result = trio.run(
            lambda: run_bots(
                *address, count, duration, scenario=scenario, target=(tx, ty), ssl_context=context
            )
        )
    else:
        raise _fail(f"unknown engine {engine!r}; available: python, native", 2)
    _print_json(result) if as_json else _pairs(result, f"bots: {scenario}")
    if result["disconnects"]:
        raise typer.Exit(1)


def main() -> None:
    app()
