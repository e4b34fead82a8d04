"""Wire codec: length-prefixed CBOR frames carrying attrs messages (sans-io).

A frame is a 4-byte big-endian body length followed by a CBOR body. A
message body is a CBOR map with a ``"type"`` key naming the message class
and the class's fields as the other keys.

Everything that can go wrong with received bytes raises :class:`WireError`
and nothing else, so a shell can close the one offending connection.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Iterable, Iterator
from typing import Any, NewType

import cattrs
import cbor2

Bulk = NewType("Bulk", list)
"""A list of per-entity items (records, events) that cattrs passes through untouched."""

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 1 << 20
"""Frame cap for untrusted peers."""

MAX_DEPTH = 32
MAX_VALUE_DEPTH = 16
"""Nesting allowed inside one plugin value, leaving room for the message around it."""
WIRE_INT_RANGE = range(-(1 << 64), 1 << 64)
"""Integers CBOR carries without a bignum tag (which the strict decoder refuses)."""


class WireError(Exception):
    """Received bytes are not a valid frame or message."""


def make_converter() -> cattrs.Converter:
    """The project's cattrs converter: strict about keys, pass-through for bulk lists."""
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_unstructure_hook(Bulk, lambda value: value)

    def structure_bulk(value: Any, _type: Any) -> list[Any]:
        if not isinstance(value, list):
            raise TypeError(f"expected a list, got {type(value).__name__}")
        return value

    converter.register_structure_hook(Bulk, structure_bulk)

    # cattrs would coerce (str(3) == "3", int("7") == 7); received data must
    # already have the declared type.
    def exact(kind: type, accepted: tuple[type, ...]) -> None:
        def structure(value: Any, _type: Any) -> Any:
            if not isinstance(value, accepted) or (kind is not bool and isinstance(value, bool)):
                raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
            return kind(value)

        converter.register_structure_hook(kind, structure)

    exact(str, (str,))
    exact(int, (int,))
    exact(float, (float, int))
    exact(bool, (bool,))
    return converter


CONVERTER = make_converter()


def check_wire_value(value: Any, depth: int = 0) -> None:
    """Raise ``ValueError`` unless ``value`` crosses a process boundary unchanged.

    Plugin data (entity state, event data) may hold ``None``, booleans,
    64-bit integers, finite floats, strings, bytes, lists, tuples (they
    arrive as lists) and dicts with string keys, nested at most
    ``MAX_VALUE_DEPTH`` deep. Checked where the plugin produced the value, so
    a bad value fails that one entity's tick instead of a whole worker's
    reply. NaN and infinity are refused: NaN is unequal to itself, so a
    record holding one would look changed on every tick, and an infinite
    velocity is a teleport.
    """
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return
    if kind is float:
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a finite number")
        return
    if kind is int:
        if value not in WIRE_INT_RANGE:
            raise ValueError(f"integer {value} does not fit in 64 bits")
        return
    if depth >= MAX_VALUE_DEPTH:
        raise ValueError(f"value nested deeper than {MAX_VALUE_DEPTH} levels")
    if kind is list or kind is tuple:
        for item in value:
            check_wire_value(item, depth + 1)
    elif kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise ValueError(f"dict key {key!r} is not a string")
            check_wire_value(item, depth + 1)
    elif kind is not bytes:
        raise ValueError(
            f"a {kind.__name__} value cannot travel between processes "
            "(use None, bool, int, float, str, bytes, list, tuple or dict with str keys)"
        )


def frame(body: bytes) -> bytes:
    """Prefix a body with its length."""
    return HEADER.pack(len(body)) + body


def _reject_tag(*_args: Any) -> Any:
    raise WireError("CBOR tags are not accepted")


# cbor2 decodes its built-in tags (dates, shared references, regexes, ...)
# without asking tag_hook; overriding them as semantic decoders rejects them too.
_REJECT_BUILTIN_TAGS = {tag: _reject_tag for tag in (*range(1100), 43000, 55799)}


def _string_keys_only(mapping: dict[Any, Any], _immutable: bool) -> dict[Any, Any]:
    # cbor2 6.x calls object_hook as (mapping, immutable), unlike its docstring.
    for key in mapping:
        if not isinstance(key, str):
            raise WireError(f"map keys must be text strings, got {type(key).__name__}")
    return mapping


def decode_cbor(body: bytes) -> Any:
    """Decode exactly one CBOR item, strictly.

    Rejects tags, trailing bytes, duplicate and non-string map keys, indefinite
    lengths and nesting deeper than ``MAX_DEPTH``.
    """
    stream = io.BytesIO(body)
    try:
        decoder = cbor2.CBORDecoder(
            stream,
            tag_hook=_reject_tag,
            semantic_decoders=_REJECT_BUILTIN_TAGS,
            object_hook=_string_keys_only,
            max_depth=MAX_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        )
        value = decoder.decode()
    except WireError:
        raise
    except Exception as exc:  # cbor2 raises several types, some from Rust
        cause = exc.__cause__ or exc.__context__
        reason = cause if isinstance(cause, WireError) else exc
        raise WireError(f"malformed CBOR: {reason}") from None
    if stream.tell() != len(body):
        raise WireError(f"{len(body) - stream.tell()} trailing bytes after the CBOR item")
    return value


def compact_args(args: dict[str, Any]) -> bytes:
    """A player input's checked arguments as CBOR: the form the core queues, logs and stores
    them in until a worker runs the input (a map of Python objects takes several times the
    memory). :func:`input_args` gives them back."""
    return cbor2.dumps(args)


def input_args(data: Any) -> Any:
    """A player input's arguments as its handler gets them: from :func:`compact_args`'s bytes
    (strictly decoded), or as they are (a map: the core's own inputs, and worlds stored
    before inputs were compact)."""
    return decode_cbor(data) if type(data) is bytes else data


def encode_message(message: Any) -> bytes:
    """Encode an attrs message as a frame body."""
    body = CONVERTER.unstructure(message)
    body["type"] = type(message).__name__
    return cbor2.dumps(body)


def decode_message(body: bytes, accepted: Iterable[type]) -> Any:
    """Decode a frame body into one of the ``accepted`` message classes."""
    return structure_message(decode_cbor(body), accepted)


def structure_message(data: Any, accepted: Iterable[type]) -> Any:
    """A decoded frame body as one of the ``accepted`` message classes (``WireError`` if not)."""
    if not isinstance(data, dict):
        raise WireError("a message must be a CBOR map")
    name = data.pop("type", None)
    by_name = {cls.__name__: cls for cls in accepted}
    cls = by_name.get(name) if isinstance(name, str) else None
    if cls is None:
        raise WireError(f"unexpected message type {name!r}")
    try:
        return CONVERTER.structure(data, cls)
    except Exception as exc:
        details = "; ".join(cattrs.transform_error(exc, path=name))
        raise WireError(f"invalid {name} message: {details}") from None


class FrameDecoder:
    """Splits a byte stream into frame bodies.

    Feed received bytes with :meth:`feed`, then iterate :meth:`frames`.
    A declared length above ``max_frame`` raises :class:`WireError` at once,
    before the body arrives.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def frames(self) -> Iterator[bytes]:
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if length > self.max_frame:
                raise WireError(f"frame of {length} bytes exceeds the {self.max_frame}-byte cap")
            end = HEADER.size + length
            if len(self._buffer) < end:
                return
            body = bytes(self._buffer[HEADER.size : end])
            del self._buffer[:end]
            yield body

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buffer)
