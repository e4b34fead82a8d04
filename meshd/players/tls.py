"""TLS on the players' port: the server's context and each connection's TLS layer.

The gateway reads and writes its players' raw sockets itself (one ``epoll``
poll a tick, views written straight into the kernel), so TLS cannot be a
stream it hands bytes to. On a TLS port each connection gets a
:class:`TlsLayer` instead, between those raw bytes and the protocol's frames:
ciphertext read from the socket goes in and plaintext comes out
(:meth:`TlsLayer.receive`), a frame goes in and the ciphertext to write comes
out (:meth:`TlsLayer.seal`). The layer is pure (``ssl``'s ``SSLObject``
over memory buffers: no socket, no await); a plain port has no layer and
its path is unchanged.

:func:`handshake` and :class:`TlsReceiver` are the thin trio shell the
login uses, inside the login deadline: the first bytes must be a TLS
handshake record (anything else is a plaintext client, answered in
plaintext by the gateway), the handshake runs in the gateway process, then
the ``Login`` frame is read through the layer.
"""

from __future__ import annotations

import ssl

import trio

from meshd.common.config import ConfigError

HANDSHAKE_RECORD = 0x16
"""The first byte of every TLS connection (a handshake record: the ClientHello)."""
RECORD = 16 << 10
"""The most plaintext one TLS record holds."""
CHUNK = 16 << 10
"""Bytes read from the socket at a time while logging in."""


class NotTls(Exception):
    """The client's first bytes are not a TLS handshake: it speaks plaintext to a TLS port."""


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """The players' port's TLS context: TLS 1.2 or 1.3, ``cert`` (a PEM chain) and ``key``.

    Raises :class:`ConfigError` naming the settings when the files cannot
    be loaded (missing, unreadable, not PEM, a key that does not match).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.num_tickets = 0  # no session resumption: nothing more to send after the handshake
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"gateway.tls_cert / gateway.tls_key: cannot serve TLS with {cert} and {key}: "
            f"{exc.strerror or exc}"
        ) from None
    return context


class TlsLayer:
    """One connection's TLS, server side, without I/O: bytes in, bytes out.

    What the methods return must reach the socket in the order it was
    returned (anything the layer has to say on its own, such as the answer
    to a key update, goes out with the next sealed frame). Failures raise
    ``ssl.SSLError``; the connection is then beyond saving.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.established = False
        """The handshake is done: frames may be sealed."""
        self.closed = False
        """The client ended TLS (``close_notify``): nothing more will come."""
        self.failure = b""
        """The alert to send the client after a failed handshake."""

    def handshake(self, data: bytes) -> bytes:
        """Take handshake bytes from the client; what to send back (``established`` once done)."""
        self._incoming.write(data)
        try:
            self._tls.do_handshake()
            self.established = True
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            self.failure = self._outgoing.read()  # the alert that tells the client why
            raise
        return self._outgoing.read()

    def receive(self, data: bytes) -> bytes:
        """Take ciphertext; every byte of plaintext it completes (records may arrive in pieces)."""
        if data:
            self._incoming.write(data)
        read = self._tls.read
        chunks = []
        while True:
            try:
                chunk = read(RECORD)
            except ssl.SSLWantReadError:
                break
            if not chunk:  # close_notify
                self.closed = True
                break
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def seal(self, data: bytes) -> bytes:
        """The ciphertext of ``data`` (with anything the layer had to send first)."""
        self._tls.write(data)
        return self._outgoing.read()

    def close(self) -> bytes:
        """The ``close_notify`` that ends TLS in good order (nothing if TLS is broken)."""
        try:
            self._tls.unwrap()
        except ssl.SSLWantReadError:
            pass  # the client's close_notify is not awaited
        except (ssl.SSLError, ValueError):
            return b""
        return self._outgoing.read()


async def handshake(stream: trio.SocketStream, layer: TlsLayer) -> None:
    """Run ``layer``'s handshake over ``stream`` (the caller bounds the time it may take).

    Raises :class:`NotTls` when the first bytes are not a TLS handshake,
    ``ssl.SSLError`` when the handshake fails (after sending the client the
    alert), and ``EOFError`` when the client hangs up first.
    """
    first = True
    while not layer.established:
        try:
            data = await stream.receive_some(CHUNK)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise EOFError from None
        if not data:
            raise EOFError
        if first and data[0] != HANDSHAKE_RECORD:
            raise NotTls
        first = False
        try:
            answer = layer.handshake(data)
        except ssl.SSLError:
            if layer.failure:
                with trio.move_on_after(1.0):
                    await stream.send_all(layer.failure)
            raise
        if answer:
            await stream.send_all(answer)


class TlsReceiver(trio.abc.ReceiveStream):
    """The plaintext of a TLS connection as a trio stream, for reading the ``Login``.

    An end of TLS or a broken record reads as the end of the stream.
    """

    def __init__(self, stream: trio.SocketStream, layer: TlsLayer) -> None:
        self.stream = stream
        self.layer = layer

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        # The client's first records may have come with the end of its handshake.
        data = b""
        while not self.layer.closed:
            try:
                plain = self.layer.receive(data)
            except ssl.SSLError:
                break
            if plain:
                return plain
            data = await self.stream.receive_some(max_bytes or CHUNK)
            if not data:
                break
        return b""

    async def aclose(self) -> None:
        await self.stream.aclose()
