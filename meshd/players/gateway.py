"""A gateway process: ``python -m meshd.players.gateway SOCKET SLOT EPOCH`` (trio shell).

The core starts ``gateway.processes`` of these (:mod:`meshd.players.fleet`),
like workers: own process group, one-time token, ``Hello``. Each listens
on the players' address itself (:mod:`meshd.players.ports`: the kernel
spreads connections over the gateways, and players see one address) and
owns the players it accepts:

- **logins**: the ``Login`` within ``gateway.login_timeout`` (on a TLS port,
  the TLS handshake first, within the same deadline), from a connection its
  :class:`~meshd.players.door.Door` admitted; its name in canonical form
  (:mod:`meshd.players.names`: NFKC, trimmed, one script) or refused; a
  valid resume token skips the secret, otherwise the core gives the account
  (``Lookup``, or why the login is refused: sign-ups closed or limited, the
  account disabled) and the secret is hashed here, in a pool of threads;
  the core gives the entity (``Enter``);
- **inputs**: when a tick's :class:`~meshd.players.messages.Publish`
  arrives, one ``epoll`` poll finds the players that sent something and
  only those are read (token bucket, inputs checked, pings answered); what
  they sent goes to the core as one ``Inputs`` batch;
- **views**: the same ``Publish`` updates the :class:`~meshd.players.views.Mirror`,
  which builds every player's view at once; each is written straight into
  the player's socket, and only what the kernel does not take goes to the
  connection's writer task (bounded backlog, then "slow").

On a TLS port (``gateway.tls_cert``) the same raw reads and writes carry
ciphertext: each connection's :class:`~meshd.players.tls.TlsLayer` turns
what is read into plaintext and every frame into ciphertext just before it
is written; a plain port has no layer and takes the same path as ever.

Everything a client can get wrong ends with one ``Error`` frame and the
close of that connection only. The process exits when the core's socket
closes, so it never outlives the core; if it dies, the core starts another
and its players come back with their resume tokens.

It is long because a player's whole path through one process (connection,
login, per-tick reads, views, the writer) reads best in one place.
"""

from __future__ import annotations

import gc
import hmac
import itertools
import os
import select
import signal
import socket
import ssl
import sys
import time
from collections import deque
from typing import Any

import attrs
import numpy as np
import trio

from meshd.common.links import receive_frame
from meshd.common.log import configure, get_logger
from meshd.common.wire import (
    FrameDecoder,
    WireError,
    compact_args,
    decode_message,
    encode_message,
    frame,
)
from meshd.mesh.messages import Hello
from meshd.mesh.step import collect_between_ticks
from meshd.mesh.worker import TOKEN_ENV
from meshd.players.accounts import (
    SALT_BYTES,
    hash_secret,
    resume_token,
    resumed_entity,
    scrypt_parameters,
)
from meshd.players.door import Door
from meshd.players.messages import (
    CORE_TO_GATEWAY,
    AccountInfo,
    Actions,
    Enter,
    Entered,
    GatewayInit,
    GatewayReady,
    Inputs,
    Kick,
    Left,
    Lookup,
    Publish,
)
from meshd.players.names import BadName, canonical_name
from meshd.players.ports import open_listeners
from meshd.players.protocol import (
    MAX_LOGIN_FRAME,
    MAX_PLAYING_FRAME,
    PROTOCOL_VERSION,
    Error,
    Input,
    InputRefused,
    Login,
    Message,
    Ping,
    Pong,
    Refused,
    Welcome,
    WorldState,
    decode_client,
    encode_frame,
)
from meshd.players.tls import NotTls, TlsLayer, TlsReceiver, handshake, server_context
from meshd.players.views import Mirror
from meshd.plugin import FORGET, JOIN, LEAVE, Arg, check_input

SEND_BUFFER = 256 << 10
RECEIVE_PER_TICK = 64 << 10
"""Bytes read from one player per tick; more than a legitimate client sends in a second."""
STATS_EVERY = 10
"""``Inputs`` batches per counters for ``inspect gateways`` (summing them costs a pass over
every player)."""
CLOSE_GRACE = 1.0
"""Seconds a closing connection gets to flush its last frames and the error."""
CORE_FRAME_CAP = 1 << 30
"""The core is trusted: a ``Publish`` of a crowded tick may be large."""


@attrs.define(eq=False)
class Client:
    """One logged-in connection and its send path.

    Frames go straight into the socket while the kernel takes them (``sock``
    is a duplicate of the connection's descriptor, so a send needs no task
    switch); what the kernel does not take waits in ``backlog`` for the
    writer task, at most ``send_queue`` frames. A client whose backlog is
    full reads too slowly and is dropped. On a TLS port, ``tls`` seals each
    frame as it is offered (in order: the backlog holds ciphertext).
    """

    name: str
    entity: int
    session: int
    sock: socket.socket
    decoder: FrameDecoder
    """Bytes received and not yet a whole frame (the login's leftovers first)."""
    send_queue: int
    tokens: float
    """Messages it may still send now (``gateway.input_rate`` / ``input_burst``)..."""
    byte_tokens: float
    """...and bytes (``input_bytes_rate`` / ``input_bytes_burst``)."""
    refilled: float
    acked: int = 0
    """The ``seq`` of the last input whose tick the views have reached."""
    acks: deque[tuple[int, int]] = attrs.field(factory=deque)
    """(batch, seq): the last input of each ``Inputs`` batch it was sent in."""
    error: Error | None = None
    closed: bool = False
    connection: trio.CancelScope | None = None
    backlog: deque[bytes | memoryview] = attrs.field(factory=deque)
    wake: trio.Event = attrs.field(factory=trio.Event)
    sent: int = 0
    """Bytes handed to the kernel."""
    tls: TlsLayer | None = None
    """The connection's TLS on a TLS port (None: plain TCP)."""

    def offer(self, data: bytes) -> bool:
        """Send or queue a frame; False (and the client is dropped) when it reads too slowly."""
        if self.closed:
            return False
        backlog = self.backlog
        if backlog and len(backlog) >= self.send_queue:
            self.close(Error("slow", "you read too slowly: dropped"), grace=0.0)
            return False
        if self.tls is not None:
            data = self.tls.seal(data)
        if not backlog:  # nothing ahead of it: the kernel may take it now
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
            backlog.append(memoryview(data)[taken:])
        else:
            backlog.append(data)
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


@attrs.define
class _Visit:
    """One connection's standing at the :class:`Door`: its address and address group, and
    whether it was admitted as a player."""

    group: str
    address: str
    admitted: bool = False


@attrs.frozen
class _Proof:
    """A login proven: whether the name is new, and what the core stores for it
    (``[salt, hash, parameters]``, or nothing)."""

    new: bool
    store: list[Any]


class Gateway:
    """One gateway process's players: connections, logins, inputs and views."""

    def __init__(self, init: GatewayInit, link: trio.SocketStream, decoder: FrameDecoder) -> None:
        self.init = init
        self.config = init.config
        self.actions: set[str] = set()
        self.shapes: dict[str, dict[str, Arg]] = {}
        self.players = False
        """Whether a plugin makes player entities (a login is refused otherwise)."""
        self._adopt(Actions(init.actions, init.shapes, init.players))
        self.link = link
        self.link_decoder = decoder
        self.mirror = Mirror()
        self.mirror.tick = init.tick
        self.clients: dict[int, Client] = {}
        self.connections = 0
        self.refused: dict[str, int] = {}
        self.kicked: dict[str, int] = {}
        self.bytes_sent = 0
        """Bytes sent on connections that have ended (the live ones count their own)."""
        self.inputs: list[list[Any]] = []
        self.world_state: dict[str, Any] = {}
        """The plugins' world state as last published (every new player gets it)."""
        self._arrived: list[Client] = []
        """Players who sent more than their login in its frame: read at the next tick."""
        self.batch = 0
        self._poll = select.epoll()
        self._by_fd: dict[int, Client] = {}
        self._requests: dict[int, trio.MemorySendChannel[Any]] = {}
        self._request_ids = itertools.count(1)
        self._sessions = itertools.count(1)
        self._outbox_send, self._outbox = trio.open_memory_channel[bytes](float("inf"))
        self._hashing = trio.CapacityLimiter(init.config.hash_threads or os.cpu_count() or 1)
        self._hash_turns: dict[str, trio.Lock] = {}
        """Per address group: whose turn it is to hash (see :meth:`_hash`)."""
        self.door = Door(init.config)
        self._tls = (
            server_context(self.config.tls_cert, self.config.tls_key)
            if self.config.tls_cert
            else None
        )
        self._log = get_logger(component="gateway", gateway=init.gateway)

    # -- the link to the core ---------------------------------------------

    def _send_core(self, message: Any) -> None:
        self._outbox_send.send_nowait(frame(encode_message(message)))

    async def _write_core(self) -> None:
        async for data in self._outbox:
            await self.link.send_all(data)

    async def _read_core(self) -> None:
        """Every message from the core, in order; returns when the core closes the link."""
        while True:
            try:
                body = await receive_frame(self.link, self.link_decoder, 1 << 20)
            except EOFError:
                return
            message = decode_message(body, CORE_TO_GATEWAY)
            if isinstance(message, Publish):
                self._tick(message)
            elif isinstance(message, AccountInfo | Entered):
                answer = self._requests.pop(message.request, None)
                if answer is not None:
                    answer.send_nowait(message)
            elif isinstance(message, Actions):
                self._adopt(message)
            elif isinstance(message, Kick):
                client = self.clients.get(message.entity)
                if client is not None and client.session == message.session:
                    self._end(client, Error(message.code, message.message))

    def _adopt(self, actions: Actions) -> None:
        """What players may send: at start, and when the plugins' code changed."""
        self.actions = set(actions.actions) - {JOIN, LEAVE, FORGET}
        self.shapes, self.players = actions.shapes, actions.players

    async def _ask(self, request: Lookup | Enter) -> Any:
        send, receive = trio.open_memory_channel[Any](1)
        self._requests[request.request] = send
        try:
            self._send_core(request)
            return await receive.receive()
        finally:
            self._requests.pop(request.request, None)

    async def run(self, listeners: list[trio.SocketListener]) -> None:
        """Serve players until the core closes the link."""
        self._send_core(GatewayReady(self.init.gateway))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_core)
            nursery.start_soon(trio.serve_listeners, self._handle, listeners)
            await self._read_core()
            nursery.cancel_scope.cancel()

    # -- one tick ---------------------------------------------------------

    def _tick(self, publish: Publish) -> None:
        """A tick was committed: read the players, send their inputs, then their views."""
        self.mirror.apply(publish)
        for entity, client_seq, action, text in publish.failed:
            client = self.clients.get(entity)
            if client is not None and client_seq:
                client.offer(
                    encode_frame(
                        Error("bad_input", f"input {client_seq} ({action}) failed: {text}")
                    )
                )
        self._read_players()
        self.batch += 1
        batch, self.inputs = self.inputs, []
        stats = self._stats() if self.batch % STATS_EVERY == 1 else {}
        self._send_core(Inputs(self.batch, batch, stats))
        if publish.view:
            self._send_views(publish.batch)
        if publish.world is not None:
            self.world_state = publish.world
            framed = encode_frame(WorldState(publish.tick, publish.world))
            for client in self.clients.values():
                client.offer(framed)
        if publish.messages:
            self._deliver(publish.tick, publish.messages)
        # This tick's garbage, now that its views are out (automatic collection is off).
        collect_between_ticks(publish.tick)

    def _read_players(self) -> None:
        """Take what every player sent since the last tick: one poll, then only the readable."""
        now = time.monotonic()
        for fd, _events in self._poll.poll(0):
            client = self._by_fd.get(fd)
            if client is not None and not client.closed:
                self._read_inputs(client, now)
        arrived, self._arrived = self._arrived, []
        for client in arrived:  # frames that came with the login, already received
            if not client.closed:
                self._read_inputs(client, now, receive=False)

    def _read_inputs(self, client: Client, now: float, *, receive: bool = True) -> None:
        """Take what ``client`` sent, without waiting."""
        if receive:
            try:
                data = client.sock.recv(RECEIVE_PER_TICK)
            except BlockingIOError:
                data = None
            except OSError:  # reset by the peer: the same as hanging up
                client.close(grace=0.0)
                return
            if data == b"":
                client.close()
                return
        else:
            data = None
        config = self.config
        elapsed = now - client.refilled
        client.tokens = min(config.input_burst, client.tokens + elapsed * config.input_rate)
        client.byte_tokens = min(
            config.input_bytes_burst, client.byte_tokens + elapsed * config.input_bytes_rate
        )
        client.refilled = now
        if data:
            # Charged as they arrive, before anything is decoded (or decrypted).
            client.byte_tokens -= len(data)
            if client.byte_tokens < 0:
                client.close(Error("flood", f"more than {config.input_bytes_rate:g} bytes/s"))
                return
            if client.tls is not None:
                try:
                    data = client.tls.receive(data)
                except ssl.SSLError:  # a forged or broken record: nothing more can be read
                    client.close(grace=0.0)
                    return
                if client.tls.closed:  # close_notify: what came before it still counts
                    client.close()
            client.decoder.feed(data)
        last_seq = 0
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
                    args = self._checked_args(client, message)
                    if args is None:
                        continue
                    self.inputs.append(
                        [client.entity, message.action, compact_args(args), message.seq]
                    )
                    last_seq = message.seq or last_seq
                elif isinstance(message, Ping):
                    client.offer(encode_frame(Pong(message.id, self.mirror.tick)))
                elif isinstance(message, InputRefused):
                    client.offer(encode_frame(Error("bad_input", str(message))))
                else:
                    client.close(Error("already_logged_in", "log in once per connection"))
                    return
        except WireError as exc:
            client.close(Error("bad_frame", str(exc)))
        finally:
            if last_seq:
                # Acknowledged by the view of the tick that takes this batch.
                client.acks.append((self.batch + 1, last_seq))

    def _checked_args(self, client: Client, message: Input) -> dict[str, Any] | None:
        """The input's arguments as its handler takes them; None (the client told) if refused."""
        problem = None
        if message.action not in self.actions:
            problem = f"input {message.seq}: no action {message.action!r}"
        else:
            shape = self.shapes.get(message.action)
            if shape is None:
                return message.args
            try:
                return check_input(shape, message.args)
            except ValueError as exc:
                problem = f"input {message.seq} ({message.action}): {exc}"
        client.offer(encode_frame(Error("bad_input", problem)))
        return None

    def _send_views(self, taken: int) -> None:
        """Every present player's view update of the mirror's tick."""
        clients = [client for client in self.clients.values() if not client.closed]
        present = list(
            itertools.compress(clients, self.mirror.held([client.entity for client in clients]))
        )
        acked = []
        for client in present:
            acks = client.acks
            while acks and acks[0][0] <= taken:
                client.acked = acks.popleft()[1]
            acked.append(client.acked)
        config = self.config
        frames = self.mirror.views(
            [client.entity for client in present], acked, config.view_radius, config.view_max
        )
        for client, view in zip(present, frames, strict=True):
            client.offer(view)

    def _deliver(self, tick: int, messages: list[list[Any]]) -> None:
        """The plugins' messages of ``tick``: to one player, to everyone, or to those near."""
        clients = [client for client in self.clients.values() if not client.closed]
        entities = np.array([client.entity for client in clients], dtype=np.int64)
        mirror = self.mirror
        rows = np.searchsorted(mirror.ids, entities).clip(max=max(len(mirror.ids) - 1, 0))
        held = (mirror.ids[rows] == entities) if len(mirror.ids) else np.zeros(0, dtype=bool)
        positions = mirror.positions[rows, :2] if len(mirror.ids) else np.zeros((0, 2))
        for sender, player, x, y, radius, data in messages:
            framed = encode_frame(Message(tick, sender, data))
            if player:
                client = self.clients.get(player)
                if client is not None:
                    client.offer(framed)
                continue
            chosen = held.copy() if radius >= 0 else np.ones(len(clients), dtype=bool)
            if radius >= 0:
                chosen &= np.hypot(positions[:, 0] - x, positions[:, 1] - y) <= radius
            for index in np.flatnonzero(chosen).tolist():
                clients[index].offer(framed)

    def _stats(self) -> dict[str, Any]:
        return {
            "players": len(self.clients),
            "connections": self.connections,
            "refused": self.refused,
            "kicked": self.kicked,
            "bytes_sent": self.bytes_sent + sum(c.sent for c in self.clients.values()),
            "backlog": sum(len(c.backlog) for c in self.clients.values()),
            "cpu_s": round(time.process_time(), 3),
        }

    # -- connections ------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream) -> None:
        # Bounded kernel buffers too: a reader that stalls is noticed within a second or two.
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        address = _peer_address(stream)
        visit = _Visit(self.door.group(address), address)
        async with stream:
            refused = self.door.arrive(visit.group)
            if refused is not None:
                # Before any handshake: on a TLS port nothing can be said, only closed.
                unsaid = TlsLayer(self._tls) if self._tls is not None else None
                await self._refuse(stream, unsaid, refused.code, refused.message)
                return
            self.connections += 1
            try:
                await self._connection(stream, visit)
            except Exception:
                # Whatever one connection does, it ends that connection only.
                self._log.exception("player connection failed")
            finally:
                self.connections -= 1
                self.door.gone(visit.group, admitted=visit.admitted)

    async def _connection(self, stream: trio.SocketStream, visit: _Visit) -> None:
        decoder = FrameDecoder(MAX_LOGIN_FRAME)
        session = next(self._sessions)
        tls = TlsLayer(self._tls) if self._tls is not None else None
        try:
            # The whole proof within the deadline: the handshake, the frame, the checks,
            # the hashing.
            with trio.fail_after(self.config.login_timeout):
                if tls is not None:
                    await handshake(stream, tls)
                reader = stream if tls is None else TlsReceiver(stream, tls)
                login = decode_client(await receive_frame(reader, decoder))
                if not isinstance(login, Login):
                    raise Refused("login_first", "the first message must be a login")
                if login.version != PROTOCOL_VERSION:
                    raise Refused("version", f"this server speaks protocol {PROTOCOL_VERSION}")
                try:
                    name = canonical_name(login.name)
                except BadName as exc:
                    raise Refused("bad_name", str(exc)) from None
                proof = await self._prove(login, name, visit)
            entity = await self._enter(name, session, proof, visit)
        except trio.TooSlowError:
            await self._refuse(stream, tls, "login_timeout", "no login in time")
            return
        except Refused as refused:
            await self._refuse(stream, tls, refused.code, refused.message)
            return
        except WireError as exc:
            await self._refuse(stream, tls, "bad_frame", str(exc))
            return
        except NotTls:
            # Said in plaintext, which is what the client speaks.
            await self._refuse(
                stream, None, "tls_required", "this port speaks TLS: connect with TLS"
            )
            return
        except ssl.SSLError:  # the client got the alert that says why
            self.refused["tls"] = self.refused.get("tls", 0) + 1
            return
        except EOFError:
            return
        decoder.max_frame = MAX_PLAYING_FRAME
        await self._play(stream, decoder, name, entity, session, tls)

    async def _refuse(
        self, stream: trio.SocketStream, tls: TlsLayer | None, code: str, message: str
    ) -> None:
        """Tell the client why it is refused (in TLS once its handshake is done; before it,
        nothing can be said)."""
        self.refused[code] = self.refused.get(code, 0) + 1
        data = encode_frame(Error(code, message))
        if tls is not None:
            data = tls.seal(data) + tls.close() if tls.established else b""
        if data:
            with trio.move_on_after(1.0):
                await stream.send_all(data)

    async def _prove(self, login: Login, name: str, visit: _Visit) -> _Proof:
        """Check ``login`` of canonical ``name`` (its resume token, else its secret) before
        it may enter.

        A good login with out-of-date hashing parameters gives the core the
        secret hashed again with the configured ones; a new name's secret
        hashed. A wrong secret counts against the address (:class:`Door`).
        """
        if not self.players:
            raise Refused("no_players", "no loaded plugin defines player entities")
        group, kdf = visit.group, scrypt_parameters(self.config.hash_cost)
        if login.resume and resumed_entity(self.init.resume_key, name, login.resume) is not None:
            return _Proof(new=False, store=[])
        refused = self.door.may_try(group, name, time.monotonic())
        if refused is not None:
            raise refused
        account = await self._ask(Lookup(next(self._request_ids), name, visit.address))
        assert isinstance(account, AccountInfo)
        if account.code:
            raise Refused(account.code, account.message)
        if not account.found:
            if len(login.secret) < self.config.min_secret:
                raise Refused(
                    "weak_secret",
                    f"a new name's secret needs at least {self.config.min_secret} characters",
                )
            salt = os.urandom(SALT_BYTES)
            return _Proof(
                new=True, store=[salt, await self._hash(group, login.secret, salt, kdf), kdf]
            )
        digest = await self._hash(group, login.secret, account.salt, account.kdf or kdf)
        if not hmac.compare_digest(digest, account.digest):
            self.door.failed(group, name, time.monotonic())
            self._log.warning("wrong secret", name=name, address=group)
            raise Refused("auth", f"wrong secret for {name!r}")
        if account.kdf == kdf:
            return _Proof(new=False, store=[])
        salt = os.urandom(SALT_BYTES)
        return _Proof(
            new=False, store=[salt, await self._hash(group, login.secret, salt, kdf), kdf]
        )

    async def _enter(self, name: str, session: int, proof: _Proof, visit: _Visit) -> int:
        """The proven player's entity, from the core.

        A new name is stored by the core (durably) before its entity is made,
        so a player who was welcomed keeps the name whatever happens next.
        """
        refused = self.door.admit(visit.group)
        if refused is not None:
            raise refused
        visit.admitted = True
        entered = await self._ask(
            Enter(next(self._request_ids), name, session, proof.new, proof.store, visit.address)
        )
        assert isinstance(entered, Entered)
        if entered.code:
            raise Refused(entered.code, entered.message)
        return entered.entity

    async def _hash(self, group: str, secret: str, salt: bytes, kdf: str) -> bytes:
        """``secret`` hashed in the pool, one address (``group``) at a time: a login waits
        behind at most one hash of each other address, however many one address sends."""
        turn = self._hash_turns.get(group)
        if turn is None:
            turn = self._hash_turns[group] = trio.Lock()
        try:
            async with turn:
                return await trio.to_thread.run_sync(
                    hash_secret, secret, salt, kdf, limiter=self._hashing
                )
        finally:
            if not turn.locked() and not turn.statistics().tasks_waiting:
                self._hash_turns.pop(group, None)

    async def _play(
        self,
        stream: trio.SocketStream,
        decoder: FrameDecoder,
        name: str,
        entity: int,
        session: int,
        tls: TlsLayer | None,
    ) -> None:
        client = Client(
            name,
            entity,
            session,
            socket.socket(fileno=os.dup(stream.socket.fileno())),
            decoder,
            self.config.send_queue,
            tokens=float(self.config.input_burst),
            byte_tokens=float(self.config.input_bytes_burst),
            refilled=time.monotonic(),
            tls=tls,
        )
        previous = self.clients.get(entity)
        if previous is not None:
            self._end(previous, Error("replaced", "you logged in from somewhere else"))
            self._forget(previous)
        self.clients[entity] = client
        if decoder.pending:
            self._arrived.append(client)
        self.mirror.restart_view(entity)
        self._by_fd[client.sock.fileno()] = client
        self._poll.register(client.sock.fileno(), select.EPOLLIN)
        init = self.init
        client.offer(
            encode_frame(
                Welcome(
                    version=PROTOCOL_VERSION,
                    player=entity,
                    tick=self.mirror.tick,
                    rate=init.rate,
                    world_size=init.world_size,
                    view_radius=self.config.view_radius,
                    view_every=self.config.view_every,
                    resume=resume_token(init.resume_key, name, entity),
                )
            )
        )
        if self.world_state:
            client.offer(encode_frame(WorldState(self.mirror.tick, self.world_state)))
        try:
            async with trio.open_nursery() as nursery:
                client.connection = nursery.cancel_scope
                # Each tick's poll reads this connection from now on (_read_players);
                # the writer ends it once the client is closed.
                nursery.start_soon(self._writer, stream, client, nursery.cancel_scope)
        finally:
            self._forget(client)
            client.close()
            client.sock.close()
            self.bytes_sent += client.sent
            if client.error is not None:
                self.kicked[client.error.code] = self.kicked.get(client.error.code, 0) + 1
            self._send_core(Left(entity, session))

    def _end(self, client: Client, error: Error) -> None:
        """Close ``client`` with ``error``, unless it has hung up already.

        A hang-up since the last tick is news to the per-tick reads: read
        now, so a player reconnecting after a reset is not told it was replaced.
        """
        self._read_inputs(client, time.monotonic())
        client.close(error)

    def _forget(self, client: Client) -> None:
        """Stop reading ``client`` (its connection is ending)."""
        if self.clients.get(client.entity) is client:
            del self.clients[client.entity]
        if self._by_fd.pop(client.sock.fileno(), None) is not None:
            self._poll.unregister(client.sock.fileno())

    async def _writer(
        self, stream: trio.SocketStream, client: Client, done: trio.CancelScope
    ) -> None:
        """Drains what the kernel did not take at once, in order; then the error, if any
        (and on a TLS port the ``close_notify``)."""
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
            last = encode_frame(client.error) if client.error is not None else b""
            if client.tls is not None:
                last = (client.tls.seal(last) if last else b"") + client.tls.close()
            if last:
                await stream.send_all(last)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
            pass
        finally:
            client.closed = True
            done.cancel()


def _peer_address(stream: trio.SocketStream) -> str:
    """The client's IP address ("" if the socket cannot say)."""
    try:
        return str(stream.socket.getpeername()[0])
    except (OSError, IndexError, TypeError):
        return ""


async def _main(socket_path: str, slot: int, epoch: int, token: str) -> int:
    try:
        link = await trio.open_unix_socket(socket_path)
    except (FileNotFoundError, ConnectionRefusedError):
        return 0  # the core stopped while we were starting
    decoder = FrameDecoder(CORE_FRAME_CAP)
    await link.send_all(
        frame(encode_message(Hello(slot, epoch, token, os.getpid(), role="gateway")))
    )
    try:
        init = decode_message(await receive_frame(link, decoder), (GatewayInit,))
    except EOFError:
        return 0
    configure(json=init.log_json, level=init.log_level)
    gc.freeze()
    gc.disable()
    listeners = [
        trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        for sock in open_listeners([tuple(address) for address in init.listen])
    ]
    await Gateway(init, link, decoder).run(listeners)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m meshd.players.gateway SOCKET SLOT EPOCH", file=sys.stderr)
        return 2
    token = os.environ.pop(TOKEN_ENV, "")
    # Ctrl-C goes to the core; the core stops us by closing the socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return trio.run(_main, args[0], int(args[1]), int(args[2]), token)
    except (ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError):
        return 0


if __name__ == "__main__":
    sys.exit(main())
