"""The client protocol: messages between players and the gateway (sans-io).

Frames are the same as between core and workers (4-byte big-endian length,
then one CBOR map with a ``"type"`` key), decoded strictly by
:mod:`meshd._wire`. ``docs/protocol.md`` is the reference; this module is its
executable form. Everything wrong with received bytes raises
:class:`ProtocolError` (a :class:`~meshd._wire.WireError`) and nothing else.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import attrs
import cbor2

from meshd._messages import Bulk
from meshd._wire import (
    WireError,
    decode_cbor,
    decode_message,
    encode_message,
    frame,
    structure_message,
)

PROTOCOL_VERSION = 1
MAX_CLIENT_FRAME = 16 * 1024
"""Bytes a client frame may declare; anything larger closes the connection."""
MAX_NAME = 32
MAX_SECRET = 128


class ProtocolError(WireError):
    """A client sent something the protocol does not allow."""


# -- client -> server ----------------------------------------------------


@attrs.define
class Login:
    """First frame of a connection: who the player is."""

    version: int
    name: str
    secret: str


@attrs.define
class Input:
    """A command for the player's entity, applied on the next tick."""

    seq: int
    action: str
    args: dict[str, Any] = attrs.field(factory=dict)


@attrs.define
class Ping:
    id: int


CLIENT_MESSAGES = (Login, Input, Ping)


# -- server -> client ----------------------------------------------------


@attrs.define
class Welcome:
    version: int
    player: int
    """The player's entity id."""
    tick: int
    rate: float
    world_size: float
    view_radius: float


@attrs.define
class View:
    """What changed in the player's view at ``tick``.

    ``enter``: ``[id, kind, x, y, z, state]`` with ``state`` a map of field
    names; ``update``: the same for entities already in view whose state
    changed, or ``[id, x, y, z]`` for those that only moved; ``leave``: ids
    that left the view. ``ack`` is the last input ``seq``
    applied by this tick.
    """

    tick: int
    ack: int
    enter: Bulk = attrs.field(factory=list)
    update: Bulk = attrs.field(factory=list)
    leave: Bulk = attrs.field(factory=list)


@attrs.define
class Pong:
    id: int
    tick: int


@attrs.define
class Error:
    """Sent once before the server closes the connection (or for a refused input)."""

    code: str
    message: str


SERVER_MESSAGES = (Welcome, View, Pong, Error)


_INPUT_KEYS = ({"type", "seq", "action", "args"}, {"type", "seq", "action"})


def decode_client(body: bytes) -> Login | Input | Ping:
    """Decode one client frame body; raises :class:`ProtocolError` on anything else."""
    try:
        data = decode_cbor(body)
        # Every player sends ten inputs a second: a well-formed one is checked
        # here by hand, skipping the generic structuring (~40% of the decode);
        # anything unusual takes the generic path and its detailed errors.
        if type(data) is dict and data.get("type") == "Input" and data.keys() in _INPUT_KEYS:
            seq, action, args = data["seq"], data["action"], data.get("args", {})
            if type(seq) is int and type(action) is str and type(args) is dict:
                return Input(seq, action, args)
        message = structure_message(data, CLIENT_MESSAGES)
    except WireError as exc:
        raise ProtocolError(str(exc)) from None
    if isinstance(message, Login):
        if not 1 <= len(message.name) <= MAX_NAME or not message.name.isprintable():
            raise ProtocolError(f"name must be 1-{MAX_NAME} printable characters")
        if not 1 <= len(message.secret) <= MAX_SECRET:
            raise ProtocolError(f"secret must be 1-{MAX_SECRET} characters")
    return message


def decode_server(body: bytes) -> Welcome | View | Pong | Error:
    """Decode one server frame body (the client library's side)."""
    try:
        return decode_message(body, SERVER_MESSAGES)
    except WireError as exc:
        raise ProtocolError(str(exc)) from None


def encode_frame(message: Any) -> bytes:
    """One message as a frame, ready to send."""
    return frame(encode_message(message))


def _array_header(length: int) -> bytes:
    """The CBOR head of an array of ``length`` items (major type 4)."""
    if length < 24:
        return bytes((0x80 + length,))
    if length < 0x100:
        return bytes((0x98, length))
    if length < 0x10000:
        return b"\x99" + struct.pack(">H", length)
    return b"\x9a" + struct.pack(">I", length)


_VIEW_KEYS = {name: cbor2.dumps(name) for name in ("tick", "ack", "enter", "update", "leave")}
_VIEW_TYPE = cbor2.dumps("type") + cbor2.dumps("View")


def encode_view(
    tick: int, ack: int, enter: Sequence[bytes], update: Sequence[bytes], leave: list[int]
) -> bytes:
    """The body of ``View(tick, ack, enter, update, leave)`` from pre-encoded entity items.

    Each entity changed this tick is encoded once (``cbor2.dumps(item)``)
    and its bytes spliced into every view that shows it: byte for byte what
    :func:`~meshd._wire.encode_message` gives for the same view, at a fraction of the cost.
    """
    keys = _VIEW_KEYS
    return b"".join(
        (
            b"\xa6",
            keys["tick"],
            cbor2.dumps(tick),
            keys["ack"],
            cbor2.dumps(ack),
            keys["enter"],
            _array_header(len(enter)),
            *enter,
            keys["update"],
            _array_header(len(update)),
            *update,
            keys["leave"],
            cbor2.dumps(leave),
            _VIEW_TYPE,
        )
    )
