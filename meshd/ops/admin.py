"""The admin socket (``meshd.sock``) and the views ``meshd inspect`` shows (trio shell).

Requests and answers are single frames: an :class:`AdminRequest` in, an
:class:`AdminAnswer` out. The views read the core's state between ticks
(trio runs one task at a time), so every answer is consistent.

Who may ask is checked twice. The socket file is 0600, or 0660 and
``admin.group``'s when the operator names a group (the data folder is then
0710 and that group's, so its members reach the socket and nothing else).
Then every connection's peer credentials (``SO_PEERCRED``): only the
daemon's own user, or a member of ``admin.group`` (the peer's group is it,
or the peer's user is in its member list, read at each connection), gets
any answer (:class:`Admission`); anyone else's every request is refused
naming the rule.

The ``WRITES`` change the world or the accounts (``release``, ``reload``,
and creating, renaming, disabling, enabling or deleting an account); they
are taken only from the daemon's own user, never from the group, and logged
with the caller's pid, uid and gid. ``accounts`` lists the accounts.

It is long because it holds every view the socket answers, and who may ask
for each, in one place.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from meshd.common.links import receive_frame, receive_frame_blocking
from meshd.common.log import get_logger
from meshd.common.wire import FrameDecoder, WireError, decode_message, encode_message, frame
from meshd.mesh.core import Release
from meshd.mesh.layout import parse_leaf, sorted_leaves
from meshd.mesh.reload import request_reload
from meshd.mesh.usage import percentile
from meshd.players.fleet import Gateways

if TYPE_CHECKING:
    from meshd.mesh.core import Core

VIEWS = (
    "status",
    "workers",
    "gateways",
    "partitions",
    "entity",
    "world",
    "stats",
    "map",
    "release",
    "reload",
    "accounts",
    "create_account",
    "rename_account",
    "disable_account",
    "enable_account",
    "delete_account",
)
ACCOUNT_WRITES = frozenset(
    {"create_account", "rename_account", "disable_account", "enable_account", "delete_account"}
)
WRITES = frozenset({"release", "reload", *ACCOUNT_WRITES})
HASH_TIMEOUT = 30.0
RELEASE_TIMEOUT = 60.0
"""A release waits for a checkpoint and maybe for a worker process to start."""
_PEERCRED = struct.Struct("3i")


@attrs.define
class AdminRequest:
    view: str
    entity: int | None = None
    hash: bool = False
    entities: list[int] = attrs.field(factory=list)
    """release: these quarantined entities..."""
    all_entities: bool = False
    """...or every quarantined entity..."""
    partitions: bool = False
    """...and/or every quarantined partition."""
    name: str = ""
    """The account an account command is about..."""
    new_name: str = ""
    """...its new name (``rename_account``)..."""
    secret: str = attrs.field(default="", repr=False)
    """...and its secret (``create_account``; never logged)."""


@attrs.define
class AdminAnswer:
    ok: bool
    result: Any = None
    error: str = ""


class AdminError(Exception):
    """The daemon could not be reached or refused the request."""


class NoDaemon(AdminError):
    """No daemon listens on the admin socket (none runs on this data folder)."""


def _round(value: float) -> float:
    return round(value, 3)


def status_view(core: Core) -> dict[str, Any]:
    repl, times, intervals = core.replication, list(core.tick_ms), list(core.tick_intervals_ms)
    return {
        "tick": repl.tick,
        "entities": len(repl.owner),
        "workers": len(core.supervisor.links),
        "spares": [link.pid for link in core.supervisor.spares],
        "partitions": len(repl.layout.owners),
        "failovers": core.failovers,
        "stale_frames": core.supervisor.stale_frames
        + sum(link.stale_frames for link in core.supervisor.links.values()),
        "rate_hz": _round(core.rate_hz()),
        "target_rate_hz": core.config.tick.rate,
        "tick_ms": {"p50": _round(percentile(times, 50)), "p99": _round(percentile(times, 99))},
        "tick_interval_ms": {
            "p50": _round(percentile(intervals, 50)),
            "p99": _round(percentile(intervals, 99)),
        },
        "plugin_errors": repl.errors_total,
        "quarantined": sorted(repl.quarantined),
        "quarantined_partitions": sorted_leaves(
            leaf for leaf, owner in repl.layout.owners.items() if owner in repl.down
        ),
        "persisted_tick": core.persisted_tick,
        "persist_failures": core.persist_failures,
        "seed": repl.world.seed,
        "gateway": core.gateway.status() if core.gateway is not None else None,
        "uptime_s": _round(time.monotonic() - core.started),
    }


def workers_view(core: Core) -> list[dict[str, Any]]:
    repl = core.replication
    links = core.supervisor.links
    rows = []
    for worker in sorted({*links, *repl.down}):
        link = links.get(worker)
        leaves = repl.layout.leaves_of(worker)
        rows.append(
            {
                "id": worker,
                "state": "quarantined" if worker in repl.down else "running",
                "pid": link.pid if link else None,
                "epoch": link.epoch if link else None,
                "partitions": sorted_leaves(leaves),
                "entities": sum(repl.counts.get(leaf, 0) for leaf in leaves),
                "cost_ms": _round(sum(repl.cost_ms.get(leaf, 0.0) for leaf in leaves)),
                "cpu_ms": _round(repl.worker_cpu_ms.get(worker, 0.0)),
            }
        )
    return rows


def partitions_view(core: Core) -> list[dict[str, Any]]:
    """Every leaf; ``cost_ms`` is the planner's moving average when the mesh is dynamic."""
    repl = core.replication
    layout = repl.layout
    costs = core.planner.cost if core.planner is not None else repl.cost_ms
    return [
        {
            "id": leaf,
            "depth": parse_leaf(leaf)[0],
            "bounds": layout.rects[leaf].as_list(),
            "worker": layout.owners[leaf],
            "quarantined": layout.owners[leaf] in repl.down,
            "entities": repl.counts.get(leaf, 0),
            "cost_ms": _round(costs.get(leaf, 0.0)),
        }
        for leaf in sorted_leaves(layout.owners)
    ]


def stats_view(core: Core) -> dict[str, Any]:
    """The cost report: worker-seconds used against static provisioning for the peak."""
    return core.usage.report(time.process_time())


def map_view(core: Core) -> dict[str, Any]:
    """What ``inspect map`` draws: the world square, the leaves, and every entity's position."""
    repl = core.replication
    return {
        "size": repl.world.size,
        "tick": repl.tick,
        "partitions": [
            {"bounds": repl.layout.rects[leaf].as_list(), "worker": worker}
            for leaf, worker in sorted(repl.layout.owners.items())
        ],
        "entities": [[record[2], record[3], record[1]] for record in repl.records.values()],
        "colours": {name: kind.colour for name, kind in core.plugins.kinds.items() if kind.colour},
    }


def entity_view(core: Core, entity_id: int) -> dict[str, Any]:
    repl = core.replication
    record = repl.records.get(entity_id)
    if record is None:
        raise KeyError(f"no entity {entity_id}")
    _, kind, x, y, z, state = record
    return {
        "id": entity_id,
        "kind": kind,
        "x": x,
        "y": y,
        "z": z,
        "owner": repl.owner[entity_id],
        "state": core.plugins.codecs[kind].to_dict(state),
    }


async def world_view(core: Core, with_hash: bool) -> dict[str, Any]:
    repl = core.replication
    if not with_hash:
        return {
            "tick": repl.tick,
            "entities": len(repl.owner),
            "hash": None,
            "world_state": repl.world_fields(),
        }
    # Between checkpoints the core holds only part of S(T): ask for one.
    send, receive = trio.open_memory_channel[tuple[int, str]](1)
    core.hash_waiters.append(send)
    with trio.fail_after(HASH_TIMEOUT):
        tick, digest = await receive.receive()
    return {
        "tick": tick,
        "entities": len(repl.owner),
        "hash": digest,
        "world_state": repl.world_fields(),
    }


async def release(core: Core, request: AdminRequest, peer: dict[str, int]) -> dict[str, Any]:
    """Ask the tick loop to run quarantined entities or partitions again; what it released."""
    if not (request.entities or request.all_entities or request.partitions):
        raise ValueError("nothing to release: name entities, all entities or partitions")
    wanted = Release(request.entities, request.all_entities, request.partitions, peer)
    core.releases.append(wanted)
    with trio.fail_after(RELEASE_TIMEOUT):
        await wanted.done.wait()
    if "error" in wanted.result:
        raise ValueError(wanted.result["error"])
    return wanted.result


def peer_credentials(stream: trio.SocketStream) -> dict[str, int]:
    """The ``pid``, ``uid`` and ``gid`` of the process at the other end of a Unix socket."""
    raw = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return {"pid": pid, "uid": uid, "gid": gid}


@attrs.frozen
class Admission:
    """Who may use the admin socket: the daemon's own user (``uid``) and, when the operator
    names one (``admin.group``), the members of group ``gid``."""

    uid: int
    group: str = ""
    gid: int = -1

    def refusal(self, peer: dict[str, int]) -> str:
        """Why the peer gets no answer at all ("" if it may ask)."""
        if peer["uid"] == self.uid:
            return ""
        if not self.group:
            return (
                f"the admin socket answers only the daemon's own user (uid {self.uid}), and "
                f"uid {peer['uid']} is not it (admin.group may name a group whose members "
                "may look too)"
            )
        if peer["gid"] == self.gid or _user_name(peer["uid"]) in _members(self.gid):
            return ""
        return (
            f"the admin socket answers the daemon's own user (uid {self.uid}) and members of "
            f"group {self.group!r} (admin.group), and uid {peer['uid']} (gid {peer['gid']}) "
            "is neither"
        )


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _members(gid: int) -> list[str]:
    """The group's member list as the system has it now."""
    try:
        return list(grp.getgrgid(gid).gr_mem)
    except KeyError:
        return []


async def accounts(core: Core, request: AdminRequest, peer: dict[str, int]) -> Any:
    """``accounts`` and the account commands, done by the core's side of the players."""
    gateway = core.gateway
    if not isinstance(gateway, Gateways):
        raise ValueError(
            "this daemon serves no players (gateway.listen is empty): change its accounts "
            "with the daemon stopped"
        )
    view, name = request.view, request.name
    if view == "accounts":
        return gateway.accounts_view()
    if view == "create_account":
        return await gateway.create_account(name, request.secret, peer)
    if view == "rename_account":
        return await gateway.rename_account(name, request.new_name, peer)
    if view in ("disable_account", "enable_account"):
        return await gateway.disable_account(name, view == "disable_account", peer)
    assert view == "delete_account"
    return await gateway.delete_account(name, peer)


async def answer(
    core: Core, request: AdminRequest, peer: dict[str, int] | None = None
) -> AdminAnswer:
    if request.view in WRITES and (peer is None or peer["uid"] != os.geteuid()):
        what = "the accounts" if request.view in ACCOUNT_WRITES else "the world"
        return AdminAnswer(
            ok=False,
            error=f"{request.view} changes {what}: only the daemon's own user "
            f"(uid {os.geteuid()}) may ask for it",
        )
    try:
        if request.view == "status":
            result: Any = status_view(core)
        elif request.view == "workers":
            result = workers_view(core)
        elif request.view == "gateways":
            result = core.gateway.gateways_view() if core.gateway is not None else []
        elif request.view == "partitions":
            result = partitions_view(core)
        elif request.view == "entity":
            if request.entity is None:
                raise ValueError("the entity view needs an entity id")
            result = entity_view(core, request.entity)
        elif request.view == "world":
            result = await world_view(core, request.hash)
        elif request.view == "stats":
            result = stats_view(core)
        elif request.view == "map":
            result = map_view(core)
        elif request.view == "release":
            assert peer is not None
            result = await release(core, request, peer)
        elif request.view == "reload":
            assert peer is not None
            result = await request_reload(core, peer)
        elif request.view == "accounts" or request.view in ACCOUNT_WRITES:
            result = await accounts(core, request, peer or {})
        else:
            raise ValueError(f"unknown view {request.view!r}; one of {', '.join(VIEWS)}")
    except (KeyError, ValueError, trio.TooSlowError) as exc:
        return AdminAnswer(ok=False, error=str(exc.args[0] if exc.args else exc))
    return AdminAnswer(ok=True, result=result)


async def _handle(core: Core, admission: Admission, stream: trio.SocketStream) -> None:
    decoder = FrameDecoder()
    peer = peer_credentials(stream)
    refused = admission.refusal(peer)
    if refused:
        get_logger(component="admin").warning("admin request refused", why=refused, **peer)
    async with stream:
        try:
            while True:
                body = await receive_frame(stream, decoder)
                try:
                    request = decode_message(body, (AdminRequest,))
                except WireError as exc:
                    reply = AdminAnswer(ok=False, error=refused or str(exc))
                else:
                    reply = (
                        AdminAnswer(ok=False, error=refused)
                        if refused
                        else await answer(core, request, peer)
                    )
                await stream.send_all(frame(encode_message(reply)))
        except (EOFError, WireError, trio.BrokenResourceError, trio.ClosedResourceError):
            return


def admin_group(name: str) -> grp.struct_group | None:
    """``admin.group``'s entry (None when none is named); ``ValueError`` for an unknown one."""
    if not name:
        return None
    try:
        return grp.getgrnam(name)
    except KeyError:
        raise ValueError(f"admin.group: there is no group {name!r} on this system") from None


async def serve_admin(
    core: Core,
    path: Path,
    group: grp.struct_group | None = None,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on the admin socket until cancelled; ``group`` (``admin.group``) may use it too."""
    path.unlink(missing_ok=True)  # a stale socket from a killed core; we hold the lock
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)  # created 0600: not readable by others even for an instant
    try:
        sock.bind(str(path))
    finally:
        os.umask(umask)
    admission = Admission(os.geteuid())
    if group is not None:
        admission = Admission(os.geteuid(), group.gr_name, group.gr_gid)
        try:
            os.chown(path, -1, group.gr_gid)
            path.chmod(0o660)
        except OSError as exc:
            get_logger(component="admin").warning(
                "the admin socket cannot be given to admin.group: only the daemon's user "
                "reaches it",
                group=group.gr_name,
                error=exc.strerror,
            )
    sock.listen(16)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    task_status.started()
    await trio.serve_listeners(lambda stream: _handle(core, admission, stream), [listener])


def request(path: Path, request: AdminRequest, timeout: float = 60.0) -> Any:
    """Blocking client used by ``meshd inspect``: one request, one answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(frame(encode_message(request)))
            body = receive_frame_blocking(sock, FrameDecoder(1 << 30), 1 << 20)
    except EOFError:
        raise AdminError("the daemon closed the admin connection") from None
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise NoDaemon(f"no meshd daemon is running here ({path}: {exc.strerror})") from None
    except TimeoutError:
        raise AdminError(f"the daemon at {path} did not answer within {timeout} s") from None
    reply = decode_message(body, (AdminAnswer,))
    if not reply.ok:
        raise AdminError(reply.error)
    return reply.result
