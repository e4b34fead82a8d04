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
"""

from __future__ import annotations

import itertools
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
    Ping,
    Pong,
    View,
    Welcome,
    decode_server,
    encode_frame,
)

SERVER_FRAME_CAP = 16 << 20


class ServerError(Exception):
    """The server sent an ``Error``: ``code`` and ``message`` say why."""

    def __init__(self, error: Error) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.code = error.code
        self.message = error.message


class ConnectionLost(Exception):
    """The server closed the connection without an ``Error``."""


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
    """One logged-in connection."""

    def __init__(self, stream: trio.SocketStream, welcome: Welcome, decoder: FrameDecoder) -> None:
        self.stream = stream
        self.welcome = welcome
        self.entity = welcome.player
        self.world: dict[int, Entity] = {}
        self.tick = welcome.tick
        self._decoder = decoder
        self._seq = itertools.count(1)
        self._pings: dict[int, float] = {}
        self.rtts: list[float] = []
        """Round-trip times of answered pings, in milliseconds."""
        self.bad_inputs: list[str] = []
        """The server's messages about inputs it refused or that failed (``bad_input``):
        each was ignored or undone, and the connection stays."""

    async def __aenter__(self) -> Player:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stream.aclose()

    async def send(self, action: str, **args: Any) -> int:
        """Send one input; returns its sequence number (echoed as ``View.ack``)."""
        seq = next(self._seq)
        await self.stream.send_all(encode_frame(Input(seq=seq, action=action, args=args)))
        return seq

    async def ping(self) -> None:
        """Send a ping; its round trip lands in ``rtts`` when the pong arrives."""
        ping_id = next(self._seq)
        self._pings[ping_id] = time.perf_counter()
        await self.stream.send_all(encode_frame(Ping(id=ping_id)))

    async def views(self) -> AsyncIterator[View]:
        """View updates, applied to ``world`` before each is yielded."""
        while True:
            message = await _receive(self.stream, self._decoder)
            if isinstance(message, Error):  # only bad_input comes back: the rest raise
                self.bad_inputs.append(message.message)
                continue
            if isinstance(message, Pong):
                sent = self._pings.pop(message.id, None)
                if sent is not None:
                    self.rtts.append((time.perf_counter() - sent) * 1000.0)
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


async def _receive(stream: trio.SocketStream, decoder: FrameDecoder) -> Any:
    try:
        message = decode_server(await receive_frame(stream, decoder))
    except EOFError:
        raise ConnectionLost("the server closed the connection") from None
    if isinstance(message, Error) and message.code != "bad_input":
        raise ServerError(message)
    return message


async def connect(host: str, port: int, name: str, secret: str) -> Player:
    """Connect and log in (claiming ``name`` with ``secret`` if it is new)."""
    stream = await trio.open_tcp_stream(host, port)
    try:
        await stream.send_all(
            encode_frame(Login(version=PROTOCOL_VERSION, name=name, secret=secret))
        )
        decoder = FrameDecoder(SERVER_FRAME_CAP)
        welcome = await _receive(stream, decoder)
        if isinstance(welcome, Error):
            raise ServerError(welcome)
        if not isinstance(welcome, Welcome):
            raise ConnectionLost(f"expected a welcome, got {type(welcome).__name__}")
    except BaseException:
        await stream.aclose()
        raise
    return Player(stream, welcome, decoder)
