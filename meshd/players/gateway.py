"""The client gateway: players connect over TCP (a trio shell around the protocol).

Each connection is one task: it reads the ``Login`` within
``gateway.login_timeout`` and checks or claims the name (secrets are scrypt
hashes with their parameters stored per account, compared in constant time,
computed in a thread; a new name is stored before its player is welcomed).
From then on the tick loop does the per-tick work of every player without waiting:
:meth:`Gateway.before_tick` reads what each player sent (inputs under a
token bucket, pings) with one non-blocking ``recv`` and turns inputs, new
players' entities and join/leave into events for the next step;
:meth:`Gateway.after_tick` sets the cells to watch; :meth:`Gateway.send_views`
(while the workers simulate the next tick) writes each player's view update
straight into its socket. Only what the kernel does not take at once goes to
the connection's writer task, through a bounded backlog.
Everything a client can get wrong ends with one ``Error`` frame and the close
of that connection only; nothing a client does can make the tick loop wait.

It is long because the whole player path (connections, logins, inputs,
views) still runs in the core; the next step moves it into gateway
processes, and splits this module with it.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import attrs
import cbor2
import trio

from meshd.common.config import ConfigError, GatewayConfig
from meshd.common.links import receive_frame
from meshd.common.log import OncePer, error_site, get_logger
from meshd.common.wire import FrameDecoder, WireError, frame
from meshd.mesh.messages import WorldParams
from meshd.mesh.plugins import INPUT_PREFIX, PluginSet
from meshd.mesh.replication import Replication
from meshd.players.interest import Viewer, nearest, update_view, watch_cells
from meshd.players.protocol import (
    MAX_CLIENT_FRAME,
    PROTOCOL_VERSION,
    Error,
    Input,
    InputRefused,
    Login,
    Ping,
    Pong,
    Welcome,
    decode_client,
    encode_frame,
    encode_view,
)
from meshd.plugin import GATEWAY, JOIN, LEAVE, WorldBuilder
from meshd.store.schema import NO_ENTITY

SALT_BYTES = 16
SEND_BUFFER = 256 << 10
RECEIVE_PER_TICK = 64 << 10
"""Bytes read from one player per tick; more than a legitimate client sends in a second."""
CLOSE_GRACE = 1.0
"""Seconds a closing connection gets to flush its last frames and the error."""


def scrypt_parameters(cost: int) -> str:
    """The hashing parameters stored with an account: ``"scrypt:N:r:p"`` with N = 2**cost."""
    return f"scrypt:{1 << cost}:8:1"


def hash_secret(secret: str, salt: bytes, kdf: str) -> bytes:
    """The secret hashed with an account's parameters: slow on purpose; call it in a thread."""
    algorithm, *numbers = kdf.split(":")
    if algorithm != "scrypt" or len(numbers) != 3:
        raise ValueError(f"unknown hashing parameters {kdf!r}")
    n, r, p = map(int, numbers)
    return hashlib.scrypt(
        secret.encode(), salt=salt, n=n, r=r, p=p, maxmem=132 * r * (n + p), dklen=32
    )


@attrs.define
class Account:
    salt: bytes
    digest: bytes
    entity: int
    kdf: str
    """How ``digest`` was made (:func:`scrypt_parameters`); "" for the configured cost."""


class Refused(Exception):
    """A login or frame the gateway refuses: the client gets ``Error(code, message)``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@attrs.define(eq=False)
class Client:
    """One logged-in connection and its send path.

    Frames go straight into the socket from the tick loop while the kernel
    takes them (``sock`` is a duplicate of the connection's descriptor, so a
    send needs no task switch); what the kernel does not take waits in
    ``backlog`` for the writer task, at most ``send_queue`` frames. A client
    whose backlog is full reads too slowly and is dropped.
    """

    name: str
    entity: int
    sock: socket.socket
    decoder: FrameDecoder
    """Bytes received and not yet a whole frame (the login's leftovers first)."""
    send_queue: int
    viewer: Viewer
    tokens: float
    refilled: float
    acked: int = 0
    """The ``seq`` of the last input whose tick the views have reached."""
    acks: deque[tuple[int, int]] = attrs.field(factory=deque)
    """(tick, seq): the last input of each tick it was sent into the world for."""
    error: Error | None = None
    closed: bool = False
    connection: trio.CancelScope | None = None
    backlog: deque[bytes | memoryview] = attrs.field(factory=deque)
    wake: trio.Event = attrs.field(factory=trio.Event)
    sent: int = 0
    """Bytes handed to the kernel."""

    def offer(self, data: bytes) -> bool:
        """Send or queue a frame; False (and the client is dropped) when it reads too slowly."""
        if self.closed:
            return False
        if not self.backlog:  # nothing ahead of it: the kernel may take it now
            try:
                taken = self.sock.send(data)
            except BlockingIOError:
                taken = 0
            except OSError:  # reset by the peer; the reader sees the hang-up too
                self.close(grace=0.0)
                return False
            self.sent += taken
            if taken == len(data):
                return True
            self.backlog.append(memoryview(data)[taken:])
        elif len(self.backlog) >= self.send_queue:
            self.close(Error("slow", "you read too slowly: dropped"), grace=0.0)
            return False
        else:
            self.backlog.append(data)
        self.wake.set()
        return True

    def close(self, error: Error | None = None, grace: float = CLOSE_GRACE) -> None:
        """Stop sending: the writer flushes the backlog, then ``error``, then hangs up,
        all within ``grace`` seconds (a client that does not read gets no more)."""
        if not self.closed:
            self.closed, self.error = True, error
            self.wake.set()
            if self.connection is not None:
                self.connection.deadline = min(
                    self.connection.deadline, trio.current_time() + grace
                )


@attrs.define(eq=False)
class Join:
    """A new player waiting for the tick boundary that creates its entity."""

    name: str
    done: trio.Event = attrs.field(factory=trio.Event)
    entity: int = 0
    error: str = ""


class Gateway:
    """Player connections, accounts and views."""

    def __init__(
        self,
        config: GatewayConfig,
        plugins: PluginSet,
        world: WorldParams,
        replication: Replication,
        accounts: dict[str, Account],
        rate: float,
        store_account: Callable[[str, bytes, bytes, str], Awaitable[None]],
    ) -> None:
        self.config = config
        self.rate = rate
        self.plugins = plugins
        self.world = world
        self.replication = replication
        self.accounts = accounts
        self.clients: dict[int, Client] = {}
        self.connections = 0
        self.new_claims: list[tuple[str, int]] = []
        """(name, entity) of players' new entities, for the next persisted tick."""
        self._store_account = store_account
        self.joins: list[Join] = []
        self.inputs: list[tuple[int, str, Any, int]] = []
        """(entity, action, args, client seq) in arrival order."""
        self.refused: dict[str, int] = {}
        """Connections refused before or at login, by error code."""
        self.kicked: dict[str, int] = {}
        """Players disconnected by the server, by error code."""
        self.bytes_sent = 0
        """Bytes sent on connections that have ended (the live ones count their own)."""
        self._views_due: int | None = None
        """The tick whose view update :meth:`send_views` sends next."""
        self._shown: dict[int, list[Any]] = {}
        """The watched records as of the last view update."""
        self.address = ""
        self._claiming: set[str] = set()
        self._hashing = trio.CapacityLimiter(1)
        self._in_flight: dict[int, tuple[int, int, str]] = {}
        """Input event seq -> (entity, client seq, action) for the tick being simulated."""
        self._input_errors = OncePer()
        self._log = get_logger(component="gateway")

    # -- connections ------------------------------------------------------

    async def serve(
        self, listeners: list[trio.SocketListener], *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept players on ``listeners`` (from :func:`listen`) until cancelled."""
        sockname = listeners[0].socket.getsockname()
        self.address = f"{sockname[0]}:{sockname[1]}"
        self._log.info("gateway listening", address=self.address)
        task_status.started(self.address)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        # Bounded kernel buffers too: a reader that stalls is noticed within a second or two.
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self.connections += 1
        try:
            async with stream:
                await self._connection(stream)
        except Exception:
            # Whatever one connection does, it ends that connection only.
            self._log.exception("player connection failed")
        finally:
            self.connections -= 1

    async def _connection(self, stream: trio.SocketStream) -> None:
        decoder = FrameDecoder(MAX_CLIENT_FRAME)
        try:
            if self.connections > self.config.max_clients:
                raise Refused("full", f"the server takes {self.config.max_clients} connections")
            with trio.fail_after(self.config.login_timeout):
                login = await self._next_message(stream, decoder)
            if not isinstance(login, Login):
                raise Refused("login_first", "the first message must be a login")
            if login.version != PROTOCOL_VERSION:
                raise Refused("version", f"this server speaks protocol {PROTOCOL_VERSION}")
            entity = await self._log_in(login)
        except trio.TooSlowError:
            await self._refuse(stream, "login_timeout", "no login in time")
            return
        except Refused as refused:
            await self._refuse(stream, refused.code, refused.message)
            return
        except WireError as exc:
            await self._refuse(stream, "bad_frame", str(exc))
            return
        except EOFError:
            return
        await self._play(stream, decoder, login.name, entity)

    async def _refuse(self, stream: trio.SocketStream, code: str, message: str) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1
        with trio.move_on_after(1.0):
            await stream.send_all(encode_frame(Error(code, message)))

    async def _next_message(self, stream: trio.SocketStream, decoder: FrameDecoder) -> Any:
        """The next client message; EOFError when the client hangs up (or resets)."""
        return decode_client(await receive_frame(stream, decoder))

    async def _log_in(self, login: Login) -> int:
        """Check or claim ``login.name``; the player's entity id.

        A new name is stored (durably) before its entity is made, so a
        player who was welcomed keeps the name whatever happens next. A good
        login with out-of-date hashing parameters stores the secret's hash
        again with the configured ones.
        """
        if self.plugins.new_player is None:
            raise Refused("no_players", "no loaded plugin defines player entities")
        name, kdf = login.name, scrypt_parameters(self.config.hash_cost)
        if name in self._claiming:
            raise Refused("busy", f"the name {name!r} is being claimed right now")
        self._claiming.add(name)
        try:
            account = self.accounts.get(name)
            if account is not None:
                digest = await self._hash(login.secret, account.salt, account.kdf or kdf)
                if not hmac.compare_digest(digest, account.digest):
                    raise Refused("auth", f"wrong secret for {name!r}")
                if account.kdf != kdf:
                    await self._rehash(name, account, login.secret, kdf)
                if account.entity in self.replication.records:
                    return account.entity
                # its entity is gone (or never reached the database): a new one
            else:
                salt = os.urandom(SALT_BYTES)
                digest = await self._hash(login.secret, salt, kdf)
                try:
                    await self._store_account(name, salt, digest, kdf)
                except Exception as exc:
                    self._log.error("cannot store a new player name", name=name, error=str(exc))
                    raise Refused(
                        "server_error", "the server cannot store new names right now"
                    ) from None
                account = self.accounts[name] = Account(salt, digest, NO_ENTITY, kdf)
            join = Join(name)
            self.joins.append(join)
            await join.done.wait()
            if join.error:
                raise Refused("server_error", join.error)
            account.entity = join.entity
            self.new_claims.append((name, join.entity))
            self._log.info("new player entity", name=name, entity=join.entity)
            return join.entity
        finally:
            self._claiming.discard(name)

    async def _hash(self, secret: str, salt: bytes, kdf: str) -> bytes:
        return await trio.to_thread.run_sync(hash_secret, secret, salt, kdf, limiter=self._hashing)

    async def _rehash(self, name: str, account: Account, secret: str, kdf: str) -> None:
        """Store the secret hashed with the configured parameters (after a good login)."""
        salt = os.urandom(SALT_BYTES)
        digest = await self._hash(secret, salt, kdf)
        try:
            await self._store_account(name, salt, digest, kdf)
        except Exception as exc:  # the old hash still works: try again next login
            self._log.warning("cannot store a rehashed secret", name=name, error=str(exc))
            return
        account.salt, account.digest, account.kdf = salt, digest, kdf

    async def _play(
        self, stream: trio.SocketStream, decoder: FrameDecoder, name: str, entity: int
    ) -> None:
        client = Client(
            name,
            entity,
            socket.socket(fileno=os.dup(stream.socket.fileno())),
            decoder,
            self.config.send_queue,
            Viewer(entity),
            tokens=float(self.config.input_burst),
            refilled=time.monotonic(),
        )
        previous = self.clients.get(entity)
        if previous is not None:
            # A hang-up since the last tick is news to the tick loop's reads: read now,
            # so a player reconnecting after a reset is not told it was replaced.
            self._read_inputs(previous, time.monotonic())
            previous.close(Error("replaced", "you logged in from somewhere else"))
        self.clients[entity] = client
        self._player_input(entity, JOIN)
        repl = self.replication
        client.offer(
            encode_frame(
                Welcome(
                    version=PROTOCOL_VERSION,
                    player=entity,
                    tick=repl.tick,
                    rate=self.rate,
                    world_size=self.world.size,
                    view_radius=self.config.view_radius,
                    view_every=self.config.view_every,
                )
            )
        )
        try:
            async with trio.open_nursery() as nursery:
                client.connection = nursery.cancel_scope
                # The tick loop reads this connection from now on (before_tick);
                # the writer ends it once the client is closed.
                nursery.start_soon(self._writer, stream, client, nursery.cancel_scope)
        finally:
            if self.clients.get(entity) is client:
                del self.clients[entity]
                self._player_input(entity, LEAVE)
            client.close()
            client.sock.close()
            self.bytes_sent += client.sent
            if client.error is not None:
                self.kicked[client.error.code] = self.kicked.get(client.error.code, 0) + 1

    def _read_inputs(self, client: Client, now: float) -> None:
        """Take what ``client`` sent since the last tick, without waiting.

        Polling every player once a tick costs one ``recv`` each; a task woken
        per message (trio's epoll re-arm, the wakeup, the receive) cost several
        times that in total at ten inputs a second per player.
        """
        try:
            data = client.sock.recv(RECEIVE_PER_TICK)
        except BlockingIOError:
            if not client.decoder.pending:  # (frames that came with the login are pending)
                return
        except OSError:  # reset by the peer: the same as hanging up
            client.close(grace=0.0)
            return
        else:
            if not data:
                client.close()
                return
            client.decoder.feed(data)
        config = self.config
        client.tokens = min(
            config.input_burst, client.tokens + (now - client.refilled) * config.input_rate
        )
        client.refilled = now
        try:
            for body in client.decoder.frames():
                try:
                    message = decode_client(body)
                except InputRefused as refused:
                    message = refused
                if client.tokens < 1:
                    client.close(Error("flood", f"more than {config.input_rate:g} messages/s"))
                    return
                client.tokens -= 1
                if isinstance(message, Input):
                    if not self.plugins.accepts(message.action) or message.action in (JOIN, LEAVE):
                        client.offer(
                            encode_frame(
                                Error(
                                    "bad_input",
                                    f"input {message.seq}: no action {message.action!r}",
                                )
                            )
                        )
                        continue
                    self.inputs.append((client.entity, message.action, message.args, message.seq))
                elif isinstance(message, Ping):
                    client.offer(encode_frame(Pong(message.id, self.replication.tick)))
                elif isinstance(message, InputRefused):
                    client.offer(encode_frame(Error("bad_input", str(message))))
                else:
                    client.close(Error("already_logged_in", "log in once per connection"))
                    return
        except WireError as exc:
            client.close(Error("bad_frame", str(exc)))

    async def _writer(
        self, stream: trio.SocketStream, client: Client, done: trio.CancelScope
    ) -> None:
        """Drains what the kernel did not take at once, in order; then the error, if any."""
        backlog = client.backlog
        try:
            while True:
                await client.wake.wait()
                client.wake = trio.Event()
                while backlog:
                    # Stays queued while in flight, so offer() appends behind it.
                    await stream.send_all(backlog[0])
                    client.sent += len(backlog.popleft())
                if client.closed:
                    break
            if client.error is not None:
                await stream.send_all(encode_frame(client.error))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            client.closed = True
            done.cancel()

    def _player_input(self, entity: int, action: str) -> None:
        if self.plugins.accepts(action):
            self.inputs.append((entity, action, {}, 0))

    # -- the tick loop's side ---------------------------------------------

    def before_tick(self, tick: int) -> None:
        """Players' inputs, new players' entities and join/leave into the world."""
        now = time.monotonic()
        for client in list(self.clients.values()):
            if not client.closed:
                self._read_inputs(client, now)
        repl = self.replication
        joins, self.joins = self.joins, []
        plugin = self.plugins.new_player
        for join in joins:
            assert plugin is not None and plugin.new_player is not None
            builder = WorldBuilder(self.plugins, self.world, first_id=repl.next_id, tick=tick)
            builder.settings = self.plugins.settings.get(plugin.name)
            try:
                plugin.new_player(join.name, builder)
                if len(builder.records) != 1:
                    raise ValueError(f"spawned {len(builder.records)} entities instead of one")
            except Exception as exc:
                join.error = f"plugin {plugin.name}: new_player failed: {exc}"
                self._log.error("new player refused", name=join.name, error=join.error)
            else:
                repl.add_entity(builder.records[0])
                join.entity = builder.records[0][0]
            join.done.set()
        inputs, self.inputs = self.inputs, []
        events = []
        self._in_flight = {}
        latest: dict[int, int] = {}
        for seq, (entity, action, args, client_seq) in enumerate(inputs):
            events.append([entity, GATEWAY, seq, INPUT_PREFIX + action, args])
            self._in_flight[seq] = (entity, client_seq, action)
            if client_seq:
                latest[entity] = client_seq
        for entity, client_seq in latest.items():
            client = self.clients.get(entity)
            if client is not None:
                # Acknowledged by the view of this tick: the first whose state has it.
                client.acks.append((tick, client_seq))
        repl.inject(events)  # inputs for a player entity that is gone are dropped

    def inputs_failed(self, failures: list[tuple[int, int, str, str]]) -> None:
        """Tell players whose inputs of the tick just committed failed in the plugin.

        ``failures``: (entity, input event seq, where, error) from the commit.
        The input was undone; the connection stays. Each distinct failure is
        logged once (where it failed, for the plugin's author).
        """
        for entity, seq, where, text in failures:
            _entity, client_seq, action = self._in_flight.get(seq, (entity, 0, "?"))
            client = self.clients.get(entity)
            if client is not None and client_seq:
                client.offer(
                    encode_frame(
                        Error("bad_input", f"input {client_seq} ({action}) failed: {text}")
                    )
                )
            if self._input_errors.first((action, *error_site(where, text))):
                self._log.info(
                    "input failed and was undone (logged once per place)",
                    entity=entity,
                    action=action,
                    where=where or None,
                    error=text,
                )

    def after_tick(self, tick: int) -> None:
        """Watch the cells around players (from the next step on); a view update is due."""
        repl = self.replication
        records, config = repl.records, self.config
        present = []
        for client in self.clients.values():
            if client.entity in records:
                present.append(client)
            else:  # a plugin despawned the player's entity; logging in again makes a new one
                client.close(Error("gone", "your entity left the world; log in again"))
        repl.set_watch(
            watch_cells(_positions(records, present), config.view_radius, repl.cell_size)
            if present
            else []
        )
        self._views_due = None if tick % config.view_every else tick

    def send_views(self) -> None:
        """Send every player its view update of the last committed tick, if one is due.

        The tick loop calls this while the workers simulate the next tick,
        so the core builds views in time it would otherwise spend waiting.
        """
        tick, self._views_due = self._views_due, None
        if tick is None:
            return
        repl = self.replication
        records, config = repl.records, self.config
        present = [c for c in self.clients.values() if not c.closed and c.entity in records]
        codecs = self.plugins.codecs
        if not present:
            return
        cells = repl.cells
        # Around every player present now: one who logged in since after_tick
        # is not in the watched cells yet, and its first view must be whole.
        around = watch_cells(_positions(records, present), config.view_radius, repl.cell_size)
        watched = [records[i] for cx, cy in around for i in cells.get((cx, cy), ())]
        shown, self._shown = self._shown, {record[0]: record for record in watched}
        full: dict[int, bytes] = {}

        def entering(entity_id: int) -> bytes:
            found = full.get(entity_id)
            if found is None:
                _, kind, x, y, z, state = records[entity_id]
                found = full[entity_id] = cbor2.dumps(
                    [entity_id, kind, x, y, z, codecs[kind].to_dict(state)]
                )
            return found

        changes = {}
        for record in watched:
            entity_id, before = record[0], shown.get(record[0])
            if before is record:
                continue
            if before is not None and record[5] == before[5]:  # only moved: just the position
                changes[entity_id] = cbor2.dumps([entity_id, *record[2:5]])
            else:
                changes[entity_id] = entering(entity_id)
        views = nearest(
            [records[client.entity] for client in present],
            watched,
            config.view_radius,
            config.view_max,
        )
        for client, ids in zip(present, views, strict=True):
            enter, update, leave = update_view(client.viewer, ids, changes, entering)
            acks = client.acks
            while acks and acks[0][0] <= tick:
                client.acked = acks.popleft()[1]
            client.offer(frame(encode_view(tick, client.acked, enter, update, leave)))

    def take_claims(self) -> list[tuple[str, int]]:
        claims, self.new_claims = self.new_claims, []
        return claims

    def status(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "players": len(self.clients),
            "connections": self.connections,
            "refused": dict(self.refused),
            "kicked": dict(self.kicked),
            "bytes_sent": self.bytes_sent + sum(c.sent for c in self.clients.values()),
        }


def _positions(
    records: dict[int, list[Any]], clients: list[Client]
) -> Iterator[tuple[float, float]]:
    for client in clients:
        record = records[client.entity]
        yield record[2], record[3]


async def listen(config: GatewayConfig) -> list[trio.SocketListener]:
    """Bind the players' address; :class:`ConfigError` naming the setting if it cannot be."""
    host, port = config.address()
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen for players on {config.listen}: {exc.strerror or exc}; "
            'set gateway.listen (or serve --listen) to a free HOST:PORT, or "" for none'
        ) from None


def cell_size(config: GatewayConfig) -> float:
    """Side of the interest cells: the view radius (a view spans at most 3 x 3 cells)."""
    return math.ceil(config.view_radius)
