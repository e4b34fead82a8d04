"""TLS on the players' port: real daemons and sockets, certificates made by ``trustme``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import time
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
from conftest import meshd, meshd_json, start_daemon, wait_for_status, write_config
from typer.testing import CliRunner

from meshd import client
from meshd.common.config import ConfigError, GatewayConfig
from meshd.ops import cli
from meshd.players.ports import check_plaintext
from meshd.players.tls import TlsLayer, TlsReceiver, handshake, server_context

SMALL = {
    "world": {"size": 160.0, "halo": 5.0},
    "gateway": {"login_timeout": 1.0},
    "plugins": {"load": ["tavern"], "tavern": {"npcs": 50}},
}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def servers(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory):
    """A TLS server and a plaintext one, started side by side: (folder, TLS, plaintext), each
    server as (config, host, port)."""
    folder = tmp_path_factory.mktemp("tls")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    (folder / "tls").mkdir()
    (folder / "plain").mkdir()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    for blob in issued.cert_chain_pems:
        blob.write_to_path(str(folder / "tls" / "chain.pem"), append=True)
    issued.private_key_pem.write_to_path(str(folder / "tls" / "key.pem"))
    # Paths relative to the config file, as an operator would write them.
    tls = {**SMALL, "gateway": {**SMALL["gateway"], "tls_cert": "chain.pem", "tls_key": "key.pem"}}
    configs = [write_config(folder / "tls", tls), write_config(folder / "plain", SMALL)]
    daemons = [start_daemon(config, "--rate", "20", "--workers", "1") for config in configs]
    try:
        found = []
        for config, daemon in zip(configs, daemons, strict=True):
            status = wait_for_status(config, lambda s: s["gateway"]["address"], daemon=daemon)
            host, port = status["gateway"]["address"].rsplit(":", 1)
            found.append((config, host, int(port)))
        yield folder, found[0], found[1]
    finally:
        for daemon in daemons:
            daemon.kill()
            daemon.wait(timeout=10)


def test_a_player_logs_in_over_tls_sees_views_and_reconnects_over_tls(servers) -> None:
    folder, (config, host, port), _ = servers
    context = client.tls_context(folder / "ca.pem")

    async def main() -> tuple[list[int], list[int], int, bool]:
        async with await client.connect(host, port, "ada", "s3cret", ssl_context=context) as me:
            assert isinstance(me.stream, trio.SSLStream)
            before: list[int] = []
            async for view in me.views():
                assert me.entity in me.world
                before.append(view.tick)
                if len(before) == 5:
                    break
            # The gateway dies: the client comes back over TLS, to the same entity.
            rows = await trio.to_thread.run_sync(
                meshd_json, "inspect", "gateways", "--config", str(config)
            )
            os.kill(rows[0]["pid"], signal.SIGKILL)
            after: list[int] = []
            with trio.fail_after(20):
                async for view in me.views():
                    if me.reconnects:
                        after.append(view.tick)
                        if len(after) == 3:
                            break
            return before, after, me.reconnects, isinstance(me.stream, trio.SSLStream)

    before, after, reconnects, still_tls = trio.run(main)
    assert before == list(range(before[0], before[0] + 5))  # a view every tick
    assert reconnects == 1 and after and after[0] > before[-1] and still_tls
    status = meshd_json("inspect", "status", "--config", str(config))
    assert status["gateway"]["tls"] is True


def test_bots_play_over_tls_with_the_python_engine_only(servers) -> None:
    folder, (_, host, port), _ = servers
    ca_file = str(folder / "ca.pem")
    common = ["bots", "--connect", f"{host}:{port}", "--count", "5", "--duration", "1.5"]
    summary = json.loads(meshd(*common, "--tls-ca", ca_file, "--json").stdout)
    assert summary["connected"] == 5 and summary["disconnects"] == 0
    assert summary["updates_per_s"] > 5 and summary["tick_gaps"] == 0
    native = CliRunner().invoke(cli.app, [*common, "--tls-ca", ca_file, "--engine", "native"])
    assert native.exit_code == 2 and "use --engine python" in native.output
    assert len(native.output.strip().splitlines()) == 1


def test_a_certificate_nobody_trusts_is_refused_unless_told_to_trust_anyone(servers) -> None:
    _, (_, host, port), _ = servers

    async def main() -> None:
        # The system's authorities do not know the test's own CA.
        with pytest.raises(client.TlsError, match="certificate is not trusted"):
            await client.connect(host, port, "bob", "pw", tls=True)
        insecure = client.tls_context(insecure=True)
        async with await client.connect(host, port, "bob", "pw", ssl_context=insecure) as bob:
            async for _view in bob.views():
                break

    trio.run(main)


def test_plaintext_and_tls_on_the_wrong_port_fail_clearly(servers) -> None:
    folder, (_, host, tls_port), (_, plain_host, plain_port) = servers

    async def main() -> None:
        with pytest.raises(client.ServerError, match="speaks TLS") as refused:
            await client.connect(host, tls_port, "carl", "pw")
        assert refused.value.code == "tls_required"
        context = client.tls_context(folder / "ca.pem")
        with pytest.raises(client.TlsError, match="does not speak TLS"):
            await client.connect(plain_host, plain_port, "carl", "pw", ssl_context=context)

    trio.run(main)


def test_a_stalled_handshake_ends_at_the_login_deadline(servers) -> None:
    _, (config, host, port), _ = servers
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then nothing
        started = time.monotonic()
        assert sock.recv(100) == b""  # closed, without a word: no TLS to say it in
        waited = time.monotonic() - started
    assert 0.5 < waited < 4.0  # gateway.login_timeout = 1 s
    status = wait_for_status(config, lambda s: s["gateway"]["refused"].get("login_timeout"))
    assert status["gateway"]["refused"]["login_timeout"] >= 1


def test_plain_tcp_beyond_loopback_needs_allow_plaintext(tmp_path: Path) -> None:
    config = write_config(tmp_path, SMALL)
    refused = meshd(
        "serve", "--config", str(config), "--listen", "0.0.0.0:0", "--ticks", "1", check=False
    )
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "gateway.allow_plaintext" in refused.stderr and "gateway.tls_cert" in refused.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was made

    allowed = {**SMALL, "gateway": {"listen": "0.0.0.0:0", "allow_plaintext": True}}
    started = meshd(
        "serve", "--config", str(write_config(tmp_path, allowed)), "--ticks", "1", "--log-json"
    )
    warnings = [
        line
        for line in started.stderr.splitlines()
        if line.startswith("{") and json.loads(line)["level"] == "warning"
    ]
    assert any("plain TCP" in line and "0.0.0.0" in line for line in warnings)


def test_which_listen_addresses_need_tls(tmp_path: Path) -> None:
    for listen in ("127.0.0.1:0", "127.0.0.2:0", "[::1]:0", "localhost:0"):
        assert check_plaintext(GatewayConfig(listen=listen)) == []
    for listen in ("0.0.0.0:0", "[::]:0", "10.1.2.3:0"):
        with pytest.raises(ConfigError, match=r"gateway\.allow_plaintext"):
            check_plaintext(GatewayConfig(listen=listen))
        assert check_plaintext(GatewayConfig(listen=listen, allow_plaintext=True))
        assert check_plaintext(GatewayConfig(listen=listen, tls_cert="c", tls_key="k")) == []


def _layer_and_peer(
    ca: trustme.CA, folder: Path
) -> tuple[TlsLayer, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A server's TlsLayer and a client's SSLObject (with its in and out buffers) trusting it."""
    issued = ca.issue_cert("localhost")
    issued.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    issued.private_key_pem.write_to_path(str(folder / "key.pem"))
    layer = TlsLayer(server_context(str(folder / "cert.pem"), str(folder / "key.pem")))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    return (
        layer,
        context.wrap_bio(incoming, outgoing, server_hostname="localhost"),
        incoming,
        outgoing,
    )


def test_the_tls_layer_takes_records_in_any_pieces(ca: trustme.CA, tmp_path: Path) -> None:
    """The gateway's reads hand the layer whatever the kernel had: a record cut anywhere,
    several at once, then the client's close_notify."""
    layer, peer, incoming, outgoing = _layer_and_peer(ca, tmp_path)
    while not layer.established:
        with contextlib.suppress(ssl.SSLWantReadError):
            peer.do_handshake()
        incoming.write(layer.handshake(outgoing.read()))
    peer.do_handshake()
    frames = [bytes([n]) * (n * 97 % 2000 + 1) for n in range(1, 40)]
    for frame in frames:
        peer.write(frame)
    wire = outgoing.read()
    received = b"".join(layer.receive(wire[at : at + 7]) for at in range(0, len(wire), 7))
    assert received == b"".join(frames)
    incoming.write(layer.seal(b"view"))
    assert peer.read() == b"view"
    with pytest.raises(ssl.SSLWantReadError):
        peer.unwrap()
    assert layer.receive(outgoing.read()) == b"" and layer.closed
    with pytest.raises(ConfigError, match=r"gateway\.tls_cert"):
        server_context(str(tmp_path / "cert.pem"), str(tmp_path / "missing.pem"))


async def test_a_login_sent_with_the_end_of_the_handshake_is_read_at_once(
    ca: trustme.CA, tmp_path: Path
) -> None:
    """A client may send its first frame in the same packet as its handshake's last flight:
    the gateway must not wait for more bytes that will never come."""
    layer, peer, incoming, outgoing = _layer_and_peer(ca, tmp_path)
    client_end, server_end = trio.testing.memory_stream_pair()

    async def play_client() -> None:
        while True:
            try:
                peer.do_handshake()
                break
            except ssl.SSLWantReadError:
                await client_end.send_all(outgoing.read())
                incoming.write(await client_end.receive_some())
        peer.write(b"login frame")
        await client_end.send_all(outgoing.read())  # Finished and the data, in one piece

    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(play_client)
            await handshake(server_end, layer)  # type: ignore[arg-type]
            received = await TlsReceiver(server_end, layer).receive_some()  # type: ignore[arg-type]
    assert received == b"login frame"
