"""Worker process entry point: ``python -m meshd.mesh.worker SOCKET WORKER EPOCH``.

``WORKER EPOCH`` name the process for its ``Hello`` (a warm spare uses a
negative number); which part of the world it simulates comes later, in
``Assign``.

A thin blocking shell around :class:`~meshd.mesh.step.WorkerSim`: connect to the
core's Unix socket, prove identity with the one-time token from the
``MESHD_WORKER_TOKEN`` environment variable, load the plugins named in
``Init``, then answer each ``Step`` with a ``Reply`` until the core closes the
socket. The worker exits as soon as the socket closes, so it never outlives
its core, even one killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import sys
from pathlib import Path

from meshd.common.links import receive_frame_blocking
from meshd.common.wire import CONVERTER, FrameDecoder, decode_message, encode_message, frame
from meshd.mesh.guards import Findings, guard_state, watch_ambient
from meshd.mesh.messages import Assign, Fatal, Hello, Init, Ready, Restore, Step
from meshd.mesh.plugins import PluginError, load_plugins
from meshd.mesh.step import WorkerSim, collect_between_ticks

TOKEN_ENV = "MESHD_WORKER_TOKEN"


class LinkClosed(Exception):
    """The core closed the socket."""


def _receive(sock: socket.socket, decoder: FrameDecoder, accepted: tuple[type, ...]) -> object:
    try:
        body = receive_frame_blocking(sock, decoder, 1 << 20)
    except EOFError:
        raise LinkClosed from None
    return decode_message(body, (*accepted, Fatal))


def run(socket_path: str, worker: int, epoch: int, token: str) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
    except (FileNotFoundError, ConnectionRefusedError):
        return 0  # the core stopped while we were starting: nobody to work for
    send = sock.sendall
    decoder = FrameDecoder(1 << 30)  # the core is trusted: a step may be large
    send(frame(encode_message(Hello(worker=worker, epoch=epoch, token=token, pid=os.getpid()))))
    init = _receive(sock, decoder, (Init,))
    if isinstance(init, Fatal):
        print(f"meshd worker {worker}: core refused: {init.message}", file=sys.stderr)
        return 1
    assert isinstance(init, Init)
    findings, guards = Findings(), contextlib.ExitStack()
    if init.strict:  # for the worker's life; before the plugins bind what they import
        guards.enter_context(watch_ambient(findings))
    try:
        plugins = load_plugins(
            init.plugins, [Path(d) for d in init.plugin_dirs], init.settings, CONVERTER
        )
    except PluginError as exc:
        send(frame(encode_message(Fatal(str(exc)))))
        return 1
    if init.strict:
        guard_state(plugins, findings)
    reported = Findings()
    send(frame(encode_message(Ready(worker=worker, code=plugins.code_digest()))))
    assign = _receive(sock, decoder, (Assign,))  # a warm spare waits here
    if isinstance(assign, Fatal):
        return 0
    assert isinstance(assign, Assign)
    sim = WorkerSim(assign.worker, assign.epoch, plugins, init.world)
    gc.disable()
    while True:
        message = _receive(sock, decoder, (Step, Restore))
        if isinstance(message, Fatal):
            return 0
        if isinstance(message, Restore):
            sim.restore(message)
            continue
        assert isinstance(message, Step)
        try:
            reply = sim.step(message)
        except Exception as exc:
            # Plugin errors are caught per entity and per input inside the step;
            # what gets here is meshd's own fault, and the core must hear why.
            send(frame(encode_message(Fatal(f"tick {message.tick} failed: {exc!r}"))))
            raise
        if findings != reported:
            reply.hazards = [[*key, n] for key, n in (findings - reported).items()]
            reported = findings.copy()
        send(frame(encode_message(reply)))
        # While the core commits this tick, we are idle: collect now.
        collect_between_ticks(message.tick)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m meshd.mesh.worker SOCKET WORKER EPOCH", file=sys.stderr)
        return 2
    token = os.environ.pop(TOKEN_ENV, "")
    # Ctrl-C goes to the core; the core stops us by closing the socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return run(args[0], int(args[1]), int(args[2]), token)
    except (LinkClosed, ConnectionError, BrokenPipeError):
        return 0


if __name__ == "__main__":
    sys.exit(main())
