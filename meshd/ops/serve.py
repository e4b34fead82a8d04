"""The daemon: ``serve()`` composes the store, supervisor, gateway, admin socket and tick loop.

The startup side of the core (a trio shell): the data folder (made private,
locked), the world loaded or created, the players' port bound, the
configuration turned into the mesh's parameters; then one nursery with the
persistence task, the supervisor, the signal watcher, the admin server, the
gateway and the tick loop (:mod:`meshd.mesh.core`), stopped at a tick
boundary with a graceful deadline for the workers.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import time
from pathlib import Path
from typing import Any

import trio

from meshd.common.config import Config
from meshd.common.log import get_logger
from meshd.mesh.core import Core, RunSummary, Schema, persist_loop, tick_loop, watch_signals
from meshd.mesh.layout import Layout
from meshd.mesh.messages import Init, WorldParams
from meshd.mesh.planner import Planner, PlannerSettings
from meshd.mesh.plugins import PluginSet, load_plugin_set
from meshd.mesh.replication import Replication
from meshd.mesh.step import create_world
from meshd.mesh.supervisor import Supervisor
from meshd.mesh.tick import Pipeline
from meshd.ops.admin import admin_group, serve_admin
from meshd.players.accounts import Account, Registry
from meshd.players.fleet import AccountStore, Gateways, cell_size
from meshd.players.journal import JOURNAL_NAME, Journal
from meshd.players.ports import Reservation, check_plaintext, reserve
from meshd.players.tls import server_context
from meshd.store.codec import Delta, WorldSnapshot
from meshd.store.db import DB_NAME, Store

SOCKET_NAME = "meshd.sock"
LOCK_NAME = "meshd.lock"
PRIVATE_FILES = (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", LOCK_NAME, JOURNAL_NAME)
"""What meshd keeps in the data folder (the admin socket is created 0600 by itself, then
given to ``admin.group``, 0660, if the operator names one)."""
NOMINAL_RATE = 20.0
"""Ticks per second the planner budgets for when ``tick.rate`` is 0 (as fast as possible)."""


class StartupError(Exception):
    """The daemon cannot start (the data folder is in use or cannot be made private)."""


def world_params(config: Config, seed: int | None = None) -> WorldParams:
    world = config.world
    return WorldParams(
        size=world.size, seed=world.seed if seed is None else seed, dt=world.dt, halo=world.halo
    )


def effective_grid(config: Config, workers: int) -> int:
    """The configured grid, widened so every worker gets at least one strip."""
    grid = config.mesh.grid
    while grid < workers:
        grid *= 2
    return grid


def planner_settings(config: Config) -> PlannerSettings:
    """The planner's thresholds from ``[mesh]``, in CPU ms per tick and ticks."""
    mesh, world = config.mesh, config.world
    rate = config.tick.rate or NOMINAL_RATE
    budget = mesh.budget_ms or 1000.0 / rate * mesh.utilisation
    return PlannerSettings(
        budget_ms=budget,
        split_ms=mesh.split * budget,
        merge_ms=mesh.merge * budget,
        imbalance_ms=mesh.imbalance * budget,
        min_cell=mesh.min_cell or max(4 * world.halo, world.size / 64),
        min_workers=mesh.min_workers,
        max_workers=max(mesh.max_workers or os.cpu_count() or 1, mesh.min_workers),
        dwell_ticks=round(mesh.dwell * rate),
        cooldown_ticks=round(mesh.cooldown * rate),
    )


def make_private(data_dir: Path, group: int | None = None) -> None:
    """Make the data folder 0700 and the files meshd keeps there 0600, whoever made them.

    The database holds players' salts and secret hashes. The database file is
    created here, empty and 0600, so that SQLite (which gives its WAL and
    shared-memory files the database's mode) never creates anything readable
    by others. Raises :class:`StartupError` if the folder cannot be made private.

    With ``group`` (``admin.group``'s id) the folder is then 0710 and that
    group's: its members may pass through to the admin socket, and can list
    or read nothing (if the folder cannot be given to the group, a warning
    says so and it stays 0700).
    """
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.close(os.open(data_dir / DB_NAME, os.O_WRONLY | os.O_CREAT, 0o600))
        for path in [data_dir, *(data_dir / name for name in PRIVATE_FILES)]:
            if path.exists():
                path.chmod(0o700 if path.is_dir() else 0o600)
                if path.stat().st_mode & 0o077:
                    raise PermissionError(
                        errno.EPERM, "its mode cannot be changed on this file system", str(path)
                    )
    except OSError as exc:
        raise StartupError(
            f"the data folder {data_dir} must be private to the user running meshd "
            f"(folder 0700, files 0600), and {exc.filename or data_dir} cannot be made so: "
            f"{exc.strerror}; choose another data.dir (or --data)"
        ) from None
    if group is not None:
        try:
            os.chown(data_dir, -1, group)
            data_dir.chmod(0o710)
        except OSError as exc:
            get_logger(component="core").warning(
                "the data folder cannot be given to admin.group: only the daemon's user "
                "reaches the admin socket",
                folder=str(data_dir),
                error=exc.strerror,
            )


def lock_data_dir(data_dir: Path, group: int | None = None) -> int:
    """Take the data folder's OS lock; a killed core's lock dies with it."""
    make_private(data_dir, group)
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(
            f"another meshd is already serving {data_dir} (lock {data_dir / LOCK_NAME} is held)"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def load_or_create(
    store: Store, plugins: PluginSet, world: WorldParams
) -> tuple[WorldSnapshot, bool]:
    """The stored world, or a freshly created one (``True`` when created)."""
    snapshot = store.load_world(plugins.codecs)
    if snapshot is not None:
        return snapshot, False
    records = create_world(plugins, world)
    created = WorldSnapshot(0, world.seed, len(records) + 1, records, [])
    created.converted = [record[0] for record in records]  # all of it is to store
    return created, True


def _heal_or_warn(snapshot: WorldSnapshot, plugins: PluginSet) -> None:
    """Quarantined entities run again if the plugins' code changed since (a fix and a restart
    heal them); otherwise they stay frozen, and the log says how to release them."""
    log = get_logger(component="core")
    if snapshot.code and snapshot.code != plugins.code_digest():
        log.info(
            "the plugins' code changed since entities were quarantined: they run again",
            entities=snapshot.quarantined,
        )
        snapshot.quarantined = []
    else:
        log.warning(
            "entities stay quarantined (the plugins' code is the same): fix the plugin and "
            "restart, or `meshd release --all`",
            entities=snapshot.quarantined,
        )


def _check_players_port(config: Config) -> None:
    """TLS that loads, or plain TCP where it may be: refused (``ConfigError``) before anything
    starts, or a warning at every start when ``gateway.allow_plaintext`` lets it through."""
    gateway = config.gateway
    if not gateway.listen:
        return
    if gateway.tls_cert:  # bad files fail here, once, rather than in every gateway process
        server_context(gateway.tls_cert, gateway.tls_key)
    exposed = check_plaintext(gateway)
    if exposed:
        get_logger(component="core").warning(
            "players' port speaks plain TCP on an address other machines reach: names and "
            "secrets cross the network in clear (gateway.allow_plaintext = true); set "
            "gateway.tls_cert and gateway.tls_key to serve TLS",
            listen=gateway.listen,
            addresses=exposed,
        )


def load_accounts(store: Store) -> tuple[Registry, list[tuple[str, str]]]:
    """The stored accounts, and the stored names (``(was, now)``) that took their canonical
    form, written back now (:meth:`Registry.load`)."""
    registry, renames = Registry.load(
        (name, Account(salt, digest, entity, kdf, disabled))
        for name, salt, digest, entity, kdf, disabled in store.players()
    )
    for old, new in renames:
        store.rename_account(old, new)
    return registry, renames


def _accounts(store: Store) -> Registry:
    """The stored accounts for the daemon, what changed in them at loading logged."""
    registry, renames = load_accounts(store)
    log = get_logger(component="core")
    for old, new in renames:
        log.info("stored name renamed to its canonical form", was=old, name=new)
    for name, why in registry.unreachable.items():
        log.warning(
            "no login can reach this account: `meshd accounts rename` or `delete` it",
            name=name,
            why=why,
        )
    return registry


async def serve(
    config: Config,
    *,
    ticks: int | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> RunSummary:
    """Run the world until ``ticks`` more ticks are done or a stop signal arrives.

    Raises :class:`ConfigError` or :class:`StartupError` before any tick if
    the configuration, plugins or data folder are unusable, or
    :class:`~meshd.mesh.supervisor.WorkerFailed` if the workers cannot be started.
    """
    log = get_logger(component="core")
    # Past a file size limit, writes must fail with EFBIG (retried like a
    # full disk) instead of killing the core.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _check_players_port(config)
    plugins = load_plugin_set(config)
    try:
        group = admin_group(config.admin.group)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    data_dir = config.data_dir
    lock_fd = lock_data_dir(data_dir, None if group is None else group.gr_gid)
    store = Store(data_dir / DB_NAME, synchronous=config.data.synchronous)
    supervisor: Supervisor | None = None
    reservation = Reservation()
    try:
        players = config.gateway.listen != ""
        if players:
            reservation = reserve(config.gateway)
        snapshot, created = load_or_create(store, plugins, world_params(config))
        if not created and snapshot.seed != config.world.seed:
            log.warning(
                "world.seed differs from the stored world's; keeping the stored seed",
                stored=snapshot.seed,
                configured=config.world.seed,
            )
        world = world_params(config, seed=snapshot.seed)
        if created:
            log.info("created a new world", entities=len(snapshot.records), seed=world.seed)
        else:
            log.info("loaded world", tick=snapshot.tick, entities=len(snapshot.records))
        if snapshot.converted and not created:
            log.info(
                "converted stored states to the plugins' state classes",
                entities=len(snapshot.converted),
            )
        if snapshot.quarantined:
            _heal_or_warn(snapshot, plugins)
        dynamic = config.mesh.mode == "dynamic"
        workers = config.mesh.min_workers if dynamic else config.mesh.workers
        layout = Layout.grid(world.size, world.halo, effective_grid(config, workers), workers)
        store_lock = trio.CapacityLimiter(1)

        replication = Replication(
            plugins,
            world,
            layout,
            snapshot,
            quarantine_after=config.supervise.quarantine_after,
            cell_size=cell_size(config.gateway) if players else 0.0,
        )
        if snapshot.converted or snapshot.classes != plugins.classes():
            # A new world, or states in new classes: stored at once, converted never again.
            store.write(replication.take_delta(), plugins.schema())
        planner = Planner(planner_settings(config), layout, snapshot.tick) if dynamic else None
        supervisor = Supervisor(
            Init(
                world=world,
                plugins=list(config.plugins.load),
                plugin_dirs=[str(d) for d in config.plugin_dirs],
                settings=config.plugins.settings,
                strict=config.mesh.strict,
            ),
            max_restarts=config.supervise.max_restarts,
            restart_window=config.supervise.restart_window,
            spares=config.supervise.spares,
        )
        pipeline = Pipeline(
            replication,
            checkpoint_every=config.tick.checkpoint_every,
            persist_every=config.tick.persist_every,
            planner=planner,
        )
        journal = Journal(data_dir / JOURNAL_NAME) if config.data.journal else None
        gateway = (
            Gateways(
                config,
                plugins,
                world,
                replication,
                _accounts(store),
                supervisor,
                reservation,
                AccountStore(store, store_lock),
                journal,
            )
            if players
            else None
        )
        core = Core(config, plugins, pipeline, supervisor, store, store_lock, gateway)
        send_delta, receive_delta = trio.open_memory_channel[tuple[Delta, Schema]](0)
        async with trio.open_nursery() as outer:
            outer.start_soon(persist_loop, core, receive_delta)
            if journal is not None:
                outer.start_soon(journal.run)
            async with send_delta, trio.open_nursery() as services:
                await supervisor.listen()
                services.start_soon(supervisor.accept_loop)
                services.start_soon(watch_signals, core)
                await services.start(serve_admin, core, data_dir / SOCKET_NAME, group)
                await supervisor.start_all(layout.workers)
                if gateway is not None:
                    await services.start(gateway.serve)
                core.usage.begin(time.monotonic(), time.process_time(), len(supervisor.links))
                services.start_soon(supervisor.refill_spares)
                log.info(
                    "serving",
                    gateway=gateway.address if gateway is not None else None,
                    mode=config.mesh.mode,
                    workers=len(layout.workers),
                    partitions=len(layout.owners),
                    tick=replication.tick,
                    rate=config.tick.rate,
                    data=str(data_dir),
                )
                task_status.started(core)
                try:
                    summary = await tick_loop(core, ticks, send_delta)
                finally:
                    if journal is not None:
                        journal.close()
                    with trio.CancelScope(shield=True):
                        if gateway is not None:
                            await gateway.stop()
                        await supervisor.stop_all()
                services.cancel_scope.cancel()
        summary.hash = replication.hash()
        log.info(
            "stopped",
            tick=replication.tick,
            persisted=core.persisted_tick,
            ticks=summary.last_tick - summary.first_tick + 1,
        )
        log.info("cost report", **summary.usage)
        return summary
    finally:
        reservation.close()
        if supervisor is not None:
            supervisor.cleanup()
        store.close()
        (data_dir / SOCKET_NAME).unlink(missing_ok=True)
        os.close(lock_fd)
