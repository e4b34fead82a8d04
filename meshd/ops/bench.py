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
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

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
from meshd.ops.serve import serve, world_params
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


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of running processes (Linux ``/proc``)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _children(pid: int) -> list[int]:
    """``pid`` and its child processes (the native bots run under ``meshd bots``)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return [pid]
    return [pid, *map(int, children)]


def bench_players(
    players: int = 1000, seconds: float = 30.0, rate: float = 20.0, engine: str = "native"
) -> dict[str, Any]:
    """``players`` bot connections from a separate process against a separate server.

    The load shape of the common one-room benchmark: a view update every
    tick, a move input from every bot ten times a second, half the bots
    wandering over a 1,000 m square, half crowding a 25 m tavern at its centre.
    ``engine``: the bots' (``native`` by default, so the bots' own CPU leaves
    the machine to the server it measures).
    """
    from meshd.ops import admin

    with tempfile.TemporaryDirectory(prefix="meshd-bench-") as tmp:
        config = Path(tmp) / "players.toml"
        config.write_text(
            "\n".join(
                [
                    "[world]",
                    "size = 1000.0",
                    "seed = 7",
                    "[tick]",
                    f"rate = {rate}",
                    "[data]",
                    f'dir = "{tmp}/data"',
                    "[gateway]",
                    'listen = "127.0.0.1:0"',
                    f"max_clients = {players + 100}",
                    "hash_cost = 10",
                    "[log]",
                    'level = "warning"',
                    "[plugins]",
                    'load = ["tavern"]',
                    f'dirs = ["{REPO_PLUGINS}"]',
                    "[plugins.tavern]",
                    "npcs = 0",
                    "",
                ]
            )
        )
        server = subprocess.Popen(
            [sys.executable, "-m", "meshd", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        socket_path = Path(tmp) / "data" / "meshd.sock"
        try:
            status = _wait_for_gateway(socket_path)
            address = status["gateway"]["address"]
            bots = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "meshd",
                    "bots",
                    "--connect",
                    address,
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
                stderr=subprocess.DEVNULL,
                text=True,
            )
            # Measure the server while every bot is connected and playing.
            while (
                admin.request(socket_path, admin.AdminRequest("status"))["gateway"]["players"]
                < players
                and bots.poll() is None
            ):
                time.sleep(0.2)
            workers = [w["pid"] for w in admin.request(socket_path, admin.AdminRequest("workers"))]
            before = admin.request(socket_path, admin.AdminRequest("status"))
            started = time.monotonic()
            core_before, workers_before = _cpu_seconds([server.pid]), _cpu_seconds(workers)
            bots_before = _cpu_seconds(_children(bots.pid))
            time.sleep(seconds * 0.8)
            after = admin.request(socket_path, admin.AdminRequest("status"))
            core_after, workers_after = _cpu_seconds([server.pid]), _cpu_seconds(workers)
            bots_after = _cpu_seconds(_children(bots.pid))
            elapsed = time.monotonic() - started
            summary = json.loads(bots.communicate(timeout=seconds * 4 + 600)[0])
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    ticks = after["tick"] - before["tick"]
    core_cpu, workers_cpu = core_after - core_before, workers_after - workers_before
    sent = after["gateway"]["bytes_sent"] - before["gateway"]["bytes_sent"]
    return {
        "players": players,
        "connected": summary["connected"],
        "disconnects": summary["disconnects"],
        "rate_hz": rate,
        "measured_rate_hz": round(ticks / elapsed, 2),
        "tick_ms": after["tick_ms"],
        "updates_per_s": summary["updates_per_s"],
        "updates_per_s_min": summary["updates_per_s_min"],
        "tick_gaps": summary["tick_gaps"],
        "rtt_ms": summary["rtt_ms"],
        "server_cpu": {
            "cores": round((core_cpu + workers_cpu) / elapsed, 2),
            "core": round(core_cpu / elapsed, 2),
            "workers": round(workers_cpu / elapsed, 2),
            "processes": 1 + len(workers),
        },
        "bots_cpu": round((bots_after - bots_before) / elapsed, 2),
        "engine": engine,
        "bytes_per_client_s": round(sent / max(summary["connected"], 1) / elapsed),
        "connect_s": summary["connect_s"],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def _wait_for_gateway(socket_path: Path, timeout: float = 60.0) -> dict[str, Any]:
    from meshd.ops import admin

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = admin.request(socket_path, admin.AdminRequest("status"), timeout=5)
            if status["gateway"] and status["gateway"]["address"]:
                return status
        except admin.AdminError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not start its gateway")
