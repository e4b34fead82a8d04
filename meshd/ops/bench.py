"""Benchmarks: the mesh measured against a bare single-process loop, side by side.

``bench_sim`` runs the tavern world three ways in one process tree, on the
same machine at the same time of day: a bare loop (the same plugin systems,
no mesh, no sockets, no persistence), then ``serve`` with one and with two
worker processes. It also checks that all three end in the same world.
``bench_failover``, ``bench_rush`` and ``bench_players`` do the same for
failures, a day with a rush, and player connections.

It is long because each benchmark is a whole scenario (set up, run side by
side, report figures); they share the world configurations and the
statistics, which would otherwise be repeated in four files.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import multiprocessing
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import trio

from meshd.common.config import Config, MeshConfig, load_config
from meshd.mesh.messages import WorldParams
from meshd.mesh.plugins import PluginSet, load_plugin_set
from meshd.mesh.step import (
    Context,
    Entity,
    collect_between_ticks,
    create_world,
    group_events,
    run_entity,
    snapshot_views,
)
from meshd.mesh.usage import percentile
from meshd.ops import admin
from meshd.ops.serve import SOCKET_NAME, serve, world_params
from meshd.store.codec import to_row, world_hash

REPO_PLUGINS = Path(__file__).resolve().parents[2] / "plugins"
"""The example plugins of a checkout (benchmarks run the tavern)."""


def bare_loop(
    plugins: PluginSet,
    world: WorldParams,
    ticks: int,
    first_tick: int = 1,
    tick_cpu_ms: list[float] | None = None,
) -> tuple[float, int, str]:
    """Run the plugin systems with nothing around them; (seconds, entity-ticks, world hash).

    The world is created as at tick 0 and run from ``first_tick``; with
    ``tick_cpu_ms`` each tick's CPU milliseconds are appended to it.
    """
    records = create_world(plugins, world)
    codecs = plugins.codecs
    entities = {
        r[0]: Entity(r[0], r[1], r[2], r[3], r[4], codecs[r[1]].from_wire(r[5])) for r in records
    }
    next_id, events = len(records) + 1, []
    handlers, systems = plugins.handlers, plugins.systems
    entity_ticks = 0
    gc.disable()  # the same collection policy as a worker process
    started = time.perf_counter()
    for tick in range(first_tick, first_tick + ticks):
        tick_started = time.process_time()
        prev, index = snapshot_views(entities.values(), (), world.halo)
        ctx = Context(plugins, world, tick, index)
        inbox, _inputs = group_events(events)
        for entity in entities.values():
            run_entity(
                entity,
                prev[entity.id],
                ctx,
                inbox.get(entity.id, ()),
                handlers,
                systems[entity.kind],
                codecs[entity.kind],
                ctx.max_step[entity.kind],
            )
        entity_ticks += len(entities)
        for entity_id in ctx.despawned:
            del entities[entity_id]
        for _parent, _seq, kind, x, y, z, state in sorted(ctx.spawns, key=lambda s: s[:2]):
            entities[next_id] = Entity(next_id, kind, x, y, z, codecs[kind].from_wire(state))
            next_id += 1
        events = [e for e in ctx.events if e[0] in entities]
        if tick_cpu_ms is not None:
            tick_cpu_ms.append((time.process_time() - tick_started) * 1000.0)
        collect_between_ticks(tick)
    seconds = time.perf_counter() - started
    gc.enable()
    schema = plugins.schema()
    rows = (
        to_row([e.id, e.kind, e.x, e.y, e.z, codecs[e.kind].to_wire(e.state)], schema)
        for e in sorted(entities.values(), key=lambda e: e.id)
    )
    return seconds, entity_ticks, world_hash(rows, next_id, events)


def _bare_run(npcs: int, ticks: int) -> tuple[float, int, str]:
    config = _sim_config(npcs, 1, Path(tempfile.gettempdir()))
    return bare_loop(load_plugin_set(config), world_params(config), ticks)


def _tavern_config(data_dir: Path, **overrides: Any) -> Config:
    """The tavern with seed 7, quiet logs and no gateway; ``overrides`` are dotted keys."""
    return load_config(
        None,
        search_default=False,
        environ={},
        overrides={
            "world.seed": 7,
            "supervise.max_restarts": 1_000_000,
            "data.dir": str(data_dir),
            "gateway.listen": "",
            "log.level": "warning",
            "plugins.load": ["tavern"],
            "plugins.dirs": [str(REPO_PLUGINS)],
            **overrides,
        },
    )


def _sim_config(
    npcs: int, workers: int, data_dir: Path, rate: float = 0.0, checkpoint_every: int = 10
) -> Config:
    """The tavern at constant density (2,000 NPCs per 400 m square), as fast as possible."""
    return _tavern_config(
        data_dir,
        **{
            "world.size": 400.0 * math.sqrt(max(npcs, 1) / 2000.0),
            "tick.rate": rate,
            "tick.checkpoint_every": checkpoint_every,
            "mesh.mode": "static",
            "mesh.workers": workers,
            "plugins.tavern": {"npcs": npcs},
        },
    )


def bench_sim(npcs: int = 10_000, ticks: int = 200, repeat: int = 1) -> dict[str, Any]:
    """Entity updates per second: bare loop, 1 worker, 2 workers; medians over ``repeat`` runs."""
    bare_rates: list[float] = []
    mesh_rates: dict[int, list[float]] = {1: [], 2: []}
    tick_ms: dict[int, list[float]] = {1: [], 2: []}
    hashes = set()
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="meshd-bench-") as tmp:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                # A fresh interpreter, like a worker process, so neither side
                # inherits the other's heap.
                seconds, entity_ticks, digest = pool.submit(_bare_run, npcs, ticks).result()
            bare_rates.append(entity_ticks / seconds)
            hashes.add(digest)
            for workers in (1, 2):
                config = _sim_config(npcs, workers, Path(tmp) / f"{workers}w")
                summary = trio.run(lambda config=config: serve(config, ticks=ticks))
                mesh_rates[workers].append(summary.entity_ticks / summary.loop_seconds)
                tick_ms[workers].extend(summary.tick_ms)
                hashes.add(summary.hash)
    bare = statistics.median(bare_rates)
    one, two = statistics.median(mesh_rates[1]), statistics.median(mesh_rates[2])
    return {
        "entities": npcs,
        "ticks": ticks,
        "runs": repeat,
        "bare_updates_per_s": round(bare),
        "updates_per_s_1w": round(one),
        "updates_per_s_2w": round(two),
        "ratio_1w": round(one / bare, 3),
        "ratio_2w": round(two / bare, 3),
        "tick_ms_1w": _percentiles(tick_ms[1]),
        "tick_ms_2w": _percentiles(tick_ms[2]),
        "same_world": len(hashes) == 1,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def bench_failover(
    npcs: int = 10_000,
    seconds: float = 20.0,
    rate: float = 20.0,
    kill_every: float = 2.0,
    workers: int = 2,
    checkpoint_every: int = 10,
) -> dict[str, Any]:
    """SIGKILL a random worker every ``kill_every`` s; measure the stall against a calm run.

    A kill waits for the previous failover to have committed its tick.

    The stall of one kill runs from the SIGKILL to the commit of the tick
    that was in flight (the affected partitions' delay). Both runs simulate
    the same ticks from the same seed, so they must end in the same world.
    """
    ticks = max(int(seconds * rate), 1)
    rng = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="meshd-bench-") as tmp:
        calm_config = _sim_config(npcs, workers, Path(tmp) / "calm", rate, checkpoint_every)
        calm = trio.run(lambda: serve(calm_config, ticks=ticks))
        faulty_config = _sim_config(npcs, workers, Path(tmp) / "faulty", rate, checkpoint_every)
        kills: list[tuple[float, int]] = []
        outcome: dict[str, Any] = {}

        async def run_faulty() -> None:
            async def serve_it(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                outcome["summary"] = await serve(
                    faulty_config, ticks=ticks, task_status=task_status
                )

            async with trio.open_nursery() as nursery:
                core = await nursery.start(serve_it)
                outcome["core"] = core
                while "summary" not in outcome:
                    await trio.sleep(kill_every)
                    # The next kill waits for the last failover to commit: a
                    # slot killed again mid-replay would never catch up.
                    while any(f.committed_at is None for f in core.failover_log):
                        await trio.sleep(0.01)
                    links = core.supervisor.links
                    if "summary" in outcome or not links:
                        break
                    worker = rng.choice(sorted(links))
                    kills.append((time.monotonic(), worker))
                    os.kill(links[worker].pid, signal.SIGKILL)

        trio.run(run_faulty)
    faulty, core = outcome["summary"], outcome["core"]
    stalls_ms = []
    for killed_at, worker in kills:
        for failover in core.failover_log:
            if failover.worker == worker and failover.replaced_at >= killed_at:
                if failover.committed_at is not None:
                    stalls_ms.append((failover.committed_at - killed_at) * 1000.0)
                break
    budget_ms = 1000.0 / rate
    stall_ticks = [ms / budget_ms for ms in stalls_ms]
    return {
        "entities": npcs,
        "workers": workers,
        "rate_hz": rate,
        "ticks": ticks,
        "checkpoint_every": checkpoint_every,
        "kills": len(stalls_ms),
        "stall_ticks": _spread(stall_ticks),
        "stall_ms": _spread(stalls_ms),
        "tick_ms": _percentiles(faulty.tick_ms),
        "baseline_tick_ms": _percentiles(calm.tick_ms),
        "same_world": faulty.hash == calm.hash,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {"median": 0.0, "max": 0.0}
    return {"median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def _percentiles(values: list[float]) -> dict[str, float]:
    return {"p50": round(percentile(values, 50), 2), "p99": round(percentile(values, 99), 2)}


def _rush_window(day_ticks: int) -> tuple[int, int]:
    """The ticks from the crowd setting off (centred on noon) to its return home."""
    start = day_ticks // 2 - day_ticks // 16
    return start, start + 2 * (day_ticks // 8)


RUSH_TAVERN = {"tavern_x": 0.3, "tavern_y": 0.6, "rush_share": 0.8}
"""Where the rush goes, and how many join it."""


def _rush_world_size(npcs: int) -> float:
    return 200.0 * math.sqrt(max(npcs, 1) / 1000.0)


def _rush_peak_ms(npcs: int, day_ticks: int) -> float:
    """CPU ms per tick of a day of ``npcs`` patrons at its busiest: the rush's crowd gathered.

    A bare loop (the plugin's systems alone) over the rush's world, from the
    tick the crowd sets off to the tick it turns home; the busiest ten ticks
    in a row, averaged. The mesh costs somewhat more than this (ghosts,
    replies), so a day sized by it needs at least what it asks for.
    """
    rush_from, _rush_to = _rush_window(day_ticks)
    with tempfile.TemporaryDirectory(prefix="meshd-bench-") as tmp:
        config = _rush_config(npcs, Path(tmp), 0.0, "static", 1, day_ticks)
        tick_ms: list[float] = []
        bare_loop(load_plugin_set(config), world_params(config), day_ticks // 8, rush_from, tick_ms)
    window = 10
    return max(statistics.mean(tick_ms[i : i + window]) for i in range(len(tick_ms) - window))


def calibrate_rush(rate: float, day_ticks: int, peak_budgets: float = 2.0) -> tuple[int, float]:
    """(patrons, CPU ms per patron per tick at the peak): a day whose busiest ticks need
    about ``peak_budgets`` times what one worker may spend per tick (``mesh.budget_ms``).

    A crowd's cost per patron grows with its density, so the size is found by
    measuring at a guess, then at the size that cost implies, until they agree.
    """
    budget_ms = 1000.0 / rate * MeshConfig().utilisation
    npcs, per_patron = 1000, 0.0
    for _ in range(4):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            per_patron = pool.submit(_rush_peak_ms, npcs, day_ticks).result() / npcs
        wanted = max(round(peak_budgets * budget_ms / per_patron), 1)
        if abs(wanted - npcs) <= 0.05 * npcs:
            return wanted, per_patron
        npcs = wanted
    return npcs, per_patron


def _rush_config(
    npcs: int, data_dir: Path, rate: float, mode: str, max_workers: int, day_ticks: int
) -> Config:
    """A tavern day: night, a busy noon with a rush into an off-centre tavern, night again."""
    return _tavern_config(
        data_dir,
        **{
            "world.size": _rush_world_size(npcs),
            "tick.rate": rate,
            "mesh.mode": mode,
            "mesh.workers": max_workers,
            "mesh.max_workers": max_workers,
            "plugins.tavern": {
                "npcs": npcs,
                **RUSH_TAVERN,
                "crowd_share": 0.0,
                "day_ticks": day_ticks,
                "night_awake": 0.1,
                "day_shape": 6.0,
                "rush_at": _rush_window(day_ticks)[0],
                "rush_ticks": day_ticks // 8,
            },
        },
    )


def bench_rush(
    npcs: int | None = None,
    day_ticks: int = 2400,
    rate: float = 20.0,
    max_workers: int | None = None,
    plot: Path | None = None,
) -> dict[str, Any]:
    """The same tavern day twice: the dynamic mesh, then a static grid of ``max_workers``.

    Tick times are reported over the rush (from the crowd setting off to its
    return home); worker-seconds over the whole day. Without ``npcs`` the
    crowd is sized to this machine (:func:`calibrate_rush`): its noon peak
    needs about two workers' budgets, so the dynamic mesh has to grow.
    """
    max_workers = max_workers or os.cpu_count() or 1
    patron_ms = None
    if npcs is None:
        npcs, patron_ms = calibrate_rush(rate, day_ticks)
    rush_from, rush_to = _rush_window(day_ticks)
    results: dict[str, Any] = {}
    timelines = {}
    hashes = set()
    with tempfile.TemporaryDirectory(prefix="meshd-bench-") as tmp:
        for mode in ("dynamic", "static"):
            config = _rush_config(npcs, Path(tmp) / mode, rate, mode, max_workers, day_ticks)
            summary = trio.run(lambda config=config: serve(config, ticks=day_ticks))
            hashes.add(summary.hash)
            rush = [s.tick_ms for s in summary.timeline if rush_from <= s.tick <= rush_to]
            usage = summary.usage
            results[mode] = {
                "tick_ms": {**_percentiles(rush), "max": round(max(rush), 2)},
                "day_tick_ms": _percentiles(summary.tick_ms),
                "peak_workers": usage["peak_workers"],
                "final_workers": usage["workers"],
                "max_leaves": usage["max_leaves"],
                "handoffs_per_s": usage["handoffs_per_s"],
                "plan_handoffs": usage["plan_handoffs"],
                "worker_seconds": usage["worker_seconds"],
                "static_peak_worker_seconds": usage["static_peak_worker_seconds"],
                "worker_cpu_seconds": usage["worker_cpu_seconds"],
                "core_cpu_seconds": usage["core_cpu_seconds"],
                "rate_hz": round(day_ticks / usage["elapsed_s"], 2),
            }
            timelines[mode] = [(s.seconds, s.workers, s.tick_ms) for s in summary.timeline]
    budget_ms = 1000.0 / rate
    dynamic, static = results["dynamic"], results["static"]
    if plot is not None:
        from meshd.ops.plots import draw_timeline

        draw_timeline(timelines, budget_ms, plot)
    return {
        "entities": npcs,
        "calibrated": patron_ms is not None,
        "patron_us": round(patron_ms * 1000.0, 2) if patron_ms is not None else None,
        "day_ticks": day_ticks,
        "rush_ticks": [rush_from, rush_to],
        "rate_hz": rate,
        "max_workers": max_workers,
        "budget_ms": budget_ms,
        **results,
        "dynamic_vs_static_peak": round(
            dynamic["worker_seconds"] / static["static_peak_worker_seconds"], 3
        ),
        "same_world": len(hashes) == 1,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


PLAYERS_WINDOW_SHARE = 0.8
"""The share of the bots' play that ``bench players`` measures: the rest is slack
for the bots starting their clock a little after the server sees them all."""
ADMIN_TIMEOUT = 10.0
"""Seconds one admin request of ``bench players`` may take (a server slower than this is stuck)."""
CONNECT_STALL = 10.0
"""Seconds without a new player, once some are in, before the rest are given up on."""
BOTS_GRACE = 120.0
"""Seconds past their play the bots get to print their summary (many Python bots close slowly)."""
STOP_TIMEOUT = 60.0
"""Seconds a SIGTERMed server gets to write its last tick before it is killed."""


class BenchError(RuntimeError):
    """A benchmark could not measure anything (the server or its bots did not get going)."""


@attrs.frozen
class WindowCpu:
    """CPU seconds each group of processes used in a measurement window, and the groups' sizes."""

    core: float
    workers: float
    gateways: float
    bots: float
    worker_processes: int = 0
    gateway_processes: int = 0


def _cpu_by_pid(pids: Iterable[int]) -> dict[int, float]:
    """User + system CPU seconds of each running process (Linux ``/proc``); gone ones left out."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds: dict[int, float] = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        seconds[pid] = (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def _cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two readings by the processes alive at both.

    A process that ended (or was replaced) in between is left out: counting
    only its first reading would subtract the time it had used before.
    """
    return sum(max(0.0, after[pid] - before[pid]) for pid in before.keys() & after.keys())


def _children(pid: int) -> list[int]:
    """``pid`` and its child processes (the native bots run under ``meshd bots``)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return [pid]
    return [pid, *map(int, children)]


def _gateway_players(status: dict[str, Any]) -> int:
    """Players the server holds (over all its gateways); 0 without a gateway."""
    gateway = status.get("gateway")
    return int(gateway["players"]) if gateway else 0


def _bytes_sent(status: dict[str, Any]) -> int:
    """Bytes the server has sent to players (over all its gateways); 0 without a gateway."""
    gateway = status.get("gateway")
    return int(gateway["bytes_sent"]) if gateway else 0


def _per_second(value: float, elapsed: float, digits: int = 2) -> float:
    return round(value / elapsed, digits)


def players_row(
    *,
    players: int,
    rate: float,
    engine: str,
    before: dict[str, Any],
    after: dict[str, Any],
    cpu: WindowCpu,
    bots: dict[str, Any] | None,
    elapsed: float,
    gateway_rows: list[dict[str, Any]],
    load_before: float,
    incomplete: str | None = None,
) -> dict[str, Any]:
    """One ``bench players`` row from what a measurement window saw; pure, so tested on its own.

    ``before``/``after``: the admin ``status`` at the window's two ends;
    ``cpu``: what each group of processes used in between; ``bots``: the
    bots' summary (``None`` when they printed none: their figures are then
    ``None``, as are counters bots of an older build do not keep);
    ``gateway_rows``: the admin ``gateways`` rows at the window's end;
    ``incomplete``: why the window is not the whole story, if it is not.

    Per-player figures divide by the players the server held during the
    window (the mean of its two ends): what the server actually carried, even
    when a few bots never got in.

    ``server_cpu_ms_per_player_s`` is the server's CPU (core, workers and
    gateways) per player per second of wall time. A server that falls behind
    its target rate runs fewer ticks each second, so it does less work each
    second and looks cheaper per player than it would be at full rate.
    ``..._at_20hz`` scales it by target / measured rate (only when below the
    target): the cost at the target rate (20 Hz unless ``--rate`` says
    otherwise) if each tick cost what it did, so the rows of a series compare
    like with like. Both are ``None`` when the server held no player.

    Raises :class:`ValueError` for an empty window (``elapsed`` not > 0).
    """
    if elapsed <= 0:
        raise ValueError(f"a measurement window of {elapsed} s measures nothing")
    measured_rate = (after["tick"] - before["tick"]) / elapsed
    held = (_gateway_players(before) + _gateway_players(after)) / 2
    server = cpu.core + cpu.workers + cpu.gateways
    cores = server / elapsed
    per_player = 1000.0 * cores / held if held else None
    at_target = per_player
    if per_player is not None and measured_rate < rate:
        at_target = per_player * rate / measured_rate if measured_rate > 0 else None
    sent = _bytes_sent(after) - _bytes_sent(before)
    summary = bots or {}
    return {
        "players": players,
        "connected": summary.get("connected"),
        "window_players": round(held, 1),
        "disconnects": summary.get("disconnects"),
        "disconnect_reasons": summary.get("disconnect_reasons"),
        # the bots' reconnect counters (bots that lost their connection and came back)
        "reconnects": summary.get("reconnects"),
        "reconnected_bots": summary.get("reconnected_bots"),
        "reconnect_ms": summary.get("reconnect_ms"),
        "reconnect_gaps": summary.get("reconnect_gaps"),
        "entity_changed": summary.get("entity_changed"),
        "rate_hz": rate,
        "measured_rate_hz": round(measured_rate, 2),
        "tick_ms": after.get("tick_ms"),
        "tick_interval_ms": after.get("tick_interval_ms"),
        "updates_per_s": summary.get("updates_per_s"),
        "updates_per_s_min": summary.get("updates_per_s_min"),
        "tick_gaps": summary.get("tick_gaps"),
        "rtt_ms": summary.get("rtt_ms"),
        "server_cpu": {
            "cores": round(cores, 2),
            "core": _per_second(cpu.core, elapsed),
            "workers": _per_second(cpu.workers, elapsed),
            "gateways": _per_second(cpu.gateways, elapsed),
            "processes": 1 + cpu.worker_processes + cpu.gateway_processes,
        },
        "bots_cpu": _per_second(cpu.bots, elapsed),
        "server_cpu_ms_per_player_s": None if per_player is None else round(per_player, 3),
        "server_cpu_ms_per_player_s_at_20hz": None if at_target is None else round(at_target, 3),
        "bytes_per_client_s": round(sent / held / elapsed) if held else None,
        "gateway_processes": len(gateway_rows),
        "gateway_players": [row["players"] for row in gateway_rows],
        "engine": engine,
        "connect_s": summary.get("connect_s"),
        "window_s": round(elapsed, 2),
        "incomplete": incomplete,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_before": round(load_before, 2),
    }


def _players_config(folder: Path, players: int, rate: float, gateways: int = 0) -> str:
    """``bench players``'s server configuration: a 1,000 m tavern world with no NPCs.

    ``gateways`` > 0 sets ``gateway.processes``; 0 leaves it out, so the
    server picks its default (and a server without the setting still starts).
    """
    lines = [
        "[world]",
        "size = 1000.0",
        "seed = 7",
        "[tick]",
        f"rate = {rate}",
        "[data]",
        f'dir = "{folder}/data"',
        "[gateway]",
        'listen = "127.0.0.1:0"',
        f"max_clients = {players + 100}",
        "hash_cost = 10",  # logins are not what this measures
        "max_pending_per_address = 256",  # every bot comes from this host
        f"max_players_per_address = {players + 100}",
        *([f"processes = {gateways}"] if gateways > 0 else []),
        "[log]",
        'level = "warning"',
        "[plugins]",
        'load = ["tavern"]',
        f'dirs = ["{REPO_PLUGINS}"]',
        "[plugins.tavern]",
        "npcs = 0",
        "",
    ]
    return "\n".join(lines)


def _ask(socket_path: Path, view: str) -> Any:
    return admin.request(socket_path, admin.AdminRequest(view), timeout=ADMIN_TIMEOUT)


def _gateway_rows(socket_path: Path) -> list[dict[str, Any]]:
    """The server's gateway processes (admin ``gateways``), by id; none from a server without them.

    Any other admin failure is raised (:class:`admin.AdminError`).
    """
    try:
        rows: list[dict[str, Any]] = _ask(socket_path, "gateways")
    except admin.AdminError as exc:
        if "unknown view" in str(exc):
            return []
        raise
    return sorted(rows, key=lambda row: row["id"])


def _tail(log: Path, lines: int = 5) -> str:
    """The last lines a process wrote to ``log``, on one line, for an error message."""
    try:
        text = log.read_text(errors="replace").strip()
    except FileNotFoundError:
        return "(no output)"
    return " | ".join(text.splitlines()[-lines:]) or "(no output)"


def _stop(process: subprocess.Popen[Any], timeout: float, *, group: bool = False) -> None:
    """Stop ``process`` (started in its own session) and whatever is left of its process group.

    SIGTERM first: to the whole group when ``group`` (the bots), else to the
    process alone (the server's core stops its own workers, which must not
    be signalled before it writes its last tick). SIGKILL to the group after
    ``timeout`` seconds, and to any member left once the process is gone (the
    workers of a core that died; Linux does not reuse a process group's id
    while a member lives). Gives up waiting 10 s after the SIGKILL (a process
    stuck in the kernel) rather than hang.
    """
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(process.pid, signal.SIGTERM)
            else:
                process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def _wait_for_players(
    socket_path: Path, players: int, bots: subprocess.Popen[str], timeout: float
) -> str | None:
    """Wait until the server holds ``players`` players; or why it stopped waiting before.

    It stops early when the bots exit, after :data:`CONNECT_STALL` seconds
    without a new player once some are in (the rest were refused or timed
    out: the bots start playing anyway), or after ``timeout`` seconds. Admin
    failures are raised.
    """
    deadline = time.monotonic() + timeout
    seen, since = 0, time.monotonic()
    while True:
        held = _gateway_players(_ask(socket_path, "status"))
        now = time.monotonic()
        if held >= players:
            return None
        if bots.poll() is not None:
            return f"the bots exited (code {bots.returncode}) with {held} of {players} connected"
        if held != seen:
            seen, since = held, now
        elif held and now - since > CONNECT_STALL:
            return f"{held} of {players} connected; none more for {CONNECT_STALL:g} s"
        if now > deadline:
            return f"{held} of {players} connected after {timeout:g} s"
        time.sleep(0.2)


@attrs.frozen
class _Window:
    before: dict[str, Any]
    after: dict[str, Any]
    cpu: WindowCpu
    elapsed: float
    gateway_rows: list[dict[str, Any]]
    cut_short: bool


def _measure(
    socket_path: Path,
    server: subprocess.Popen[bytes],
    bots: subprocess.Popen[str],
    length: float,
    server_log: Path,
) -> _Window:
    """Measure the server and the bots for ``length`` seconds, or until the bots exit.

    The processes are those running at the window's start (worker and
    gateway pids from the admin socket). Raises :class:`BenchError` if the
    server exits meanwhile, and admin failures.
    """
    workers = [row["pid"] for row in _ask(socket_path, "workers") if row.get("pid")]
    gateways = [row["pid"] for row in _gateway_rows(socket_path) if row.get("pid")]
    bot_pids = _children(bots.pid)
    before = _ask(socket_path, "status")
    started = time.monotonic()
    groups = ([server.pid], workers, gateways, bot_pids)
    cpu_before = [_cpu_by_pid(pids) for pids in groups]
    end = started + length
    while (now := time.monotonic()) < end and bots.poll() is None:
        if server.poll() is not None:
            raise BenchError(
                f"the server exited (code {server.returncode}) while measured: {_tail(server_log)}"
            )
        time.sleep(min(0.2, end - now))
    after = _ask(socket_path, "status")
    cpu_after = [_cpu_by_pid(pids) for pids in groups]
    elapsed = time.monotonic() - started
    core, workers_cpu, gateways_cpu, bots_cpu = (
        _cpu_used(a, b) for a, b in zip(cpu_before, cpu_after, strict=True)
    )
    return _Window(
        before=before,
        after=after,
        cpu=WindowCpu(
            core=core,
            workers=workers_cpu,
            gateways=gateways_cpu,
            bots=bots_cpu,
            worker_processes=len(workers),
            gateway_processes=len(gateways),
        ),
        elapsed=elapsed,
        gateway_rows=_gateway_rows(socket_path),
        cut_short=bots.poll() is not None and elapsed < length,
    )


def _bots_summary(
    bots: subprocess.Popen[str], timeout: float, bots_log: Path
) -> tuple[dict[str, Any] | None, str | None]:
    """The bots' JSON summary once they exit; or ``None`` and why not.

    Bots still running after ``timeout`` seconds are stopped (they would
    hold the server's ports and this process up): nothing is read from them.
    """
    try:
        out, _ = bots.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(bots, timeout=10, group=True)
        return None, f"the bots printed no summary within {timeout:g} s and were stopped"
    try:
        summary: dict[str, Any] = json.loads(out)
    except json.JSONDecodeError:
        return None, f"the bots printed no summary (code {bots.returncode}): {_tail(bots_log)}"
    return summary, None


def bench_players(
    players: int = 1000,
    seconds: float = 30.0,
    rate: float = 20.0,
    engine: str = "native",
    gateways: int = 0,
) -> dict[str, Any]:
    """``players`` bot connections from a separate process against a separate server: one row.

    The load shape of the common one-room benchmark: a view update every
    tick, a move input from every bot ten times a second, half the bots
    wandering over a 1,000 m square, half crowding a 25 m tavern at its centre.
    ``engine``: the bots' (``native`` by default, so the bots' own CPU leaves
    the machine to the server it measures). ``gateways``: the server's
    gateway processes (``gateway.processes``; 0 = its default).

    The window starts once the server holds every bot (or no more arrive)
    and lasts :data:`PLAYERS_WINDOW_SHARE` of the bots' play; it ends early
    if the bots exit. The row says what was not measured (``incomplete``).
    Every wait has a timeout, and the server (in its own session) is
    SIGTERMed, then killed with what is left of its process group, whatever
    happens.

    Raises :class:`BenchError` when nothing could be measured (the server did
    not start, or the bots exited before the window), and
    :class:`admin.AdminError` when the server stops answering.
    """
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="meshd-bench-") as tmp:
        folder = Path(tmp)
        config = folder / "players.toml"
        config.write_text(_players_config(folder, players, rate, gateways))
        socket_path = folder / "data" / SOCKET_NAME
        server_log, bots_log = folder / "server.log", folder / "bots.log"
        with server_log.open("wb") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "meshd", "serve", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,  # so that a stuck server is killed with its workers
            )
        bots: subprocess.Popen[str] | None = None
        try:
            status = _wait_for_gateway(socket_path, server=server, log=server_log)
            with bots_log.open("wb") as log:
                bots = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "meshd",
                        "bots",
                        "--connect",
                        status["gateway"]["address"],
                        "--count",
                        str(players),
                        "--duration",
                        str(seconds),
                        "--scenario",
                        "crowd",
                        "--engine",
                        engine,
                        "--json",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                    start_new_session=True,  # the native bots run under it: stopped together
                )
            # Native bots compile on first use: the wait allows for that, then for logins.
            notes = [_wait_for_players(socket_path, players, bots, 120.0 + players / 10)]
            if bots.poll() is not None:
                summary, _ = _bots_summary(bots, 10.0, bots_log)
                why = notes[0] or f"the bots exited (code {bots.returncode})"
                reasons = (summary or {}).get("disconnect_reasons") or _tail(bots_log)
                raise BenchError(f"{why} before the window; nothing measured ({reasons})")
            window = _measure(socket_path, server, bots, seconds * PLAYERS_WINDOW_SHARE, server_log)
            if window.cut_short:
                notes.append(f"the bots exited {window.elapsed:.1f} s into the window")
            summary, problem = _bots_summary(
                bots, seconds * (1 - PLAYERS_WINDOW_SHARE) + BOTS_GRACE, bots_log
            )
            notes.append(problem)
        finally:
            if bots is not None:
                _stop(bots, timeout=10.0, group=True)
            _stop(server, timeout=STOP_TIMEOUT)
    return players_row(
        players=players,
        rate=rate,
        engine=engine,
        before=window.before,
        after=window.after,
        cpu=window.cpu,
        bots=summary,
        elapsed=window.elapsed,
        gateway_rows=window.gateway_rows,
        load_before=load_before,
        incomplete="; ".join(note for note in notes if note) or None,
    )


def _wait_for_gateway(
    socket_path: Path,
    timeout: float = 60.0,
    *,
    server: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> dict[str, Any]:
    """The server's status once its gateway listens; :class:`BenchError` if it exits or is late."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            output = _tail(log) if log is not None else ""
            raise BenchError(f"the server exited (code {server.returncode}): {output}")
        try:
            status: dict[str, Any] = admin.request(
                socket_path, admin.AdminRequest("status"), timeout=5
            )
            if status["gateway"] and status["gateway"]["address"]:
                return status
        except admin.AdminError:
            pass
        time.sleep(0.2)
    output = f": {_tail(log)}" if log is not None else ""
    raise BenchError(f"the server did not start its gateway within {timeout:g} s{output}")
