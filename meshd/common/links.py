"""Reading whole frames from a socket: the one loop every link uses (trio and blocking).

Every link (core and workers, gateway and players, the admin socket and its
clients) carries length-prefixed frames (:mod:`meshd.common.wire`). These
functions own the reading; each caller decides what a closed link or a bad
frame means to it.

trio is imported inside :func:`receive_frame`, not here: a worker process
reads with blocking sockets and should not pay for loading trio at start.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from meshd.common.wire import FrameDecoder

if TYPE_CHECKING:
    import trio


async def receive_frame(
    stream: trio.abc.ReceiveStream, decoder: FrameDecoder, chunk: int = 1 << 16
) -> bytes:
    """The next whole frame body from ``stream`` (frames already received come first).

    Raises ``EOFError`` when the peer closes or resets the link, and
    :class:`~meshd.common.wire.WireError` for a frame longer than the
    decoder's cap (before its body is read).
    """
    import trio

    while True:
        body = next(decoder.frames(), None)
        if body is not None:
            return body
        try:
            data = await stream.receive_some(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise EOFError from None
        if not data:
            raise EOFError
        decoder.feed(data)


def receive_frame_blocking(
    sock: socket.socket, decoder: FrameDecoder, chunk: int = 1 << 16
) -> bytes:
    """:func:`receive_frame` for a blocking socket (its timeout, if any, still applies)."""
    while True:
        body = next(decoder.frames(), None)
        if body is not None:
            return body
        try:
            data = sock.recv(chunk)
        except ConnectionError:
            raise EOFError from None
        if not data:
            raise EOFError
        decoder.feed(data)
