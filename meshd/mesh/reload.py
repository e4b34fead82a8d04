"""Live code update (``meshd reload``): every worker replaced by one running the plugins'
current code at a tick boundary, with no player disconnected and no tick lost (a trio shell).

Workers are disposable: the core holds the world, so new code only needs
new processes and states in the new classes. The work is split so that the
tick loop never waits for an import or a process start:

- :func:`request_reload` runs beside the tick loop (an admin request). It
  starts a new generation of worker processes (one per slot, plus the warm
  spares), loads the plugins afresh in a thread, checks that every process
  loaded the same code, then queues the swap and waits for its outcome.
- :func:`apply_reloads` runs in the tick loop right after a checkpoint
  commit, when the core holds all of ``S(T)``. The world adopts the new code
  (:meth:`~meshd.mesh.replication.Replication.adopt`: states converted as a
  restart would, or refused with the reason, changing nothing); each slot's
  new process is restored from that checkpoint; the old processes are
  stopped; the gateways learn the new actions. Tick ``T + 1`` runs the new
  code.

While a reload is under way the planner leaves the mesh's shape alone, so
the new generation matches the slots it replaces.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import TYPE_CHECKING, Any

import attrs
import trio

from meshd.common.config import ConfigError
from meshd.mesh.plugins import PluginSet, load_plugin_set
from meshd.mesh.supervisor import WorkerFailed, WorkerLink
from meshd.plugin import PluginError

if TYPE_CHECKING:
    from meshd.mesh.core import Core

RELOAD_TIMEOUT = 60.0
"""Loading the code, starting the processes, then waiting for a checkpoint."""


@attrs.define(eq=False)
class Reload:
    """New plugin code and the worker processes already running it, waiting for a
    checkpoint boundary; ``done`` fires with ``result`` or ``error`` set."""

    plugins: PluginSet
    started: list[WorkerLink]
    """One process per live slot, then the warm spares."""
    peer: dict[str, int]
    """Who asked: the admin connection's ``pid`` and ``uid``."""
    done: trio.Event = attrs.field(factory=trio.Event)
    result: dict[str, Any] = attrs.field(factory=dict)
    error: str = ""


async def request_reload(core: Core, peer: dict[str, int]) -> dict[str, Any]:
    """Load the plugins' current code and have the tick loop switch to it; what it did.

    Raises :class:`ValueError` with the reason when the code does not load,
    its workers do not start, or the world cannot take it (the old code
    keeps running then).
    """
    if core.reloading:
        raise ValueError("a reload is already under way")
    core.reloading = True
    supervisor = core.supervisor
    started: list[WorkerLink] = []
    try:
        # The workers first: a plugin that never finishes importing stops them at their
        # start-up deadline, where a thread in the core could not be stopped.
        try:
            started = await supervisor.prepare(len(supervisor.links) + supervisor.spare_count)
        except WorkerFailed as exc:
            raise ValueError(f"the new code does not load in a worker: {exc.reason}") from None
        load = functools.partial(load_plugin_set, core.config, fresh=True)
        try:
            plugins = await trio.to_thread.run_sync(load)
        except (PluginError, ConfigError) as exc:
            raise ValueError(f"the new code does not load: {exc}") from None
        if any(link.code != plugins.code_digest() for link in started):
            raise ValueError("the plugin files changed while reloading; run meshd reload again")
        request = Reload(plugins, started, peer)
        core.reloads.append(request)
        started = []  # the tick loop owns them now
        with trio.move_on_after(RELOAD_TIMEOUT):
            await request.done.wait()
        if not request.done.is_set():
            core.reloads.remove(request)
            started = request.started
            raise ValueError(f"no tick boundary came within {RELOAD_TIMEOUT:g} s; nothing changed")
        if request.error:
            raise ValueError(request.error)
        return request.result
    finally:
        with trio.CancelScope(shield=True):
            await supervisor.discard(started)
        core.reloading = False


async def apply_reloads(core: Core, *, stopping: bool) -> None:
    """Switch to the code of every queued :class:`Reload`, at this checkpoint boundary."""
    requests, core.reloads = core.reloads, []
    for request in requests:
        if stopping:
            request.error = "the daemon is stopping; the old code ran to the end"
        else:
            try:
                await _switch(core, request)
            except PluginError as refused:
                request.error = f"refused, the old code runs on: {refused}"
                core.log.warning("reload refused", tick=core.replication.tick, reason=str(refused))
        if request.error:
            await core.supervisor.discard(request.started)
        request.done.set()


async def _switch(core: Core, request: Reload) -> None:
    started = time.perf_counter()
    repl, supervisor = core.replication, core.supervisor
    slots = sorted(supervisor.links)
    if len(request.started) < len(slots):
        raise PluginError("the mesh grew while the new workers started; run meshd reload again")
    adoption = repl.adopt(request.plugins)  # raises, changing nothing, if it cannot
    fresh, spares = request.started[: len(slots)], request.started[len(slots) :]
    await supervisor.hand_over(fresh, spares)
    for worker in slots:
        # A send that fails is an ordinary failover at the next step (from this checkpoint).
        with contextlib.suppress(WorkerFailed):
            await supervisor.links[worker].send(repl.recovery(worker)[0])
    core.plugins = request.plugins
    if core.gateway is not None:
        core.gateway.adopt(request.plugins)
    request.result = {
        "tick": repl.tick,
        "workers": len(slots),
        "code": repl.code[:16],
        "converted": len(adoption.converted),
        "migrated": len(adoption.migrated),
        "released": adoption.released,
        "actions": request.plugins.input_actions(),
        "ms": round((time.perf_counter() - started) * 1000, 1),
    }
    core.log.warning(
        "plugins reloaded: the new code runs from the next tick",
        **request.result,
        **request.peer,
    )
