"""The client protocol: messages between players and the gateway (sans-io).

Frames are the same as between core and workers (4-byte big-endian length,
then one CBOR map with a ``"type"`` key), decoded strictly by
:mod:`meshd.common.wire`. ``docs/protocol.md`` is the reference; this module is its
executable form. Everything wrong with received bytes raises
:class:`ProtocolError` (a :class:`~meshd.common.wire.WireError`) and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import cbor2

from meshd.common.wire import (
    HEADER,
    Bulk,
    WireError,
    decode_cbor,
    decode_message,
    encode_message,
    frame,
    structure_message,
)

PROTOCOL_VERSION = 2
"""2: ``Login.resume`` and ``Welcome.resume`` (reconnecting after a gateway is lost)."""
MAX_LOGIN_FRAME = 2048
"""Bytes the ``Login`` frame may declare..."""
MAX_PLAYING_FRAME = 4096
"""...and any later client frame (an ``Input`` or a ``Ping``): anything larger closes the
connection, refused by its length before its body is read."""
MAX_NAME = 64
"""Characters a ``Login`` name may carry; what a name may be is :mod:`meshd.players.names`'s."""
MAX_SECRET = 128
MAX_RESUME = 128
MAX_INPUT = 1024
"""Body bytes of one ``Input``: a command, not a payload."""
MAX_ARGS_DEPTH = 8
"""Nesting allowed in ``Input.args``, far inside what a worker decodes."""


class ProtocolError(WireError):
    """A client sent something the protocol does not allow."""


class Refused(Exception):
    """A login the server refuses: the client gets ``Error(code, message)``, then the close."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InputRefused(ProtocolError):
    """A well-formed ``Input`` whose arguments the server refuses.

    The client gets ``Error{code: "bad_input"}`` and the connection stays.
    """

    def __init__(self, seq: int, action: str, reason: str) -> None:
        super().__init__(f"input {seq} ({action}): {reason}")
        self.seq = seq
        self.action = action


# -- client -> server ----------------------------------------------------


@attrs.define
class Login:
    """First frame of a connection: who the player is."""

    version: int
    name: str
    secret: str
    resume: str = ""
    """The token of this name's last ``Welcome``: a reconnect that skips hashing the secret."""


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
    view_every: int
    resume: str = ""
    """Send it in the next ``Login`` with this name to come back without the secret's cost."""


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


@attrs.define
class Message:
    """From the game's rules to this player (``Context.tell``, ``Context.announce``).

    ``sender``: the entity whose rules sent it; ``data``: plain values, as
    the plugin made them. Sent after the ``View`` of ``tick``.
    """

    tick: int
    sender: int
    data: Any


@attrs.define
class WorldState:
    """The plugins' world-wide state (``Plugin.world``) as of ``tick``: sent right after
    ``Welcome`` and after the ``View`` of every tick that changed it.

    ``state``: per plugin, its fields and their values.
    """

    tick: int
    state: Any


SERVER_MESSAGES = (Welcome, View, Pong, Error, Message, WorldState)


_INPUT_KEYS = ({"type", "seq", "action", "args"}, {"type", "seq", "action"})


def check_args(value: Any, path: str = "", depth: int = 0) -> None:
    """Raise ``ValueError`` naming the argument unless ``value`` may go to a worker.

    Arguments hold ``None``, booleans, integers, finite floats, strings,
    bytes, lists and maps, nested at most ``MAX_ARGS_DEPTH`` deep (the
    decoder already refused tags, non-string keys and integers beyond 64
    bits). Whatever passes decodes in a worker's ``Step`` (a test holds it).
    """
    kind = type(value)
    if kind is float:
        if not math.isfinite(value):
            raise ValueError(f"argument {path} is {value}: numbers must be finite")
    elif kind is dict or kind is list:
        if depth >= MAX_ARGS_DEPTH:
            raise ValueError(f"argument {path} nests deeper than {MAX_ARGS_DEPTH} levels")
        items = value.items() if kind is dict else enumerate(value)
        for key, item in items:
            check_args(item, f"{path}.{key}" if kind is dict else f"{path}[{key}]", depth + 1)


def _checked_input(body: bytes, message: Input) -> Input:
    if len(body) > MAX_INPUT:
        raise InputRefused(
            message.seq, message.action, f"{len(body)} bytes; an input is at most {MAX_INPUT}"
        )
    try:
        for name, value in message.args.items():
            check_args(value, name, 1)
    except ValueError as exc:
        raise InputRefused(message.seq, message.action, str(exc)) from None
    return message


def decode_client(body: bytes) -> Login | Input | Ping:
    """Decode one client frame body.

    Raises :class:`InputRefused` for a well-formed ``Input`` with arguments
    the server does not take, :class:`ProtocolError` for anything else wrong.
    """
    try:
        data = decode_cbor(body)
        # Every player sends ten inputs a second: a well-formed one is checked
        # here by hand, skipping the generic structuring (~40% of the decode);
        # anything unusual takes the generic path and its detailed errors.
        message = None
        if type(data) is dict and data.get("type") == "Input" and data.keys() in _INPUT_KEYS:
            seq, action, args = data["seq"], data["action"], data.get("args", {})
            if type(seq) is int and type(action) is str and type(args) is dict:
                message = Input(seq, action, args)
        if message is None:
            message = structure_message(data, CLIENT_MESSAGES)
    except WireError as exc:
        raise ProtocolError(str(exc)) from None
    if isinstance(message, Input):
        return _checked_input(body, message)
    if isinstance(message, Login):
        if not 1 <= len(message.name) <= MAX_NAME:
            raise ProtocolError(f"name must be 1-{MAX_NAME} characters")
        if not 1 <= len(message.secret) <= MAX_SECRET:
            raise ProtocolError(f"secret must be 1-{MAX_SECRET} characters")
        if len(message.resume) > MAX_RESUME:
            raise ProtocolError(f"resume must be at most {MAX_RESUME} characters")
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


def _head(major: int, value: int) -> bytes:
    """The CBOR head of ``major`` (0: an unsigned integer, 4: an array of ``value`` items)."""
    if value < 24:
        return _SMALL_HEADS[major][value]
    if value < 0x100:
        return bytes((major + 24, value))
    if value < 0x10000:
        return bytes((major + 25,)) + value.to_bytes(2, "big")
    if value < 0x100000000:
        return bytes((major + 26,)) + value.to_bytes(4, "big")
    return bytes((major + 27,)) + value.to_bytes(8, "big")


_UNSIGNED, _ARRAY = 0x00, 0x80
_SMALL_HEADS = {major: [bytes((major + n,)) for n in range(24)] for major in (_UNSIGNED, _ARRAY)}
_VIEW_KEYS = {name: cbor2.dumps(name) for name in ("tick", "ack", "enter", "update", "leave")}
_VIEW_TYPE = cbor2.dumps("type") + cbor2.dumps("View")
_ENTER_KEY, _UPDATE_KEY, _LEAVE_KEY = (_VIEW_KEYS[key] for key in ("enter", "update", "leave"))
_NO_ENTER = _ENTER_KEY + _SMALL_HEADS[_ARRAY][0] + _UPDATE_KEY
_NO_LEAVE = _LEAVE_KEY + _SMALL_HEADS[_ARRAY][0] + _VIEW_TYPE


def encode_view(
    tick: int, ack: int, enter: Sequence[bytes], update: Sequence[bytes], leave: list[int]
) -> bytes:
    """The body of ``View(tick, ack, enter, update, leave)`` from pre-encoded entity items.

    Each entity changed this tick is encoded once (``cbor2.dumps(item)``)
    and its bytes spliced into every view that shows it: byte for byte what
    :func:`~meshd.common.wire.encode_message` gives for the same view, at a fraction of the cost.
    """
    framed = view_frame(view_head(tick), ack, enter, len(update), b"".join(update), leave)
    return framed[HEADER.size :]


def view_head(tick: int) -> bytes:
    """The bytes every ``View`` of ``tick`` starts with (the same for every player)."""
    return b"".join((b"\xa6", _VIEW_KEYS["tick"], cbor2.dumps(tick), _VIEW_KEYS["ack"]))


def view_frame(
    head: bytes,
    ack: int,
    enter: Sequence[bytes | memoryview],
    updates: int,
    update: bytes | memoryview,
    leave: list[int],
) -> bytes:
    """A whole ``View`` frame (length prefix included) from its :func:`view_head` and items.

    ``update`` holds ``updates`` items, already concatenated (a gateway cuts
    them from one table of the tick's moved entities). Called for every
    player every tick: a view where nothing entered or left is joined in one go.
    """
    ack_head, update_head = _head(_UNSIGNED, ack), _head(_ARRAY, updates)
    if not enter and not leave:
        size = len(head) + len(ack_head) + len(_NO_ENTER) + len(update_head) + len(update)
        return b"".join(
            (
                HEADER.pack(size + len(_NO_LEAVE)),
                head,
                ack_head,
                _NO_ENTER,
                update_head,
                update,
                _NO_LEAVE,
            )
        )
    parts = [
        head,
        ack_head,
        _ENTER_KEY,
        _head(_ARRAY, len(enter)),
        *enter,
        _UPDATE_KEY,
        update_head,
        update,
        _LEAVE_KEY,
        cbor2.dumps(leave) if leave else _SMALL_HEADS[_ARRAY][0],
        _VIEW_TYPE,
    ]
    parts.insert(0, HEADER.pack(sum(map(len, parts))))
    return b"".join(parts)
