"""Hostile players against one real daemon, each from its own loopback address, while a
bystander on 127.0.0.1 plays (issue #14's table; every outcome is ``docs/protocol.md``'s).

The whole 127/8 range is local: a client binds its socket to 127.0.0.N to come from there.
"""

from __future__ import annotations

import math
import struct
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
from conftest import TAVERN, meshd_json, start_daemon, write_config
from test_players import gateway_of

from meshd import client
from meshd.common.wire import FrameDecoder
from meshd.players.protocol import (
    PROTOCOL_VERSION,
    Error,
    Input,
    Login,
    Welcome,
    decode_server,
    encode_frame,
)

FULLWIDTH_VICTIM = "\uff56\uff49\uff43\uff54\uff49\uff4d"
LIMITS = {
    # The defaults, written out: what this suite holds the server to.
    "max_pending_per_address": 8,
    "max_players_per_address": 64,
    "login_failures": 5,
    "input_bytes_rate": 4096.0,
    "input_bytes_burst": 16384,
    "hash_cost": 12,  # the cost the issue measured at (the default, 17, is slower per login)
    "min_secret": 8,
    "signup_per_address": 3,
    # Not the default (30): this suite's players sign up faster than that on purpose; the
    # overall sign-up limit is tested in test_accounts.
    "signup_per_minute": 1000,
}


async def _errors(stream: trio.SocketStream, wait: float = 3.0) -> list[str]:
    """The codes of the ``Error`` frames the server sends until it closes (or ``wait`` s)."""
    decoder, codes = FrameDecoder(1 << 20), []
    with trio.move_on_after(wait):
        try:
            while True:
                data = await stream.receive_some(1 << 16)
                if not data:
                    break
                decoder.feed(data)
                for body in decoder.frames():
                    message = decode_server(body)
                    if isinstance(message, Error):
                        codes.append(message.code)
        except trio.BrokenResourceError:
            pass
    return codes


async def _logged_in(host: str, port: int, local: str, name: str) -> trio.SocketStream:
    stream = await trio.open_tcp_stream(host, port, local_address=local)
    await stream.send_all(encode_frame(Login(PROTOCOL_VERSION, name, f"{name}-secret")))
    return stream


async def _shape(host: str, port: int, local: str, name: str, frame: bytes) -> list[str]:
    async with await _logged_in(host, port, local, name) as stream:
        await stream.send_all(frame)
        return await _errors(stream, wait=1.5)


def _input(args: Any) -> bytes:
    return encode_frame(Input(1, "move", args))


def _raw_input(args_cbor: bytes) -> bytes:
    """An ``Input`` frame whose ``args`` are CBOR bytes as given (what no encoder makes)."""
    body = b"\xa4" + cbor2.dumps("type") + cbor2.dumps("Input") + cbor2.dumps("seq") + b"\x01"
    body += cbor2.dumps("action") + cbor2.dumps("move") + cbor2.dumps("args") + args_cbor
    return struct.pack(">I", len(body)) + body


def _nested(depth: int) -> Any:
    return {"x": _nested(depth - 1)} if depth else 1


SHAPES = {
    # name: (frame, what the server answers; "closed" after a code: the connection ends)
    "nine levels deep": (_input({"dx": _nested(9)}), ["bad_input"]),
    "NaN": (_input({"dx": math.nan}), ["bad_input"]),
    "infinity": (_input({"dx": -math.inf}), ["bad_input"]),
    "an input of 3 KiB": (_input({"dx": "x" * 3000}), ["bad_input"]),
    "an integer of 70 bits": (_raw_input(cbor2.dumps({"dx": 1 << 70})), ["bad_frame"]),
    "a tag": (_raw_input(b"\xa1\x62dx" + cbor2.dumps(cbor2.CBORTag(1, 0))), ["bad_frame"]),
    "a key that is no string": (_raw_input(b"\xa1\x01\x01"), ["bad_frame"]),
    "a frame of 5 KiB": (_input({"dx": "x" * 5000}), ["bad_frame"]),
    "a frame that says 1 GiB": (struct.pack(">I", 1 << 30), ["bad_frame"]),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("hostile")
    config = write_config(folder, {**TAVERN, "gateway": {"processes": 1, **LIMITS}})
    daemon = start_daemon(config, "--rate", "20")
    try:
        yield config, gateway_of(config)
    finally:
        daemon.kill()
        daemon.wait(timeout=10)


def test_hostile_players_get_their_documented_outcome_and_the_bystander_sees_every_tick(
    server: tuple[Path, tuple[str, int]],
) -> None:
    config, (host, port) = server
    rss_before = _core_rss(config)
    found: dict[str, Any] = {}

    async def main() -> list[int]:
        ticks: list[int] = []
        async with (
            await client.connect(host, port, "bystander", "bystander-secret") as bystander,
            trio.open_nursery() as nursery,
        ):

            async def watch() -> None:
                async for view in bystander.views():
                    ticks.append(view.tick)

            nursery.start_soon(watch)
            async with await client.connect(host, port, "victim", "victim-secret"):
                pass  # the name exists
            found["shapes"] = await _every_shape(host, port)
            found["big inputs"] = await _big_inputs(host, port)
            found["wrong secrets"] = await _wrong_secrets(host, port)
            found["idle flood"] = await _idle_flood(host, port)
            found["new names"] = await _new_names(host, port)
            found["look-alikes"] = await _look_alikes(host, port)
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
        return ticks

    ticks = trio.run(main)
    status = meshd_json("inspect", "status", "--config", str(config))
    assert found["shapes"] == {name: expected for name, (_f, expected) in SHAPES.items()}
    # 20 players flood 3.9 KiB inputs 28 times a second: each is answered bad_input until
    # its byte budget is spent (at once, if its first read holds more than the budget),
    # then dropped; the world and its workers never notice.
    assert all(codes[-1] == "flood" and set(codes) <= {"bad_input", "flood"}
               for codes in found["big inputs"])  # fmt: skip
    assert _core_rss(config) - rss_before < 50 and status["failovers"] == 0
    wrong = found["wrong secrets"]
    assert wrong["victim_ms"] <= 200, wrong  # behind at most a few of the attacker's hashes
    assert set(wrong["codes"]) <= {"auth", "backoff", "address_pending", "signup_limit"}
    refused = ("backoff", "address_pending", "signup_limit")
    assert sum(wrong["codes"].count(code) for code in refused) > 100
    idle = found["idle flood"]
    assert idle["refused"] >= 1990 and idle["welcomed"]
    # 200 new names from one address as fast as it can: three a minute are taken.
    assert found["new names"].count("welcomed") == 3
    assert found["new names"].count("signup_limit") == 197
    # Another player posing as the victim, or as the bystander: refused, or the same name.
    assert found["look-alikes"] == {
        "v\u0456ctim": "bad_name",  # a Cyrillic i (U+0456) among Latin letters
        FULLWIDTH_VICTIM: "auth",  # NFKC makes it "victim", whose secret it lacks
        " bystander ": "auth",  # trimmed, the same
        "victim\u200b": "bad_name",  # an invisible character
    }
    assert ticks == list(range(ticks[0], ticks[0] + len(ticks))), "the bystander missed ticks"


async def _every_shape(host: str, port: int) -> dict[str, list[str]]:
    answers = {}
    for index, (name, (frame, _expected)) in enumerate(SHAPES.items()):
        # (each from its own address: three new names a minute is one address's share)
        answers[name] = await _shape(host, port, f"127.0.1.{index}", f"shape{index}", frame)
    return answers


async def _big_inputs(host: str, port: int) -> list[list[str]]:
    payload = {"note": ["x" * 90] * 40}  # 3.9 KiB of CBOR: under the frame cap

    async def flood(index: int) -> list[str]:
        local = f"127.0.0.{10 + index}"
        stream = await _logged_in(host, port, local, f"flood{index}")
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(_send_for, stream, payload, 3.0)
            codes = await _errors(stream, wait=5.0)
            nursery.cancel_scope.cancel()
        return codes

    results: list[list[str]] = [[] for _ in range(20)]

    async def run(index: int) -> None:
        results[index] = await flood(index)

    async with trio.open_nursery() as nursery:
        for index in range(20):
            nursery.start_soon(run, index)
    return results


async def _send_for(stream: trio.SocketStream, args: dict[str, Any], seconds: float) -> None:
    with trio.move_on_after(seconds):
        seq = 0
        try:
            while True:
                seq += 1
                await stream.send_all(encode_frame(Input(seq, "move", args)))
                await trio.sleep(1 / 28)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def _wrong_secrets(host: str, port: int) -> dict[str, Any]:
    """75 wrong secrets for the victim from one address and 75 new names from another, at
    once; the victim logs in from its own address meanwhile."""
    codes: list[str] = []

    async def attempt(local: str, name: str, secret: str) -> None:
        async with await trio.open_tcp_stream(host, port, local_address=local) as stream:
            await stream.send_all(encode_frame(Login(PROTOCOL_VERSION, name, secret)))
            codes.extend(await _errors(stream, wait=5.0))

    async with trio.open_nursery() as nursery:
        for index in range(75):
            nursery.start_soon(attempt, "127.0.0.3", "victim", f"wrong-{index}")
            nursery.start_soon(attempt, "127.0.0.4", f"newcomer{index}", "newcomer-secret")
        await trio.sleep(0.2)  # the attempts are in
        started = time.perf_counter()
        async with await client.connect(host, port, "victim", "victim-secret"):
            victim_ms = (time.perf_counter() - started) * 1000
    return {"victim_ms": victim_ms, "codes": codes}


async def _idle_flood(host: str, port: int) -> dict[str, Any]:
    """2,000 connections from one address that never log in; a player from another."""
    streams = []
    try:
        for _ in range(2000):
            streams.append(await trio.open_tcp_stream(host, port, local_address="127.0.0.5"))
        refused = 0
        all_refused = trio.Event()  # every one beyond the address's pending share

        async def note(stream: trio.SocketStream) -> None:
            nonlocal refused
            if "address_pending" in await _errors(stream, wait=30.0):
                refused += 1
                if refused == len(streams) - LIMITS["max_pending_per_address"]:
                    all_refused.set()

        # Read them all at once, as long as the server takes (however slow the machine).
        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(note, stream)
            with trio.move_on_after(30):
                await all_refused.wait()
            nursery.cancel_scope.cancel()
        stream = await trio.open_tcp_stream(host, port, local_address="127.0.0.6")
        async with stream:
            await stream.send_all(encode_frame(Login(PROTOCOL_VERSION, "guest", "guest-secret")))
            decoder = FrameDecoder(1 << 20)
            with trio.fail_after(5):
                while not (message := next(decoder.frames(), None)):
                    decoder.feed(await stream.receive_some(1 << 16))
            welcomed = isinstance(decode_server(message), Welcome)
        return {"refused": refused, "welcomed": welcomed}
    finally:
        for stream in streams:
            await stream.aclose()


async def _outcome(local: str, host: str, port: int, name: str, secret: str) -> str:
    """What a login gets: "welcomed", or the code of the error that refused it."""
    async with await trio.open_tcp_stream(host, port, local_address=local) as stream:
        await stream.send_all(encode_frame(Login(PROTOCOL_VERSION, name, secret)))
        decoder = FrameDecoder(1 << 20)
        with trio.fail_after(10):
            while (body := next(decoder.frames(), None)) is None:
                decoder.feed(await stream.receive_some(1 << 16))
        message = decode_server(body)
        return "welcomed" if isinstance(message, Welcome) else message.code


async def _new_names(host: str, port: int) -> list[str]:
    return [
        await _outcome("127.0.0.7", host, port, f"squatter{index}", "squatter-secret")
        for index in range(200)
    ]


async def _look_alikes(host: str, port: int) -> dict[str, str]:
    names = ["v\u0456ctim", FULLWIDTH_VICTIM, " bystander ", "victim\u200b"]
    return {name: await _outcome("127.0.0.8", host, port, name, "posing-secret") for name in names}


def _core_rss(config: Path) -> float:
    """The core's resident memory in MB."""
    pid = int((config.parent / "data" / "meshd.lock").read_text())
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")
