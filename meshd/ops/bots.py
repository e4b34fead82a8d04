"""``meshd bots``: many real player connections from one process, over the real protocol.

Each bot logs in (claiming ``bot-N`` the first time), then sends a ``move``
input ten times a second following its scenario and a ping every second,
while reading every view update. The summary counts what a player would
notice: disconnects, view updates per second, gaps in the tick numbers,
updates that lacked the bot's own entity, and round-trip times.

A connection that breaks without an ``Error`` (its gateway process died)
is made again by :mod:`meshd.client` with the ``Welcome``'s resume token;
the summary counts those reconnects, how long they took, bots that came back
to another entity, and gaps in the tick numbers across a reconnect
(``reconnect_gaps``, apart from ``tick_gaps``: those are ticks missed while
connected). Only a bot whose connection could not be made again counts in
``disconnects``.

Scenarios (positions are shares of the world size):

- ``wander``: walk straight on, a new random heading every ten seconds or so;
- ``rush``: everyone heads for the target (default the tavern of the
  example world) for the first half of the run, then scatters;
- ``cross``: walk east and west across the middle of the world, crossing
  partition boundaries again and again;
- ``crowd``: half the bots wander, the other half stay within 25 m of the
  target (the load shape of the common one-room benchmark).
"""

from __future__ import annotations

import math
import random
import ssl
import statistics
import time
from typing import Any

import attrs
import trio

from meshd.client import RECONNECT_WITHIN, ConnectionLost, Player, ServerError, connect

SCENARIOS = ("wander", "rush", "cross", "crowd")
TURN_EVERY = 10.0
"""Seconds a wandering bot keeps its heading, on average."""
CROWD_RADIUS = 25.0
MOVE_EVERY = 0.1
PING_EVERY = 1.0


@attrs.define
class BotStats:
    connected: bool = False
    disconnected: str = ""
    entity: int = 0
    """The entity of the first ``Welcome``."""
    views: int = 0
    gaps: int = 0
    """Views whose tick did not follow the previous one's on the same connection."""
    reconnect_gaps: int = 0
    """Views after a reconnect whose tick did not follow the last one before it."""
    missing_self: int = 0
    bad_inputs: int = 0
    """Inputs the server refused (``bad_input``); the connection stays."""
    first_view: float = 0.0
    last_view: float = 0.0
    rtts: list[float] = attrs.field(factory=list)
    reconnects: int = 0
    reconnect_ms: list[float] = attrs.field(factory=list)
    entity_changed: bool = False
    """A reconnect's ``Welcome`` named another entity than the first one."""


def _unit(dx: float, dy: float) -> tuple[float, float]:
    """``(dx, dy)`` at most unit length: plugins may declare a move's arguments within
    [-1, 1]."""
    length = math.hypot(dx, dy)
    return (dx / length, dy / length) if length > 1.0 else (dx, dy)


def _heading(
    scenario: str,
    player: Player,
    elapsed: float,
    duration: float,
    target: tuple[float, float],
    rng: random.Random,
) -> tuple[float, float]:
    """Where a bot heads in its scenario (any length; (0, 0) stops)."""
    me = player.world.get(player.entity)
    size = player.welcome.world_size
    if me is None:
        return 0.0, 0.0
    if scenario == "crowd":
        if player.entity % 2:
            scenario = "wander"
        else:
            tx, ty = target[0] * size - me.x, target[1] * size - me.y
            if math.hypot(tx, ty) > CROWD_RADIUS * 0.8:
                return tx, ty
            scenario = "wander"
    if scenario == "wander":
        vx, vy = me.state.get("vx", 0.0), me.state.get("vy", 0.0)
        if (vx or vy) and rng.random() >= MOVE_EVERY / TURN_EVERY:
            return vx, vy
        angle = rng.uniform(0, math.tau)
        return math.cos(angle), math.sin(angle)
    if scenario == "rush":
        tx, ty = target[0] * size, target[1] * size
        towards = (tx - me.x, ty - me.y)
        if elapsed < duration / 2:
            return towards if math.hypot(*towards) > 3.0 else (0.0, 0.0)
        return -towards[0] + rng.uniform(-1, 1), -towards[1] + rng.uniform(-1, 1)
    # cross: east until 70% of the world, then west until 30%, and again
    going_east = me.state.get("vx", 1.0) >= 0
    if going_east and me.x > 0.7 * size:
        going_east = False
    elif not going_east and me.x < 0.3 * size:
        going_east = True
    return (1.0 if going_east else -1.0), 0.0


async def run_bot(
    bot: int,
    host: str,
    port: int,
    scenario: str,
    duration: float,
    target: tuple[float, float],
    stats: BotStats,
    started: trio.Event,
    logins: trio.CapacityLimiter,
    reconnect_within: float = RECONNECT_WITHIN,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """One bot: log in (over TLS with ``ssl_context``), then move, ping and read views until
    ``duration`` ends.

    Never raises for the connection's sake: why it ended early goes to
    ``stats.disconnected``.
    """
    rng = random.Random(bot)
    try:
        async with logins:
            player = await connect(
                host,
                port,
                f"bot-{bot}",
                f"bot-{bot}-secret",
                ssl_context=ssl_context,
                reconnect_within=reconnect_within,
            )
    except (OSError, ServerError, ConnectionLost) as exc:
        stats.disconnected = f"login: {exc}"
        return
    stats.connected = True
    stats.entity = player.entity
    await started.wait()
    begin = time.monotonic()
    async with player:
        with trio.move_on_after(duration):
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_read, player, stats)
                    while True:
                        dx, dy = _unit(
                            *_heading(
                                scenario, player, time.monotonic() - begin, duration, target, rng
                            )
                        )
                        await player.send("move", dx=dx, dy=dy)
                        if rng.random() < MOVE_EVERY / PING_EVERY:
                            await player.ping()
                        await trio.sleep(MOVE_EVERY)
            except* (ServerError, ConnectionLost, trio.BrokenResourceError) as group:
                # The reader and the sender may both see the same end: one reason is enough.
                first: BaseException = group
                while isinstance(first, BaseExceptionGroup):
                    first = first.exceptions[0]
                stats.disconnected = str(first)
    stats.rtts = player.rtts
    stats.bad_inputs = len(player.bad_inputs)
    stats.reconnects = player.reconnects
    stats.reconnect_ms = player.reconnect_ms
    stats.entity_changed = stats.entity_changed or player.entity != stats.entity


async def _read(player: Player, stats: BotStats) -> None:
    last_tick = None
    reconnects = player.reconnects
    async for view in player.views():
        now = time.monotonic()
        if stats.views == 0:
            stats.first_view = now
        stats.views += 1
        stats.last_view = now
        if last_tick is not None and view.tick != last_tick + 1:
            if player.reconnects != reconnects:
                stats.reconnect_gaps += 1
            else:
                stats.gaps += 1
        if player.reconnects != reconnects:
            reconnects = player.reconnects
            stats.entity_changed = stats.entity_changed or player.entity != stats.entity
        last_tick = view.tick
        if player.entity not in player.world:
            stats.missing_self += 1


async def run_bots(
    host: str,
    port: int,
    count: int,
    duration: float,
    scenario: str = "wander",
    target: tuple[float, float] = (0.5, 0.5),
    connect_concurrency: int = 50,
    per_bot: bool = False,
    reconnect_within: float = RECONNECT_WITHIN,
    ssl_context: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """Connect ``count`` bots, run them for ``duration`` seconds together, summarise.

    ``per_bot`` adds ``per_bot``, one entry a bot; ``reconnect_within`` is
    the client's (0: a broken connection is a disconnect); ``ssl_context``:
    over TLS with it (:func:`meshd.client.tls_context`).
    """
    stats = [BotStats() for _ in range(count)]
    started = trio.Event()
    logins = trio.CapacityLimiter(connect_concurrency)
    connect_started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for bot in range(count):
            nursery.start_soon(
                run_bot,
                bot,
                host,
                port,
                scenario,
                duration,
                target,
                stats[bot],
                started,
                logins,
                reconnect_within,
                ssl_context,
            )
        while sum(1 for s in stats if s.connected or s.disconnected) < count:
            await trio.sleep(0.05)
        connected = sum(1 for s in stats if s.connected)
        connect_seconds = time.monotonic() - connect_started
        started.set()
    rates = [
        s.views / (s.last_view - s.first_view)
        for s in stats
        if s.connected and s.views > 1 and s.last_view > s.first_view
    ]
    rtts = sorted(r for s in stats for r in s.rtts)
    reconnect_ms = sorted(ms for s in stats for ms in s.reconnect_ms)
    reasons: dict[str, int] = {}
    for s in stats:
        if s.disconnected:
            reasons[s.disconnected] = reasons.get(s.disconnected, 0) + 1
    summary: dict[str, Any] = {
        "scenario": scenario,
        "count": count,
        "connected": connected,
        "disconnects": sum(1 for s in stats if s.disconnected),
        "disconnect_reasons": reasons,
        "connect_s": round(connect_seconds, 2),
        "duration_s": duration,
        "updates_per_s": round(statistics.mean(rates), 2) if rates else 0.0,
        "updates_per_s_min": round(min(rates), 2) if rates else 0.0,
        "tick_gaps": sum(s.gaps for s in stats),
        "missing_self": sum(s.missing_self for s in stats),
        "rtt_ms": {
            "p50": round(_quantile(rtts, 0.5), 2),
            "p99": round(_quantile(rtts, 0.99), 2),
        },
        "reconnects": sum(s.reconnects for s in stats),
        "reconnected_bots": sum(1 for s in stats if s.reconnects),
        "reconnect_ms": {
            "p50": round(_quantile(reconnect_ms, 0.5), 2),
            "max": round(reconnect_ms[-1], 2) if reconnect_ms else 0.0,
        },
        "entity_changed": sum(1 for s in stats if s.entity_changed),
        "reconnect_gaps": sum(s.reconnect_gaps for s in stats),
        "bad_inputs": sum(s.bad_inputs for s in stats),
    }
    if per_bot:
        summary["per_bot"] = [
            {
                "bot": bot,
                "entity": s.entity,
                "views": s.views,
                "gaps": s.gaps,
                "reconnects": s.reconnects,
                "reconnect_ms": [round(ms, 2) for ms in s.reconnect_ms],
                "entity_changed": s.entity_changed,
                "disconnected": s.disconnected,
            }
            for bot, s in enumerate(stats)
        ]
    return summary


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return values[min(int(q * len(values)), len(values) - 1)]
