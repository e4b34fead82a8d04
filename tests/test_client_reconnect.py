"""Clients coming back after their gateway process died, against a fake gateway in the test.

The fake speaks protocol version 2 with raw CBOR: it welcomes a login with a
resume token, sends a view every tick (20 ms) and can drop a connection
abruptly (a reset, no ``Error``) or end it with an ``Error``. Its views use
every encoding a gateway may send: positions in half, single and double
floats, entity ids and ticks in wider integers than they need, negative
integers and simple values in the state.
"""

from __future__ import annotations

import contextlib
import math
import socket
import struct
from collections.abc import Callable
from functools import partial
from typing import Any

import attrs
import cbor2
import pytest
import trio

from meshd import client
from meshd.common.links import receive_frame
from meshd.common.wire import FrameDecoder, frame
from meshd.ops import loadgen
from meshd.ops.bots import run_bots

TICK = 0.02
HOME = (100.5, 250.25)
"""Where every player stands: exact in a half float."""
STRANGER = 999
"""An entity only the first connection of a name ever shows."""


def _uint(value: int, width: int = 0) -> bytes:
    """``value`` as a CBOR unsigned integer with a ``width``-byte argument (0: the shortest)."""
    if not width:
        return cbor2.dumps(value)
    return bytes(({1: 0x18, 2: 0x19, 4: 0x1A, 8: 0x1B}[width],)) + value.to_bytes(width, "big")


def _float(value: float, width: int) -> bytes:
    """``value`` as a CBOR float of ``width`` bytes (half, single or double), exactly."""
    head, layout = {2: (0xF9, ">e"), 4: (0xFA, ">f"), 8: (0xFB, ">d")}[width]
    packed = struct.pack(layout, value)
    assert struct.unpack(layout, packed)[0] == value
    return bytes((head,)) + packed


STATE = {
    "vx": 0.0,
    "vy": 0.0,
    "away": False,
    "note": None,
    "hp": -5,
    "mana": -300,
    "debt": -(2**40),
}
STATE_BODY = b"".join(
    (
        b"\xa7",
        cbor2.dumps("vx") + _float(0.0, 2),
        cbor2.dumps("vy") + _float(0.0, 4),
        cbor2.dumps("away") + b"\xf4",
        cbor2.dumps("note") + b"\xf6",
        cbor2.dumps("hp") + b"\x38\x04",  # negative integers, in 1, 2 and 8 bytes
        cbor2.dumps("mana") + b"\x39\x01\x2b",
        cbor2.dumps("debt") + b"\x3b" + (2**40 - 1).to_bytes(8, "big"),
    )
)


def _widths(tick: int) -> tuple[int, int]:
    """How tick ``tick``'s view encodes ids and positions: every width in turn."""
    return (0, 2, 4, 8)[tick % 4], (2, 4, 8)[tick % 3]


def _entity(entity: int, x: float, y: float, tick: int) -> bytes:
    wide, size = _widths(tick)
    position = _float(x, size) + _float(y, size) + _float(0.0, 2)
    return b"\x86" + _uint(entity, wide) + cbor2.dumps("patron") + position + STATE_BODY


def _move(entity: int, x: float, y: float, tick: int) -> bytes:
    wide, size = _widths(tick)
    return b"\x84" + _uint(entity, wide) + _float(x, size) + _float(y, size) + _float(0.0, 8)


def _array(items: list[bytes]) -> bytes:
    assert len(items) < 24
    return bytes((0x80 + len(items),)) + b"".join(items)


def view_body(tick: int, enter: list[bytes], update: list[bytes]) -> bytes:
    """A ``View`` as a gateway may encode it (tick in 8 bytes, ack in 2)."""
    return b"".join(
        (
            b"\xa6",
            cbor2.dumps("tick"),
            _uint(tick, 8),
            cbor2.dumps("ack"),
            b"\x19\x00\x00",
            cbor2.dumps("enter"),
            _array(enter),
            cbor2.dumps("update"),
            _array(update),
            cbor2.dumps("leave"),
            b"\x80",
            cbor2.dumps("type"),
            cbor2.dumps("View"),
        )
    )


def welcome_body(player: int, tick: int, resume: str) -> bytes:
    """A version 2 ``Welcome`` (player id in 4 bytes, world size a single float)."""
    pairs = [
        ("version", cbor2.dumps(2)),
        ("player", _uint(player, 4)),
        ("tick", _uint(tick, 8)),
        ("rate", cbor2.dumps(1 / TICK)),
        ("world_size", _float(1000.0, 4)),
        ("view_radius", b"\xf9\x4f\x80"),  # 30.0 as a half float
        ("view_every", cbor2.dumps(1)),
        ("resume", cbor2.dumps(resume)),
        ("type", cbor2.dumps("Welcome")),
    ]
    return bytes((0xA0 + len(pairs),)) + b"".join(cbor2.dumps(k) + v for k, v in pairs)


def entity_of(name: str, number: int) -> int:
    """The entity the fake gives a name at its ``number``-th connection (if it gives a new one)."""
    return sum(name.encode()) + 5000 * (number - 1)


@attrs.define
class Session:
    name: str
    number: int
    """1 for a name's first connection, 2 for its second, ..."""
    login: dict[str, Any]
    inputs: list[dict[str, Any]] = attrs.field(factory=list)
    views: int = 0


@attrs.define
class FakeGateway:
    """A gateway that plays by protocol version 2, on 127.0.0.1.

    ``drop(session)`` decides after each frame it reads and each view it
    sends whether to end that connection: ``"reset"`` (no ``Error``),
    ``"replaced"`` (an ``Error`` frame, then a clean close), or ``None``.
    ``new_entity`` names the players that come back to another entity.
    """

    drop: Callable[[Session], str | None] = lambda _session: None
    new_entity: frozenset[str] = frozenset()
    port: int = 0
    tick: int = 1000
    sessions: list[Session] = attrs.field(factory=list)
    entities: dict[str, int] = attrs.field(factory=dict)
    tokens: dict[str, str] = attrs.field(factory=dict)
    listening: trio.CancelScope | None = None
    _ticked: trio.Event = attrs.field(factory=trio.Event)

    def logins(self, name: str) -> list[dict[str, Any]]:
        return [s.login for s in self.sessions if s.name == name]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:  # the ticker and the connections
            nursery.start_soon(self._ticker)
            async with trio.open_nursery() as listening:
                self.listening = listening.cancel_scope  # cancelled: the listeners close
                serve = partial(trio.serve_listeners, handler_nursery=nursery)
                await listening.start(serve, self._serve, listeners)
                task_status.started()

    async def _ticker(self) -> None:
        while True:
            await trio.sleep(TICK)
            self.tick += 1
            self._ticked.set()
            self._ticked = trio.Event()

    async def _serve(self, stream: trio.SocketStream) -> None:
        decoder = FrameDecoder()
        try:
            login = cbor2.loads(await receive_frame(stream, decoder))
        except EOFError:
            return
        name = login["name"]
        number = len(self.logins(name)) + 1
        session = Session(name, number, login)
        self.sessions.append(session)
        assert login["type"] == "Login" and login["version"] == 2
        if name not in self.entities or name in self.new_entity:
            self.entities[name] = entity_of(name, number)
        self.tokens[name] = f"{name}-tok-{number}"
        sending = trio.Lock()
        first_tick = self.tick + (3 if number > 1 else 0)  # a gap across every reconnect
        async with sending:
            await stream.send_all(
                frame(welcome_body(self.entities[name], self.tick, self.tokens[name]))
            )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                self._views, stream, session, sending, first_tick, nursery.cancel_scope
            )
            try:
                while True:
                    message = cbor2.loads(await receive_frame(stream, decoder))
                    if message["type"] == "Input":
                        session.inputs.append(message)
                    elif message["type"] == "Ping":
                        pong = {"type": "Pong", "id": message["id"], "tick": self.tick}
                        async with sending:
                            await stream.send_all(frame(cbor2.dumps(pong)))
                    if await self._maybe_drop(stream, session, sending):
                        break
            except (EOFError, trio.ClosedResourceError, trio.BrokenResourceError):
                pass
            nursery.cancel_scope.cancel()
        await trio.aclose_forcefully(stream)

    async def _views(
        self,
        stream: trio.SocketStream,
        session: Session,
        sending: trio.Lock,
        tick: int,
        done: trio.CancelScope,
    ) -> None:
        me = self.entities[session.name]
        try:
            while True:
                while self.tick < tick:
                    await self._ticked.wait()
                if session.views == 0:
                    enter = [_entity(me, *HOME, tick)]
                    if session.number == 1:
                        enter.append(_entity(STRANGER, 1.0, 2.0, tick))
                    body = view_body(tick, enter, [])
                else:
                    body = view_body(tick, [], [_move(me, *HOME, tick)])
                async with sending:
                    await stream.send_all(frame(body))
                session.views += 1
                tick += 1
                if await self._maybe_drop(stream, session, sending):
                    done.cancel()
                    return
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            done.cancel()

    async def _maybe_drop(
        self, stream: trio.SocketStream, session: Session, sending: trio.Lock
    ) -> bool:
        how = self.drop(session)
        if how == "reset":  # as when the gateway process is killed
            linger = struct.pack("ii", 1, 0)
            # (The reader may have closed it already, when the bot's side ended first.)
            with contextlib.suppress(OSError):
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            await trio.aclose_forcefully(stream)
            return True
        if how == "replaced":
            error = {"type": "Error", "code": "replaced", "message": "logged in elsewhere"}
            async with sending:
                await stream.send_all(frame(cbor2.dumps(error)))
            await trio.aclose_forcefully(stream)
            return True
        return False


def once(
    how: str, names: set[str], *, views: int = 0, inputs: int = 0
) -> Callable[[Session], str | None]:
    """Drop the first connection of ``names`` once it sent ``views`` views and read ``inputs``."""

    def drop(session: Session) -> str | None:
        due = session.views >= views and len(session.inputs) >= inputs
        return how if session.name in names and session.number == 1 and due else None

    return drop


# -- the Python client ------------------------------------------------------


async def test_a_reset_connection_comes_back_with_the_resume_token(nursery) -> None:
    gateway = FakeGateway(drop=once("reset", {"ada"}, views=3))
    await nursery.start(gateway.run)
    seen: list[tuple[int, int, bool]] = []
    with trio.fail_after(10):
        async with await client.connect("127.0.0.1", gateway.port, "ada", "s3cret") as player:
            assert (player.entity, player.resume) == (entity_of("ada", 1), "ada-tok-1")
            async for view in player.views():
                seen.append((view.tick, player.reconnects, STRANGER in player.world))
                me = player.world[player.entity]
                assert (me.x, me.y, me.z) == (*HOME, 0.0)
                assert me.state == STATE
                if player.reconnects and len([s for s in seen if s[1]]) >= 3:
                    break
    first, again = gateway.logins("ada")
    assert first == {"type": "Login", "version": 2, "name": "ada", "secret": "s3cret", "resume": ""}
    assert again == {**first, "resume": "ada-tok-1"}
    assert (player.reconnects, player.resume) == (1, "ada-tok-2")
    assert player.entity == entity_of("ada", 1)  # the same entity again
    assert len(player.reconnect_ms) == 1 and 0 < player.reconnect_ms[0] < 5000
    assert player.welcome.resume == "ada-tok-2"
    before = [s for s in seen if not s[1]]
    after = [s for s in seen if s[1]]
    assert [s[2] for s in before] == [True] * 3  # the stranger was in view...
    assert [s[2] for s in after] == [False] * 3  # ...and went with the old connection
    ticks = [s[0] for s in seen]
    assert ticks[1:3] == [ticks[0] + 1, ticks[0] + 2]
    assert after[0][0] >= before[-1][0] + 3 and ticks[4:] == [ticks[3] + 1, ticks[3] + 2]


async def test_an_error_that_ends_the_connection_is_not_answered_by_a_reconnect(nursery) -> None:
    gateway = FakeGateway(drop=once("replaced", {"ada"}, views=2))
    await nursery.start(gateway.run)
    views = 0
    with trio.fail_after(10):
        async with await client.connect("127.0.0.1", gateway.port, "ada", "s3cret") as player:
            with pytest.raises(client.ServerError) as ended:
                async for _view in player.views():
                    views += 1
            with pytest.raises(client.ServerError):  # a send after it fails alike
                await player.send("move", dx=1.0, dy=0.0)
    assert ended.value.code == "replaced" and views == 2
    await trio.sleep(0.3)
    assert len(gateway.logins("ada")) == 1 and player.reconnects == 0


async def test_sends_reconnect_when_nobody_reads_and_go_out_on_the_new_connection(nursery) -> None:
    gateway = FakeGateway(drop=once("reset", {"bob"}, inputs=2))
    await nursery.start(gateway.run)
    with trio.fail_after(10):
        async with await client.connect("127.0.0.1", gateway.port, "bob", "pw") as player:
            sent = []
            while len(gateway.sessions) < 2 or len(gateway.sessions[1].inputs) < 3:
                sent.append(await player.send("move", dx=1.0, dy=float(len(sent))))
                await trio.sleep(0.02)
    first, again = gateway.sessions
    assert again.login["resume"] == "bob-tok-1" and again.login["secret"] == "pw"
    assert player.reconnects == 1 and player.resume == "bob-tok-2"
    assert [i["seq"] for i in first.inputs] == sent[:2]
    # what went out after the loss: on the new connection, in order, nothing twice
    later = [i["seq"] for i in again.inputs]
    assert later == sent[2 : 2 + len(later)]  # the one that found the connection broken first


async def test_sends_during_a_reconnect_wait_for_it(nursery) -> None:
    gateway = FakeGateway(drop=once("reset", {"cy"}, views=2))
    await nursery.start(gateway.run)
    moves: list[int] = []

    async def mover(player: client.Player) -> None:
        while True:
            moves.append(await player.send("move", dx=0.5, dy=0.5))
            await player.ping()
            await trio.sleep(0.005)

    with trio.fail_after(10):
        player = await client.connect("127.0.0.1", gateway.port, "cy", "pw")
        async with player, trio.open_nursery() as inner:
            inner.start_soon(mover, player)
            async for view in player.views():
                if player.reconnects and view.tick >= player.welcome.tick + 8:
                    break
            inner.cancel_scope.cancel()
    assert player.reconnects == 1 and gateway.sessions[1].login["resume"] == "cy-tok-1"
    assert gateway.sessions[1].inputs and player.rtts  # moving and pinging again


async def test_no_reconnect_in_time_is_a_lost_connection(nursery) -> None:
    gateway = FakeGateway()

    def stop_listening_then_reset(session: Session) -> str | None:
        if session.views >= 2:
            assert gateway.listening is not None
            gateway.listening.cancel()  # the whole gateway is gone: nothing to come back to
        return "reset" if session.views >= 4 else None

    gateway.drop = stop_listening_then_reset
    await nursery.start(gateway.run)
    with trio.fail_after(10):
        async with await client.connect(
            "127.0.0.1", gateway.port, "dee", "pw", reconnect_within=0.4
        ) as player:
            started = trio.current_time()
            with pytest.raises(client.ConnectionLost, match=r"no reconnect within 0.4 s"):
                async for _view in player.views():
                    pass
            assert 0.3 < trio.current_time() - started < 3.0
            with pytest.raises(client.ConnectionLost):
                await player.send("move", dx=0.0, dy=0.0)
    assert player.reconnects == 0 and len(gateway.sessions) == 1


async def test_reconnects_can_be_turned_off(nursery) -> None:
    gateway = FakeGateway(drop=once("reset", {"eve"}, views=2))
    await nursery.start(gateway.run)
    with trio.fail_after(10):
        async with await client.connect(
            "127.0.0.1", gateway.port, "eve", "pw", reconnect_within=0
        ) as player:
            with pytest.raises(client.ConnectionLost):
                async for _view in player.views():
                    pass
    await trio.sleep(0.2)
    assert len(gateway.sessions) == 1


# -- the bots, both engines ------------------------------------------------

COUNT = 3
DROPPED = {"bot-0", "bot-2"}
BOT_KEYS = {
    "scenario",
    "count",
    "connected",
    "disconnects",
    "disconnect_reasons",
    "connect_s",
    "duration_s",
    "updates_per_s",
    "updates_per_s_min",
    "tick_gaps",
    "missing_self",
    "rtt_ms",
    "reconnects",
    "reconnected_bots",
    "reconnect_ms",
    "entity_changed",
    "reconnect_gaps",
    "bad_inputs",
}


def bots_gateway() -> FakeGateway:
    """Two of three bots lose their connection once, a moment into the run; bot-2 comes
    back to another entity."""
    return FakeGateway(drop=once("reset", DROPPED, inputs=3), new_entity=frozenset({"bot-2"}))


def check_bots(summary: dict[str, Any], gateway: FakeGateway) -> None:
    assert summary["count"] == summary["connected"] == COUNT
    assert summary["disconnects"] == 0, summary["disconnect_reasons"]
    assert summary["reconnects"] == summary["reconnected_bots"] == len(DROPPED)
    assert summary["entity_changed"] == 1
    assert summary["reconnect_gaps"] == len(DROPPED)  # the gateway skipped ticks across each
    assert summary["tick_gaps"] == 0 and summary["missing_self"] == 0
    assert 0 < summary["reconnect_ms"]["p50"] <= summary["reconnect_ms"]["max"] < 5000
    for name in DROPPED:
        first, again = gateway.logins(name)
        assert (first["resume"], again["resume"]) == ("", f"{name}-tok-1")
        assert again["secret"] == f"{name}-secret" and again["version"] == 2
    assert len(gateway.logins("bot-1")) == 1
    # the rush reads its own position from single floats under 4-byte ids:
    # it walks from HOME straight at the middle of the 1,000 m world (a unit vector)
    far = math.hypot(500.0 - HOME[0], 500.0 - HOME[1])
    towards = ((500.0 - HOME[0]) / far, (500.0 - HOME[1]) / far)

    def heads(move: tuple[float, float]) -> bool:
        return all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(move, towards, strict=True))

    for session in gateway.sessions:
        moves = [(i["args"]["dx"], i["args"]["dy"]) for i in session.inputs]
        assert any(map(heads, moves)), (session.name, session.number, moves)
        if session.name in DROPPED and session.number == 1:  # dropped before half time
            assert all(move == (0.0, 0.0) or heads(move) for move in moves)


async def test_python_bots_count_reconnects_apart_from_disconnects(nursery) -> None:
    gateway = bots_gateway()
    await nursery.start(gateway.run)
    with trio.fail_after(30):
        summary = await run_bots(
            "127.0.0.1", gateway.port, COUNT, 2.0, scenario="rush", per_bot=True
        )
    per_bot = summary.pop("per_bot")
    assert set(summary) == BOT_KEYS
    check_bots(summary, gateway)
    assert [b["bot"] for b in per_bot] == list(range(COUNT))
    assert [b["reconnects"] for b in per_bot] == [1, 0, 1]
    assert [b["entity_changed"] for b in per_bot] == [False, False, True]
    assert [len(b["reconnect_ms"]) for b in per_bot] == [1, 0, 1]
    assert [b["disconnected"] for b in per_bot] == ["", "", ""]
    assert [b["entity"] for b in per_bot] == [entity_of(f"bot-{i}", 1) for i in range(COUNT)]
    assert all(b["views"] > 20 and b["gaps"] == 0 for b in per_bot)


def have_compiler() -> bool:
    try:
        loadgen.executable()
    except loadgen.LoadgenError as exc:
        return "C compiler" not in str(exc)  # a failed build is a failure, not a skip
    return True


async def test_native_bots_reconnect_with_the_resume_token(nursery, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if not await trio.to_thread.run_sync(have_compiler):
        pytest.skip("no C compiler for the native bots")
    gateway = bots_gateway()
    await nursery.start(gateway.run)
    summary = await trio.to_thread.run_sync(
        lambda: loadgen.run_native("127.0.0.1", gateway.port, COUNT, 2.0, "rush", (0.5, 0.5))
    )
    assert summary.pop("engine") == "native"
    assert set(summary) == BOT_KEYS
    check_bots(summary, gateway)


@pytest.mark.parametrize("engine", ["python", "native"])
async def test_bots_that_cannot_come_back_are_disconnects(
    nursery, tmp_path, monkeypatch, engine
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if engine == "native" and not await trio.to_thread.run_sync(have_compiler):
        pytest.skip("no C compiler for the native bots")
    gateway = FakeGateway()

    def stop_listening_then_reset(session: Session) -> str | None:
        if session.name != "bot-1" or len(session.inputs) < 2:
            return None
        assert gateway.listening is not None
        gateway.listening.cancel()  # the whole gateway is gone for new connections
        return "reset" if len(session.inputs) >= 3 else None

    gateway.drop = stop_listening_then_reset
    await nursery.start(gateway.run)
    if engine == "native":
        summary = await trio.to_thread.run_sync(
            lambda: loadgen.run_native(
                "127.0.0.1", gateway.port, 2, 1.5, "wander", (0.5, 0.5), reconnect_within=0.3
            )
        )
    else:
        summary = await run_bots("127.0.0.1", gateway.port, 2, 1.5, reconnect_within=0.3)
    assert summary["connected"] == 2 and summary["disconnects"] == 1
    assert summary["reconnects"] == summary["reconnected_bots"] == 0
    (reason,) = summary["disconnect_reasons"]
    assert "no reconnect within 0.3 s" in reason
    assert math.isclose(summary["duration_s"], 1.5)
