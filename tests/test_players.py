"""Players through the real gateway: identity, persistence, hostile clients, crossing workers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import struct
import textwrap
import threading
import time
from pathlib import Path

import cbor2
import pytest
import trio
from conftest import (
    TAVERN,
    inspect,
    meshd,
    start_daemon,
    terminate,
    wait_for_status,
    write_config,
)
from hypothesis import given
from hypothesis import strategies as st

from meshd import client
from meshd.common.wire import compact_args, decode_message, encode_message, frame
from meshd.mesh.messages import Step
from meshd.mesh.step import group_events
from meshd.players.protocol import (
    CLIENT_MESSAGES,
    MAX_ARGS_DEPTH,
    PROTOCOL_VERSION,
    SERVER_MESSAGES,
    Input,
    Login,
    ProtocolError,
    decode_client,
    encode_frame,
)

PLAYERS = {**TAVERN, "tick": {"persist_every": 5}}


def gateway_of(config: Path) -> tuple[str, int]:
    address = wait_for_status(config, lambda s: s["gateway"]["address"])["gateway"]["address"]
    host, port = address.rsplit(":", 1)
    return host, int(port)


# -- the decoder ------------------------------------------------------------


@given(st.binary(max_size=300))
def test_any_bytes_raise_only_the_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_client(data)


@given(
    st.dictionaries(
        st.text(max_size=8),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
            max_leaves=8,
        ),
        max_size=5,
    )
)
def test_wellformed_maps_of_any_shape_raise_only_the_protocol_error(value) -> None:
    for kind in ("Login", "Input", "Ping", None):
        body = dict(value) if kind is None else {**value, "type": kind}
        with contextlib.suppress(ProtocolError):
            decode_client(cbor2.dumps(body))


@given(
    st.integers(-(2**64), 2**64 - 1),
    st.text(max_size=10),
    st.dictionaries(st.text(max_size=5), st.integers(-9, 9) | st.text(max_size=5), max_size=3),
    st.booleans(),
)
def test_the_input_fast_path_agrees_with_the_generic_decoder(seq, action, args, with_args) -> None:
    fields = {"type": "Input", "seq": seq, "action": action}
    if with_args:
        fields["args"] = args
    body = cbor2.dumps(fields)
    assert decode_client(body) == decode_message(body, CLIENT_MESSAGES)
    for wrong in ({**fields, "seq": True}, {**fields, "args": [1]}, {**fields, "extra": 1}):
        with pytest.raises(ProtocolError):
            decode_client(cbor2.dumps(wrong))


ARG_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=40,
)


@given(st.dictionaries(st.text(max_size=5), ARG_VALUES, max_size=3))
def test_arguments_the_gateway_accepts_always_decode_in_a_worker(args) -> None:
    """Whatever passes the gateway reaches a worker intact, inside a core-to-worker Step."""
    try:
        message = decode_client(
            cbor2.dumps({"type": "Input", "seq": 1, "action": "move", "args": args})
        )
    except ProtocolError:
        return
    step = Step(tick=1, epoch=1, events=[[5, 0, 0, "input:move", compact_args(message.args)]])
    (event,) = group_events(decode_message(encode_message(step), (Step,)).events)[0][5]
    assert event.data == args  # as the handler gets them


def test_the_deepest_arguments_accepted_fit_in_a_step() -> None:
    deepest: list = [1.0]
    for _ in range(MAX_ARGS_DEPTH - 2):
        deepest = [deepest]
    message = decode_client(encode_frame(Input(seq=1, action="a", args={"x": deepest}))[4:])
    step = Step(tick=1, epoch=1, events=[[5, 0, 0, "input:a", compact_args(message.args)]])
    (event,) = group_events(decode_message(encode_message(step), (Step,)).events)[0][5]
    assert event.data == {"x": deepest}
    with pytest.raises(ProtocolError, match="deeper than 8"):
        decode_client(encode_frame(Input(seq=1, action="a", args={"x": [deepest]}))[4:])


# -- a live server ----------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path):
    config = write_config(tmp_path, PLAYERS)
    daemon = start_daemon(config, "--rate", "30", "--seed", "7", "--workers", "2")
    try:
        yield config, daemon, gateway_of(config)
    finally:
        daemon.kill()
        daemon.wait(timeout=10)


def raw_exchange(address: tuple[str, int], payload: bytes, *, read: bool = True) -> bytes:
    """Send raw bytes, then read until the server closes (or 5 s pass)."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(payload)
        received = b""
        if not read:
            return received
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return received


def frames_of(data: bytes) -> list[dict]:
    found = []
    while len(data) >= 4:
        (length,) = struct.unpack(">I", data[:4])
        found.append(cbor2.loads(data[4 : 4 + length]))
        data = data[4 + length :]
    return found


LOGIN = encode_frame(Login(version=PROTOCOL_VERSION, name="mallory", secret="pw"))
HOSTILE = [
    ("oversized length", struct.pack(">I", 1 << 30) + b"\xa0", "bad_frame"),
    ("tagged CBOR", frame(cbor2.dumps(cbor2.CBORTag(1, 5))), "bad_frame"),
    ("shared reference", frame(bytes.fromhex("d81c81d81d00")), "bad_frame"),
    ("string reference", frame(bytes.fromhex("d9010082d81900d81900")), "bad_frame"),
    ("non-string key", frame(cbor2.dumps({1: "x", "type": "Login"})), "bad_frame"),
    (
        "duplicate key",
        frame(bytes.fromhex("a2647479706565506f6e67647479706565506f6e67")),
        "bad_frame",
    ),
    ("trailing bytes", frame(cbor2.dumps({"type": "Ping", "id": 1}) + b"\x00"), "bad_frame"),
    ("deep nesting", frame(b"\x81" * 200 + b"\x00"), "bad_frame"),
    ("tuple keys", frame(bytes.fromhex("a18220210a")), "bad_frame"),
    ("wrong types", frame(cbor2.dumps({"type": "Login", "version": "1", "name": 5})), "bad_frame"),
    ("unknown type", frame(cbor2.dumps({"type": "Teleport"})), "bad_frame"),
    ("input before login", encode_frame(Input(seq=1, action="move")), "login_first"),
    ("old version", encode_frame(Login(version=0, name="eve", secret="x")), "version"),
]


def test_hostile_frames_get_their_error_and_nobody_else_notices(server) -> None:
    config, _daemon, address = server

    async def watch(seen: list[int], stop: trio.Event) -> None:
        async with await client.connect(*address, "bystander", "secret") as player:
            async for view in player.views():
                seen.append(view.tick)
                if stop.is_set():
                    return

    async def main() -> None:
        seen: list[int] = []
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, seen, stop)
            await trio.sleep(0.5)
            for name, payload, code in HOSTILE:
                answer = await trio.to_thread.run_sync(raw_exchange, address, payload)
                replies = frames_of(answer)
                assert [r.get("code") for r in replies] == [code], (name, replies)
                assert replies[0]["type"] == "Error" and replies[0]["message"]
            # a wrong secret for a claimed name
            async with await client.connect(*address, "victim", "right"):
                pass
            with pytest.raises(client.ServerError, match="auth"):
                await client.connect(*address, "victim", "wrong")
            # flooding: inputs far above the rate limit
            flood = LOGIN + encode_frame(Input(seq=1, action="move")) * 500
            replies = frames_of(await trio.to_thread.run_sync(raw_exchange, address, flood))
            assert replies[0]["type"] == "Welcome" and replies[-1]["code"] == "flood"
            # resetting the connection (RST) right after logging in
            for _ in range(3):
                reset = trio.socket.socket()
                await reset.connect(address)
                await reset.send(
                    encode_frame(Login(version=PROTOCOL_VERSION, name="rst", secret="r"))
                )
                await trio.sleep(0.3)
                reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                reset.close()
            # never reading: views pile up until the server drops us
            idle = trio.socket.socket()
            idle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await idle.connect(address)
            await idle.send(
                encode_frame(Login(version=PROTOCOL_VERSION, name="sleepy", secret="z"))
            )
            for _ in range(60):
                status = await trio.to_thread.run_sync(_status, config)
                if status["gateway"]["kicked"].get("slow"):
                    break
                await trio.sleep(0.5)
            assert status["gateway"]["kicked"] == {"flood": 1, "slow": 1}
            idle.close()
            with trio.fail_after(60):
                while len(seen) < 30:  # however fast the attacks went by
                    await trio.sleep(0.1)
            stop.set()
        assert seen == list(range(seen[0], seen[0] + len(seen)))  # the bystander missed nothing

    trio.run(main)
    # everyone has gone (the gateway notices each closed connection in its own time)
    status = wait_for_status(config, lambda s: s["gateway"]["players"] == 0)
    assert status["tick"] > 0


def _status(config: Path) -> dict:
    return inspect(config, "status")


def test_a_player_and_a_dropped_mug_survive_a_restart(tmp_path: Path) -> None:
    config = write_config(tmp_path, PLAYERS)

    async def first_visit(address) -> tuple[dict, dict]:
        async with await client.connect(*address, "ada", "lovelace") as player:
            await player.send("move", dx=1.0, dy=0.0)
            async for view in player.views():
                if view.tick >= player.welcome.tick + 15:
                    break
            await player.send("drop")
            await player.send("move", dx=0.0, dy=0.0)
            async for _view in player.views():
                mugs = [
                    e
                    for e in player.world.values()
                    if e.kind == "mug" and e.state["dropped_by"] == player.entity
                ]
                me = player.world[player.entity]
                if mugs and me.state["vx"] == 0.0:
                    return me, mugs[0]
        raise AssertionError("no mug")

    daemon = start_daemon(config, "--rate", "30", "--seed", "7")
    try:
        me, mug = trio.run(first_visit, gateway_of(config))
        time.sleep(0.5)  # at least one persist tick after the mug fell
        assert terminate(config, daemon) == 0
    finally:
        daemon.kill()

    async def second_visit(address) -> tuple[dict, dict | None]:
        async with await client.connect(*address, "ada", "lovelace") as player:
            async for _view in player.views():
                return player.world[player.entity], player.world.get(mug.id)
        raise AssertionError("no view")

    daemon = start_daemon(config, "--rate", "30")
    try:
        me_again, mug_again = trio.run(second_visit, gateway_of(config))
        with pytest.raises(client.ServerError, match="auth"):
            trio.run(client.connect, *gateway_of(config), "ada", "babbage")
    finally:
        daemon.kill()
        daemon.wait(timeout=10)
    assert me_again.id == me.id and me_again.state["name"] == "ada"
    assert (me_again.x, me_again.y) == (me.x, me.y)  # where she left
    assert mug_again == mug  # the mug, exactly as it fell


def test_a_bot_crossing_workers_that_get_killed_sees_every_tick(tmp_path: Path) -> None:
    config = write_config(tmp_path, PLAYERS)
    daemon = start_daemon(config, "--rate", "30", "--seed", "7", "--workers", "4")
    try:
        address = gateway_of(config)
        ticks: list[int] = []
        missing: list[int] = []
        owners: set[int] = set()

        async def cross() -> None:
            async with await client.connect(*address, "walker", "w") as player:
                east = True
                async with trio.open_nursery() as nursery:

                    async def killer() -> None:
                        for _ in range(4):
                            await trio.sleep(1.5)
                            workers = await trio.to_thread.run_sync(inspect, config, "workers")
                            os.kill(workers[len(ticks) % len(workers)]["pid"], signal.SIGKILL)
                        await trio.sleep(1.5)
                        # ... and on until it has crossed both ways, however slowly it ticks
                        with trio.move_on_after(60):
                            while len(ticks) <= 100 or not {1, 2} <= owners:
                                await trio.sleep(0.1)
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(killer)
                    async for view in player.views():
                        ticks.append(view.tick)
                        me = player.world.get(player.entity)
                        if me is None:
                            missing.append(view.tick)
                            continue
                        owners.add(int(me.x // 40))  # which 4-worker strip it is in
                        if (east and me.x > 95) or (not east and me.x < 65):
                            east = not east
                        if view.tick % 5 == 0:
                            await player.send("move", dx=1.0 if east else -1.0, dy=0.0)

        trio.run(cross)
        status = _status(config)
    finally:
        daemon.kill()
        daemon.wait(timeout=10)
    assert status["failovers"] >= 4
    assert len(ticks) > 100 and ticks == list(range(ticks[0], ticks[0] + len(ticks)))
    assert missing == []
    assert owners == {1, 2}  # back and forth across the boundary of workers 1 and 2


def test_native_bots_report_a_malformed_view(tmp_path: Path) -> None:
    """The C bots walk every CBOR item: a truncated view is a disconnect, not a crash."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_one() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(4096)  # the login
            welcome = {"type": "Welcome", "version": 1, "player": 7, "tick": 1, "rate": 20.0}
            view = cbor2.dumps({"tick": 2, "ack": 0, "enter": [[7, "patron", 1.0, 2.0, 0.0]]})
            connection.sendall(frame(cbor2.dumps(welcome)) + frame(view[:-3]))
            time.sleep(3)

    server = threading.Thread(target=serve_one, daemon=True)
    server.start()
    result = meshd(
        "bots",
        "--connect",
        f"127.0.0.1:{port}",
        "--count",
        "1",
        "--duration",
        "1",
        "--engine",
        "native",
        "--json",
        check=False,
    )
    listener.close()
    summary = json.loads(result.stdout)
    assert result.returncode == 1 and summary["connected"] == 1
    assert list(summary["disconnect_reasons"]) == ["bad frame: malformed CBOR"]


GHOSTLY = textwrap.dedent(
    """
    import attrs
    from meshd import Kind, Plugin

    @attrs.frozen
    class Body:
        pass

    def vanish(me, event, ctx):
        ctx.despawn()

    def new_player(name, world):
        world.spawn("body", 10.0, 10.0)

    plugin = Plugin(
        name="ghostly",
        kinds={"body": Kind(Body)},
        new_player=new_player,
        inputs={"vanish": vanish},
    )
    """
)


def test_a_player_whose_entity_vanishes_is_told_and_gets_a_new_one(tmp_path: Path) -> None:
    (tmp_path / "ghostly.py").write_text(GHOSTLY)
    config = write_config(
        tmp_path,
        {"world": {"size": 50.0}, "plugins": {"load": ["ghostly"], "dirs": [str(tmp_path)]}},
    )
    daemon = start_daemon(config, "--rate", "30")

    async def visit(address) -> tuple[int, int]:
        async with await client.connect(*address, "casper", "boo") as player:
            first = player.entity
            await player.send("vanish")
            with trio.fail_after(10), pytest.raises(client.ServerError, match="gone"):
                async for _view in player.views():
                    pass
        async with await client.connect(*address, "casper", "boo") as player:
            return first, player.entity

    try:
        first, second = trio.run(visit, gateway_of(config))
    finally:
        daemon.kill()
        daemon.wait(timeout=10)
    assert second != first


def test_the_protocol_documents_examples_decode_strictly() -> None:
    """Every hex example in docs/protocol.md is one whole frame of a current message."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    examples = re.findall(r"```\n((?:[0-9a-f]{2}[ \n])+)```", text)
    assert len(examples) == 9
    for example in examples:
        data = bytes.fromhex(example)
        (length,) = struct.unpack(">I", data[:4])
        assert length == len(data) - 4, example
        decode_message(data[4:], (*CLIENT_MESSAGES, *SERVER_MESSAGES))


# -- the bots command, last: its daemon runs until the end of this file ----------


@pytest.fixture(scope="module")
def bots_server(tmp_path_factory):
    """One tavern at 20 Hz for both bot engines (the last tests of this file, so it stops as
    soon as they are done); each engine logs in the same 30 bots, with the same secrets."""
    config = write_config(tmp_path_factory.mktemp("bots"), PLAYERS)
    daemon = start_daemon(config, "--rate", "20")
    try:
        yield config, gateway_of(config)
    finally:
        daemon.kill()
        daemon.wait(timeout=10)


@pytest.mark.parametrize("engine", ["python", "native"])
def test_bots_command_reports_everyone_connected(bots_server, engine: str) -> None:
    config, (host, port) = bots_server

    async def where_is(name: str) -> float:
        async with await client.connect(host, port, name, f"{name}-secret") as player:
            async for _view in player.views():
                return player.world[player.entity].x
        raise AssertionError("no view")

    x_before = trio.run(where_is, "bot-1")
    before, started = _status(config), time.monotonic()
    result = meshd(
        "bots",
        "--connect",
        f"{host}:{port}",
        "--count",
        "30",
        "--duration",
        "3",
        "--scenario",
        "cross",
        "--engine",
        engine,
        "--json",
    )
    tick_rate = (_status(config)["tick"] - before["tick"]) / (time.monotonic() - started)
    x_after = trio.run(where_is, "bot-1")
    summary = json.loads(result.stdout)
    assert summary["connected"] == 30 and summary["disconnects"] == 0
    assert summary["tick_gaps"] == 0 and summary["missing_self"] == 0
    # a view every tick, however fast the server ticks on this machine
    assert summary["updates_per_s"] > 0.7 * tick_rate and summary["rtt_ms"]["p50"] > 0
    assert abs(x_after - x_before) > 5.0  # the bots really walked
