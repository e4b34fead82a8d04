"""A trio client for the meshd player protocol (see ``docs/protocol.md``); public.

    async with await meshd.client.connect("127.0.0.1", 7777, "ada", "s3cret") as player:
        await player.send("move", dx=1.0, dy=0.0)
        async for view in player.views():
            me = player.world[player.entity]
            print(view.tick, me.x, me.y, me.state["vx"])

:class:`Player` keeps ``world``, the entities currently in view by id (each
an :class:`Entity`), up to date from the view updates it yields. An error that
ends the connection raises :class:`ServerError`; ``bad_input`` (an input
refused or undone, the connection stays) is collected in ``bad_inputs``; a
dropped connection raises :class:`ConnectionLost`.

A server whose port serves TLS (``gateway.tls_cert``) needs ``tls=True``: the
certificate is then verified against the system's authorities and the host
name, as a browser would. ``ssl_context=tls_context(ca="ca.pem")`` trusts a
certificate authority (or a self-signed certificate) of your own instead;
``tls_context(insecure=True)`` verifies nothing (anyone on the way can read
the secret: for tests only). A failed handshake raises :class:`TlsError`,
saying why; a plaintext client on a TLS port gets ``ServerError``
``tls_required``.

A connection that breaks without an ``Error`` (the gateway process serving
it died: a reset or an end of stream) is made again to the same address,
logging in with the ``resume`` token of the latest ``Welcome``: at once, then
after 50 ms, doubling up to 250 ms, for ``reconnect_within`` seconds (5 by
default; 0 turns it off). Reading views drives it; :meth:`Player.send` and
:meth:`Player.ping` wait for it and then go out on the new connection. After
the new ``Welcome`` the view stream starts over: ``world`` is emptied and the
next view enters everything in view again; ``reconnects``, ``reconnect_ms``
and ``welcome`` say it happened, and ``entity`` is the new ``Welcome``'s
player (the same entity, unless the server gave another). What was in
flight when the connection broke is gone: an input sent before and never
acknowledged in a view may never have been applied (send state-like
inputs such as ``move`` again; ``View.ack`` starts over from 0), and pings
awaiting their pong are dropped from the round-trip times. Only when no
connection could be made in time does :class:`ConnectionLost` end it.

It is long because a reconnect must be safe whichever of the reader and the
senders notices the break first.
"""

from __future__ import annotations

import itertools
import os
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import trio

from meshd.common.links import receive_frame
from meshd.common.wire import FrameDecoder
from meshd.players.protocol import (
    PROTOCOL_VERSION,
    Error,
    Input,
    Login,
    Message,
    Ping,
    Pong,
    View,
    Welcome,
    WorldState,
    decode_server,
    encode_frame,
)

SERVER_FRAME_CAP = 16 << 20
RECONNECT_WITHIN = 5.0
"""Seconds a lost connection is tried again before :class:`ConnectionLost`."""
RETRY_FIRST = 0.05
RETRY_MAX = 0.25
"""The pause after a failed reconnect: from ``RETRY_FIRST`` doubling up to this."""
RETRY_CODES = frozenset({"busy", "full"})
"""Login errors worth another try while reconnecting: they say "not right now"
(every player of a dead gateway comes back at once); any other error ends it."""
READER_GRACE = 1.0
"""Seconds a send on a broken connection leaves a receiving reader to notice it first."""
DRAIN_WITHIN = 0.1
"""Seconds a send on a broken connection reads for the ``Error`` that may have ended it."""


class ServerError(Exception):
    """The server sent an ``Error``: ``code`` and ``message`` say why."""

    def __init__(self, error: Error) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.code = error.code
        self.message = error.message


class ConnectionLost(Exception):
    """The server closed the connection without an ``Error`` (and no reconnect made it)."""


class TlsError(OSError):
    """The TLS handshake failed: the certificate is not trusted, or the port does not
    speak TLS; the message says which, and what to do."""


def tls_context(
    ca: str | os.PathLike[str] | None = None, *, insecure: bool = False
) -> ssl.SSLContext:
    """A client's TLS context: verifying the server's certificate and host name against the
    system's authorities, or against ``ca`` (a PEM file of the authorities, or of the
    server's own self-signed certificate, to trust).

    ``insecure=True`` turns verification off: anyone between the client and
    the server can then pose as the server and read every secret. Never
    use it beyond a test on your own machine.
    """
    if insecure:
        if ca is not None:
            raise ValueError("a CA to trust, or insecure: not both")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=None if ca is None else os.fspath(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@attrs.define
class Entity:
    """An entity in view: where it is, and its state (the plugin's fields by name).

    The state stays apart from the position, so a plugin field called ``x``
    or ``kind`` is ``entity.state["x"]`` and never hides ``entity.x``.
    """

    id: int
    kind: str
    x: float
    y: float
    z: float
    state: dict[str, Any]


class Player:
    """One logged-in player: its connection, made again when it breaks (see the module)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        welcome: Welcome,
        decoder: FrameDecoder,
        *,
        address: tuple[str, int] | None = None,
        name: str = "",
        secret: str = "",
        reconnect_within: float = 0.0,
        ssl_context: ssl.SSLContext | None = None,
        local_address: str | None = None,
    ) -> None:
        self.stream = stream
        self.welcome = welcome
        self.entity = welcome.player
        self.resume = welcome.resume
        """The token to log in again with: the latest ``Welcome``'s."""
        self.world: dict[int, Entity] = {}
        self.tick = welcome.tick
        self.reconnects = 0
        self.reconnect_ms: list[float] = []
        """For each reconnect, milliseconds from noticing the loss to the new ``Welcome``."""
        self.reconnect_within = reconnect_within if address is not None else 0.0
        self._address = address
        self._local_address = local_address
        self._name = name
        self._secret = secret
        self._ssl_context = ssl_context
        self._decoder = decoder
        self._seq = itertools.count(1)
        self._pings: dict[int, float] = {}
        self.rtts: list[float] = []
        """Round-trip times of answered pings, in milliseconds."""
        self.world_state: dict[str, Any] = {}
        """The plugins' world-wide state, per plugin (the latest ``WorldState``)."""
        self.messages: list[Message] = []
        """What the game's rules sent this player (``Message``), oldest first, as they arrive."""
        self.bad_inputs: list[str] = []
        """The server's messages about inputs it refused or that failed (``bad_input``):
        each was ignored or undone, and the connection stays."""
        # Which connection ``stream`` is (bumped by each reconnect), so a task
        # that saw one break knows whether another already replaced it.
        self._generation = 0
        self._reconnecting = False
        self._reading = False
        self._closed = False
        self._ended: ServerError | ConnectionLost | None = None
        """Why the player is over for good, once it is (sends raise it too)."""
        self._changed = trio.Event()

    async def __aenter__(self) -> Player:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection for good (no reconnect follows)."""
        self._closed = True
        await self.stream.aclose()

    async def send(self, action: str, **args: Any) -> int:
        """Send one input; returns its sequence number (echoed as ``View.ack``).

        During a reconnect it waits for the new connection. Raises
        :class:`ConnectionLost` (or the :class:`ServerError` that ended the
        player) once there is none; without reconnects, a broken connection
        raises ``trio.BrokenResourceError`` as it is.
        """
        seq = next(self._seq)
        await self._send(encode_frame(Input(seq=seq, action=action, args=args)))
        return seq

    async def ping(self) -> None:
        """Send a ping; its round trip lands in ``rtts`` when the pong arrives.

        Fails as :meth:`send` does.
        """
        ping_id = next(self._seq)
        await self._send(encode_frame(Ping(id=ping_id)), ping_id)

    async def views(self) -> AsyncIterator[View]:
        """View updates, applied to ``world`` before each is yielded.

        Reconnects when the connection breaks (see the module). Raises
        :class:`ServerError` for an ``Error`` that ends the connection and
        :class:`ConnectionLost` when no connection could be made again.
        """
        while True:
            while self._reconnecting:  # a sender is at it, and may be reading the old stream
                await self._changed.wait()
            if self._ended is not None:
                raise _again(self._ended)
            generation, stream, decoder = self._generation, self.stream, self._decoder
            self._reading = True
            lost = ""
            try:
                message = await _receive(stream, decoder)
            except ConnectionLost as exc:
                lost = str(exc)
            except ServerError as exc:
                self._end(exc)
                raise
            finally:
                self._reading = False
                self._notify()  # a sender may be waiting for this reader to see the end
            if lost:
                await self._recover(generation, lost, reader=True)
                continue
            if isinstance(message, Error):  # only bad_input comes back: the rest raise
                self.bad_inputs.append(message.message)
                continue
            if isinstance(message, Pong):
                sent = self._pings.pop(message.id, None)
                if sent is not None:
                    self.rtts.append((time.perf_counter() - sent) * 1000.0)
                continue
            if isinstance(message, Message):
                self.messages.append(message)
                continue
            if isinstance(message, WorldState):
                self.world_state = message.state
                continue
            if isinstance(message, View):
                self._apply(message)
                yield message

    def _apply(self, view: View) -> None:
        self.tick = view.tick
        for entity_id in view.leave:
            self.world.pop(entity_id, None)
        for item in [*view.enter, *view.update]:
            if len(item) == 4:  # moved, state unchanged
                entity_id, x, y, z = item
                known = self.world.get(entity_id)
                if known is not None:
                    known.x, known.y, known.z = x, y, z
                continue
            self.world[item[0]] = Entity(*item)

    async def _send(self, data: bytes, ping_id: int = 0) -> None:
        """Send one frame on the current connection, through any reconnect (see :meth:`send`)."""
        while True:
            while self._reconnecting:
                await self._changed.wait()
            if self._ended is not None:
                raise _again(self._ended)
            generation, stream = self._generation, self.stream
            if ping_id:
                self._pings[ping_id] = time.perf_counter()
            try:
                await stream.send_all(data)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._pings.pop(ping_id, None)
                if self._closed or self.reconnect_within <= 0:
                    raise
                lost = f"send: {exc}" if str(exc) else "the connection broke while sending"
                await self._recover(generation, lost, reader=False)

    async def _recover(self, generation: int, lost: str, *, reader: bool) -> None:
        """Return once connection ``generation`` (which broke: ``lost``) has been replaced.

        Reconnects unless another task already is. A sender first leaves a
        reader that is receiving a moment to see the end itself, and without
        one reads what is left on the old stream: an ``Error`` may still wait
        there before its end, and must not be answered by logging in again
        (after ``replaced``, that would take the name back). Raises what
        ended the player when it cannot be replaced.
        """
        waited = trio.current_time() + READER_GRACE
        while True:
            if self._ended is not None:
                raise _again(self._ended)
            if self._generation != generation:
                return
            if not self._reconnecting and (
                reader or not self._reading or trio.current_time() >= waited
            ):
                break
            with trio.move_on_at(float("inf") if self._reconnecting else waited):
                await self._changed.wait()
        await self._reconnect(lost, drain=not reader and not self._reading)

    async def _reconnect(self, lost: str, *, drain: bool = False) -> None:
        """Log in again on a new connection, or raise :class:`ConnectionLost` (``lost`` says why).

        ``drain``: first read the old stream to its end (nobody else is
        reading it), raising the :class:`ServerError` found there. Also
        raises the one of a login refused for good (``auth``, say). Either
        ends the player.
        """
        if self._closed or self.reconnect_within <= 0 or self._address is None:
            self._end(ConnectionLost(lost))
            raise ConnectionLost(lost)
        self._reconnecting = True
        self._notify()
        noticed = time.perf_counter()
        try:
            try:
                if drain:
                    await _drain(self.stream, self._decoder)
                await trio.aclose_forcefully(self.stream)  # wakes a task still using it
                stream, decoder, welcome = await self._login_again(lost)
                if self._closed:  # closed meanwhile by another task: stay closed
                    await trio.aclose_forcefully(stream)
                    raise ConnectionLost(lost)
            except (ConnectionLost, ServerError) as exc:
                self._end(exc)
                raise
            except Exception as exc:  # a malformed frame, say: the player cannot go on
                self._end(ConnectionLost(f"{lost}; reconnecting: {exc}"))
                raise
            self.stream, self._decoder = stream, decoder
            self._generation += 1
            self.welcome = welcome
            self.entity = welcome.player
            self.resume = welcome.resume
            self.tick = welcome.tick
            self.world.clear()  # the next view enters everything in view again
            self._pings.clear()  # their pongs, if any, went with the old connection
            self.reconnects += 1
            self.reconnect_ms.append((time.perf_counter() - noticed) * 1000.0)
        finally:
            # Also when cancelled half way: the next task to notice tries again.
            self._reconnecting = False
            self._notify()

    async def _login_again(self, lost: str) -> tuple[trio.abc.Stream, FrameDecoder, Welcome]:
        assert self._address is not None
        host, port = self._address
        pause, why = RETRY_FIRST, lost
        with trio.move_on_after(self.reconnect_within):
            while True:
                try:
                    return await _login(
                        host,
                        port,
                        self._name,
                        self._secret,
                        self.resume,
                        self._ssl_context,
                        self._local_address,
                    )
                except ServerError as exc:
                    if exc.code not in RETRY_CODES:
                        raise
                    why = str(exc)
                except (OSError, ConnectionLost, trio.BrokenResourceError) as exc:
                    why = str(exc) or type(exc).__name__
                await trio.sleep(pause)
                pause = min(pause * 2, RETRY_MAX)
        raise ConnectionLost(
            f"{lost}; no reconnect within {self.reconnect_within:g} s (last: {why})"
        )

    def _end(self, reason: ServerError | ConnectionLost) -> None:
        if self._ended is None:
            self._ended = reason
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


def _again(exc: ServerError | ConnectionLost) -> ServerError | ConnectionLost:
    """A fresh copy of what ended a player, to raise in one more task."""
    if isinstance(exc, ServerError):
        return ServerError(Error(code=exc.code, message=exc.message))
    return ConnectionLost(str(exc))


async def _drain(stream: trio.abc.Stream, decoder: FrameDecoder) -> None:
    """Read a broken stream to its end, raising the :class:`ServerError` it ended with.

    What else is there belongs to the lost connection and is dropped; a
    stream that neither ends nor errs within a moment is left as it is.
    """
    with trio.move_on_after(DRAIN_WITHIN):
        while True:
            try:
                await _receive(stream, decoder)
            except ConnectionLost:
                return


async def _receive(stream: trio.abc.Stream, decoder: FrameDecoder) -> Any:
    try:
        message = decode_server(await receive_frame(stream, decoder))
    except EOFError:
        raise ConnectionLost("the server closed the connection") from None
    if isinstance(message, Error) and message.code != "bad_input":
        raise ServerError(message)
    return message


NOT_TLS = (
    "the server answered in something other than TLS: its port does not speak TLS "
    "(connect without TLS, or give the server gateway.tls_cert)"
)
HANDSHAKE_HINTS = {
    "CERTIFICATE_VERIFY_FAILED": "the server's certificate is not trusted here (a certificate "
    "of your own? trust its authority: ssl_context=tls_context(ca=...), meshd bots --tls-ca)",
    # What OpenSSL versions say when the answer to a ClientHello is not a TLS record.
    "WRONG_VERSION_NUMBER": NOT_TLS,
    "RECORD_LAYER_FAILURE": NOT_TLS,
    "PACKET_LENGTH_TOO_LONG": NOT_TLS,
    "UNKNOWN_PROTOCOL": NOT_TLS,
}


async def _open(
    host: str, port: int, ssl_context: ssl.SSLContext | None, local_address: str | None
) -> trio.abc.Stream:
    """A connection to the server (from ``local_address``, if given), with its TLS
    handshake done if ``ssl_context`` is given."""
    stream = await trio.open_tcp_stream(host, port, local_address=local_address)
    if ssl_context is None:
        return stream
    tls = trio.SSLStream(stream, ssl_context, server_hostname=host, https_compatible=False)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(stream)
        cause = exc.__cause__
        hint = HANDSHAKE_HINTS.get(getattr(cause, "reason", None) or "", "")
        if isinstance(cause, ssl.SSLCertVerificationError):
            hint = f"{cause.verify_message}: {HANDSHAKE_HINTS['CERTIFICATE_VERIFY_FAILED']}"
        why = hint or str(cause or "the server closed the connection")
        raise TlsError(f"TLS handshake with {host}:{port} failed: {why}") from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return tls


async def _login(
    host: str,
    port: int,
    name: str,
    secret: str,
    resume: str,
    ssl_context: ssl.SSLContext | None = None,
    local_address: str | None = None,
) -> tuple[trio.abc.Stream, FrameDecoder, Welcome]:
    """A new connection (over TLS with ``ssl_context``), logged in: its stream, decoder and
    ``Welcome``.

    Raises ``OSError`` when no connection is made (:class:`TlsError` when its
    handshake fails), :class:`ServerError` for a refused login and
    :class:`ConnectionLost` (or ``trio.BrokenResourceError``) when the
    connection ends before the ``Welcome``.
    """
    stream = await _open(host, port, ssl_context, local_address)
    try:
        login = Login(version=PROTOCOL_VERSION, name=name, secret=secret, resume=resume)
        await stream.send_all(encode_frame(login))
        decoder = FrameDecoder(SERVER_FRAME_CAP)
        welcome = await _receive(stream, decoder)
        if isinstance(welcome, Error):
            raise ServerError(welcome)
        if not isinstance(welcome, Welcome):
            raise ConnectionLost(f"expected a welcome, got {type(welcome).__name__}")
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream, decoder, welcome


async def connect(
    host: str,
    port: int,
    name: str,
    secret: str,
    *,
    tls: bool = False,
    ssl_context: ssl.SSLContext | None = None,
    reconnect_within: float = RECONNECT_WITHIN,
    local_address: str | None = None,
) -> Player:
    """Connect and log in (claiming ``name`` with ``secret`` if it is new).

    ``tls=True``: over TLS, the server's certificate verified against the
    system's authorities and ``host``; ``ssl_context`` (see
    :func:`tls_context`): over TLS with that context (``tls`` need not be
    set). Reconnects use the same. ``reconnect_within``: seconds to try
    again when the connection breaks later (0: never; see the module).
    ``local_address``: the address to connect from (any of the host's own;
    ``127.0.0.2`` is a second loopback address). This
    first login is tried once: ``OSError`` when no connection is made
    (:class:`TlsError` when the TLS handshake fails), :class:`ServerError`
    when the server refuses it, :class:`ConnectionLost` when it closes first.
    """
    if ssl_context is None and tls:
        ssl_context = tls_context()
    stream, decoder, welcome = await _login(
        host, port, name, secret, "", ssl_context, local_address
    )
    return Player(
        stream,
        welcome,
        decoder,
        address=(host, port),
        name=name,
        secret=secret,
        reconnect_within=reconnect_within,
        ssl_context=ssl_context,
        local_address=local_address,
    )
