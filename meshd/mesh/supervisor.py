"""Worker processes: start, authenticate, talk to, and stop them (trio shell).

Each worker is ``python -m meshd.mesh.worker`` in its own process group (so a
Ctrl-C aimed at the core does not hit it, and stopping kills the whole
group). It connects back to a Unix socket in a private 0700 runtime folder
and must present the one-time token it was started with before it gets
anything.

It is long because it owns a worker process's whole life in one place:
start and authentication, warm spares, replacement within a restart budget,
a new generation for ``meshd reload``, and stopping.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import trio

from meshd.common.links import receive_frame
from meshd.common.log import get_logger
from meshd.common.wire import FrameDecoder, WireError, decode_message, encode_message, frame
from meshd.mesh.messages import Assign, Fatal, Hello, Init, Ready, Reply
from meshd.mesh.worker import TOKEN_ENV

WORKER_FRAME_CAP = 1 << 30
STARTUP_TIMEOUT = 30.0
SPARE_RETRY_MAX = 60.0
"""Seconds between attempts at most, while warm spares fail to start."""


class WorkerFailed(Exception):
    """A worker exited, closed its socket, sent garbage or missed a deadline."""

    def __init__(self, worker: int, reason: str) -> None:
        super().__init__(f"worker {worker}: {reason}")
        self.worker = worker
        self.reason = reason


@attrs.define(eq=False)
class WorkerLink:
    """One live worker incarnation and its socket."""

    worker: int
    epoch: int
    pid: int
    process: trio.Process
    stream: trio.SocketStream
    decoder: FrameDecoder = attrs.field(factory=lambda: FrameDecoder(WORKER_FRAME_CAP))
    stale_frames: int = 0
    code: str = ""
    """The digest of the plugin code the process loaded."""

    async def send(self, message: Any) -> None:
        try:
            await self.stream.send_all(frame(encode_message(message)))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise WorkerFailed(self.worker, f"socket closed while sending ({exc})") from None

    async def receive(self, accepted: Iterable[type]) -> Any:
        accepted = (*accepted, Fatal)
        try:
            message = decode_message(
                await receive_frame(self.stream, self.decoder, 1 << 20), accepted
            )
        except WireError as exc:
            raise WorkerFailed(self.worker, f"sent a bad frame: {exc}") from None
        except EOFError:
            raise WorkerFailed(self.worker, "closed its socket (exited?)") from None
        if isinstance(message, Fatal):
            raise WorkerFailed(self.worker, message.message)
        return message

    async def receive_reply(self, tick: int) -> Reply:
        """The reply for ``tick``; replies of other ticks or epochs are dropped and counted."""
        while True:
            reply = await self.receive((Reply,))
            if reply.epoch == self.epoch and reply.tick == tick:
                return reply
            self.stale_frames += 1


class RestartBudgetExceeded(WorkerFailed):
    """A worker slot keeps failing; restarting it again would only hide the fault."""


class Supervisor:
    """Starts and stops worker processes; owns the runtime folder and its socket."""

    def __init__(
        self, init: Init, *, max_restarts: int = 5, restart_window: float = 30.0, spares: int = 1
    ) -> None:
        self.init = init
        self.spare_count = spares
        self.spares: list[WorkerLink] = []
        self._spares_started = 0
        self._refilling = False
        self._stopping = False
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.stale_frames = 0
        self._restarts: dict[int, list[float]] = {}
        self._nursery: trio.Nursery
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="meshd-"))  # created 0700
        self.socket_path = self.runtime_dir / "core.sock"
        self.links: dict[int, WorkerLink] = {}
        self._starting: set[trio.Process] = set()
        """Processes started and not yet ready (stopped with the rest)."""
        self._epochs: dict[int, int] = {}
        self._pending: dict[tuple[str, int, int], tuple[str, trio.MemorySendChannel[Any]]] = {}
        """(role, slot, epoch) of a child being started -> its token and where to hand it."""
        self._listener: trio.SocketListener | None = None
        self._log = get_logger(component="supervisor")

    async def listen(self) -> trio.SocketListener:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(str(self.socket_path))
        sock.listen(64)
        self._listener = trio.SocketListener(sock)
        return self._listener

    async def accept_loop(self) -> None:
        """Match incoming connections to the workers being started, by token.

        Also reaps killed worker processes, in its nursery.
        """
        assert self._listener is not None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while True:
                stream = await self._listener.accept()
                nursery.start_soon(self._greet, stream)

    async def _greet(self, stream: trio.SocketStream) -> None:
        decoder = FrameDecoder(1 << 16)
        hello = None
        with trio.move_on_after(STARTUP_TIMEOUT), contextlib.suppress(WireError, EOFError):
            hello = decode_message(await receive_frame(stream, decoder), (Hello,))
        key = (hello.role, hello.worker, hello.epoch) if hello else None
        pending = self._pending.get(key) if key else None
        if key is None or pending is None or not secrets.compare_digest(pending[0], hello.token):
            self._log.warning("rejected child connection", reason="bad or missing hello")
            await stream.aclose()
            return
        del self._pending[key]
        await pending[1].send((stream, hello, decoder))

    def _next_epoch(self, worker: int) -> int:
        self._epochs[worker] = epoch = self._epochs.get(worker, 0) + 1
        return epoch

    async def start_worker(self, worker: int) -> WorkerLink:
        """Start a worker process for slot ``worker`` and wait until it is ready."""
        link = await self._spawn(worker, self._next_epoch(worker))
        await self._assign(link, worker, link.epoch)
        return link

    async def _assign(self, link: WorkerLink, worker: int, epoch: int) -> None:
        """Make ``link`` slot ``worker``'s process. If it cannot be told, it has died:
        the slot keeps it, and its next step fails over as any dead worker's would."""
        link.worker, link.epoch = worker, epoch
        self.links[worker] = link
        await link.send(Assign(worker=worker, epoch=epoch))
        self._log.info("worker started", worker=worker, epoch=epoch, pid=link.pid)

    async def refill_spares(self) -> None:
        """Keep ``spare_count`` idle workers started, ready to take over a failed slot."""
        if self._refilling:
            return
        self._refilling = True
        wait = 1.0
        try:
            while len(self.spares) < self.spare_count:
                self._spares_started += 1
                try:
                    self.spares.append(await self._spawn(-self._spares_started, 1))
                except WorkerFailed as failure:
                    if self._stopping:
                        return  # stop_all killed it while it started
                    # (A plugin file broken on disk, say.) Running slots are not hurt: keep
                    # trying, and say so, without taking the daemon down.
                    self._log.warning(
                        "a warm spare did not start; trying again", reason=failure.reason, wait=wait
                    )
                    await trio.sleep(wait)
                    wait = min(wait * 2, SPARE_RETRY_MAX)
        finally:
            self._refilling = False

    async def spawn_child(
        self, module: str, role: str, slot: int, epoch: int, pass_fds: tuple[int, ...] = ()
    ) -> tuple[trio.Process, trio.SocketStream, Hello, FrameDecoder]:
        """Start ``python -m module SOCKET SLOT EPOCH [FD...]`` and wait for its ``Hello``.

        The child runs in its own process group, gets a one-time token in
        ``MESHD_WORKER_TOKEN`` and inherits ``pass_fds``. Raises
        :class:`WorkerFailed` if it does not connect within ``STARTUP_TIMEOUT``
        (it is killed then). The caller owns the process from here on.
        """
        token = secrets.token_hex(16)
        send, receive = trio.open_memory_channel[Any](1)
        key = (role, slot, epoch)
        self._pending[key] = (token, send)
        process = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                module,
                str(self.socket_path),
                str(slot),
                str(epoch),
                *map(str, pass_fds),
            ],
            env={**os.environ, TOKEN_ENV: token},
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            pass_fds=pass_fds,
        )
        self._starting.add(process)
        try:
            with trio.move_on_after(STARTUP_TIMEOUT) as scope:
                stream, hello, decoder = await receive.receive()
            if scope.cancelled_caught:
                self._pending.pop(key, None)
                self.kill(process)
                raise WorkerFailed(slot, f"did not connect within {STARTUP_TIMEOUT} s")
            return process, stream, hello, decoder
        finally:
            self._starting.discard(process)

    async def _spawn(self, worker: int, epoch: int) -> WorkerLink:
        """Start one worker process, authenticate it and wait until it has loaded its plugins."""
        process, stream, hello, decoder = await self.spawn_child(
            "meshd.mesh.worker", "worker", worker, epoch
        )
        self._starting.add(process)
        try:
            decoder.max_frame = WORKER_FRAME_CAP
            link = WorkerLink(worker, epoch, hello.pid, process, stream, decoder)
            try:
                await link.send(self.init)
                with trio.move_on_after(STARTUP_TIMEOUT):
                    link.code = (await link.receive((Ready,))).code
                if not link.code:
                    raise WorkerFailed(
                        worker, f"did not load its plugins within {STARTUP_TIMEOUT} s"
                    )
            except WorkerFailed:
                self.kill(process)
                raise
            return link
        finally:
            self._starting.discard(process)

    async def replace(self, worker: int) -> WorkerLink:
        """Kill ``worker``'s current incarnation (its whole process group) and start the next.

        Raises :class:`RestartBudgetExceeded` when the worker slot has been
        restarted ``max_restarts`` times within ``restart_window`` seconds.
        """
        old = self.links.pop(worker, None)
        if old is not None:
            self.kill(old.process)
            await old.stream.aclose()
            self.stale_frames += old.stale_frames
            self.reap(old.process)
        now = trio.current_time()
        history = self._restarts.setdefault(worker, [])
        history[:] = [t for t in history if now - t < self.restart_window]
        if len(history) >= self.max_restarts:
            raise RestartBudgetExceeded(
                worker, f"restarted {len(history)} times in {self.restart_window:g} s"
            )
        history.append(now)
        if self.spares:
            return await self.add_worker(worker)
        return await self.start_worker(worker)

    async def add_worker(self, worker: int) -> WorkerLink:
        """Give slot ``worker`` to a warm spare at once, and start the next spare.

        The caller checks that a spare is ready (``self.spares``): this
        never waits for a process to boot.
        """
        link = self.spares.pop(0)
        await self._assign(link, worker, self._next_epoch(worker))
        self._nursery.start_soon(self.refill_spares)
        return link

    async def retire(self, worker: int) -> None:
        """Stop slot ``worker``, which holds nothing any more: close its link, reap it."""
        link = self.links.pop(worker)
        await self._dismiss(link)
        self._log.info("worker stopped", worker=worker, epoch=link.epoch, pid=link.pid)

    async def _dismiss(self, link: WorkerLink, grace: float = 2.0) -> None:
        """Close ``link``: the worker exits on EOF; one that does not within ``grace``
        seconds is killed, in the background."""
        self.stale_frames += link.stale_frames
        await link.stream.aclose()

        async def reap() -> None:
            with trio.move_on_after(grace):
                await link.process.wait()
            self.kill(link.process)
            await link.process.wait()

        self._nursery.start_soon(reap)

    async def prepare(self, count: int) -> list[WorkerLink]:
        """Start ``count`` workers at once, loaded with the plugins' code as it is now and not
        yet given a slot (``meshd reload`` hands them every slot with :meth:`hand_over`).

        Raises :class:`WorkerFailed` if any of them cannot start; the others are killed then.
        """
        links: list[WorkerLink] = []
        failed: list[WorkerFailed] = []

        async def start_one() -> None:
            self._spares_started += 1
            try:
                links.append(await self._spawn(-self._spares_started, 1))
            except WorkerFailed as failure:
                failed.append(failure)

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(count):
                    nursery.start_soon(start_one)
        except BaseException:  # cancelled: nothing it started is wanted
            with trio.CancelScope(shield=True):
                await self.discard(links)
            raise
        if failed:
            await self.discard(links)
            raise failed[0]
        return links

    async def hand_over(self, links: list[WorkerLink], spares: list[WorkerLink]) -> None:
        """Give every live slot to one of ``links`` (in slot order) and make ``spares`` the
        warm spares; the processes they replace are stopped.

        Called at a tick boundary; the caller then restores each slot's state.
        """
        fresh = iter(links)
        for worker in sorted(self.links):
            old = self.links[worker]
            with contextlib.suppress(WorkerFailed):  # it fails over at the next step
                await self._assign(next(fresh), worker, self._next_epoch(worker))
            await self._dismiss(old)
        for old in self.spares:
            await self._dismiss(old)
        self.spares = list(spares)

    async def discard(self, links: Iterable[WorkerLink]) -> None:
        """Stop unassigned workers that are no longer wanted."""
        for link in links:
            self.kill(link.process)
            await self._dismiss(link)

    def reap(self, process: trio.Process) -> None:
        """Wait for a killed child in the background, so it leaves no zombie."""
        self._nursery.start_soon(process.wait)

    async def revive(self, worker: int) -> WorkerLink:
        """Start slot ``worker`` again after its partitions were quarantined.

        An operator asked for it (the fault is believed fixed), so the slot's
        restart history starts over.
        """
        self._restarts.pop(worker, None)
        if self.spares:
            return await self.add_worker(worker)
        return await self.start_worker(worker)

    async def start_all(self, workers: Iterable[int]) -> None:
        async with trio.open_nursery() as nursery:
            for worker in workers:
                nursery.start_soon(self.start_worker, worker)

    @staticmethod
    def kill(process: trio.Process) -> None:
        """SIGKILL ``process``'s whole process group (a stopped one too)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    async def stop_all(self, grace: float = 2.0) -> None:
        """Close every link (workers exit on EOF), then kill what is left, and any
        process still starting."""
        self._stopping = True
        for process in self._starting:
            self.kill(process)
        everyone = [*self.links.values(), *self.spares]
        for link in everyone:
            await link.stream.aclose()
        with trio.move_on_after(grace):
            for link in everyone:
                await link.process.wait()
        for link in everyone:
            self.kill(link.process)
            with trio.CancelScope(shield=True):
                await link.process.wait()
        self.links.clear()
        self.spares.clear()

    def cleanup(self) -> None:
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
