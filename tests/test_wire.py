"""Wire codec: round trips, framing, and one error type for bad bytes."""

from __future__ import annotations

import functools

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.common.wire import (
    FrameDecoder,
    WireError,
    check_wire_value,
    decode_cbor,
    decode_message,
    encode_message,
    frame,
)
from meshd.mesh.messages import Fatal, Hello, Init, Reply, Step, WorldParams
from meshd.players.protocol import View, encode_view

ALL = (Hello, Init, Step, Reply, Fatal)
finite = st.floats(allow_nan=False, allow_infinity=False)
# Wider integers would need CBOR bignum tags, which the codec refuses.
int64 = st.integers(-(2**63), 2**64 - 1)
records = st.lists(
    st.tuples(
        st.integers(1, 2**40),
        st.text(max_size=8),
        finite,
        finite,
        finite,
        st.lists(st.one_of(int64, finite, st.booleans(), st.none(), st.text()), max_size=5),
    ).map(list),
    max_size=20,
)


@given(
    tick=st.integers(0, 2**40),
    epoch=st.integers(0, 100),
    acquire=records,
    ghosts=records,
    remove=st.lists(st.integers(1, 2**40)),
    checkpoint=st.booleans(),
    layout=st.none() | st.dictionaries(st.text(min_size=1), st.integers(0, 64)),
)
def test_step_round_trip(tick, epoch, acquire, ghosts, remove, checkpoint, layout) -> None:
    step = Step(
        tick=tick,
        epoch=epoch,
        layout=layout,
        ghost_remove=remove,
        ghost_upsert=ghosts,
        acquire=[[r, [1, 2]] for r in acquire],
        checkpoint=checkpoint,
    )
    assert decode_message(encode_message(step), ALL) == step


@given(costs=st.dictionaries(st.text(min_size=1), finite), border=records)
def test_reply_round_trip(costs, border) -> None:
    reply = Reply(tick=3, worker=1, epoch=2, border=[[r, []] for r in border], cost_ms=costs)
    assert decode_message(encode_message(reply), ALL) == reply


def test_init_round_trip() -> None:
    init = Init(
        world=WorldParams(400.0, 7, 0.05, 5.0),
        plugins=["tavern"],
        plugin_dirs=["/p"],
        settings={"tavern": {"npcs": 3}},
    )
    assert decode_message(encode_message(init), ALL) == init


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_wire_error(data: bytes) -> None:
    try:
        message = decode_message(data, ALL)
    except WireError:
        return
    assert isinstance(message, ALL)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | finite | st.text() | st.binary(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=20,
    )
)
def test_wellformed_cbor_of_wrong_shape_raises_only_wire_error(value) -> None:
    try:
        message = decode_message(cbor2.dumps(value), ALL)
    except WireError:
        return
    assert isinstance(message, ALL)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (cbor2.dumps(cbor2.CBORTag(1, 5)), "tags"),
        (bytes([0xD8, 0x1C, 0x81, 0xD8, 0x1D, 0x00]), "tags"),  # shared reference
        (cbor2.dumps({1: 2}), "text string"),
        (b"\xa1\x41a\x01", "text string"),
        (b"\xa2aa\x01aa\x02", "Duplicate"),
        (cbor2.dumps({"type": "Fatal", "message": "x"}) + b"\x00", "trailing"),
        (b"\x9f\x01\xff", "indefinite"),
        (b"\x81" * 64 + b"\x00", "depth"),
        (cbor2.dumps({"type": "Nope"}), "unexpected message type"),
        (cbor2.dumps({"type": "Fatal", "message": 3}), "invalid Fatal"),
        (cbor2.dumps({"type": "Fatal", "message": "x", "extra": 1}), "extra fields"),
        (cbor2.dumps([1, 2]), "CBOR map"),
    ],
)
def test_malformed_frames_are_rejected_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(WireError) as caught:
        decode_message(body, ALL)
    assert reason.lower() in str(caught.value).lower()


@given(st.lists(st.binary(max_size=50), max_size=10), st.integers(1, 7))
def test_frame_decoder_reassembles_any_chunking(bodies: list[bytes], chunk: int) -> None:
    stream = b"".join(frame(body) for body in bodies)
    decoder = FrameDecoder()
    out = []
    for start in range(0, len(stream), chunk):
        decoder.feed(stream[start : start + chunk])
        out.extend(decoder.frames())
    assert out == bodies
    assert decoder.pending == 0


def test_frame_cap_is_enforced_before_the_body_arrives() -> None:
    decoder = FrameDecoder(max_frame=100)
    decoder.feed((101).to_bytes(4, "big"))
    with pytest.raises(WireError, match="exceeds"):
        list(decoder.frames())


def test_decode_cbor_accepts_plain_values() -> None:
    assert decode_cbor(cbor2.dumps({"a": [1, 2.5, "x", None, True]})) == {
        "a": [1, 2.5, "x", None, True]
    }


plugin_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=5)
    | st.sampled_from([{1, 2}, frozenset(), 1j, object()]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=3) | st.integers(), inner, max_size=3)
    ),
    max_leaves=12,
)


@given(plugin_values)
def test_plugin_values_that_pass_the_check_cross_the_wire(value) -> None:
    try:
        check_wire_value(value)
    except ValueError:
        return
    decode_cbor(cbor2.dumps(value))  # raises WireError if the check let a bad value through


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (2**64, "64 bits"),
        (-(2**64) - 1, "64 bits"),
        ([1, {"deep": [2**70]}], "64 bits"),
        ({1: "x"}, "not a string"),
        ({"a": {2, 3}}, "set value cannot travel"),
        (functools.reduce(lambda acc, _: [acc], range(20), 0), "nested deeper"),
    ],
)
def test_plugin_values_that_cannot_cross_are_named(value, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        check_wire_value(value)


@given(
    tick=st.integers(0, 2**40),
    ack=st.integers(0, 2**40),
    enter=records,
    update=records,
    leave=st.lists(st.integers(1, 2**40), max_size=300),
)
def test_spliced_views_are_byte_identical_to_encoded_ones(tick, ack, enter, update, leave):
    items = [[*r[:5], {"v": r[5]}] for r in enter], [[*r[:5], {"v": r[5]}] for r in update]
    spliced = encode_view(
        tick, ack, [cbor2.dumps(i) for i in items[0]], [cbor2.dumps(i) for i in items[1]], leave
    )
    assert spliced == encode_message(View(tick, ack, items[0], items[1], leave))
