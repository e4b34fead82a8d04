"""The core's side of the players: gateway processes, accounts, player entities (trio shell).

:class:`Gateways` is what the tick loop calls :class:`~meshd.mesh.core.Players`.
It starts ``gateway.processes`` gateway processes (:mod:`meshd.players.gateway`)
through the supervisor, hands each the listening sockets, and replaces one
that dies (within the restart budget); the dead one's players get a
``leave`` and come back through any gateway with their resume tokens.

The tick thread never touches a client socket and never hashes a secret.
Per tick it takes every gateway's ``Inputs`` batch that has arrived (in
entity order, so the world's inputs do not depend on which gateway read
them), makes new players' entities, watches the cells around every player,
and sends each gateway one ``Publish`` (the records its players can see
that changed, each state encoded once). Accounts stay here, with the store:
a gateway asks for a name's salt and hash (or learns why the login is
refused: sign-ups closed or limited, the account disabled), and the core
stores a new name before its player is welcomed. Operators' account
commands (``meshd accounts``, through the admin socket) change them here
too: a connected player whose account is disabled, renamed or deleted is
kicked; a deleted player's entity gets ``forget``.

It is long because it is the one owner of everything the core knows of
players (processes, sessions, accounts, their inputs and views), and each
of those is short.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import numpy as np
import trio

from meshd.common.config import Config, GatewayConfig
from meshd.common.links import receive_frame
from meshd.common.log import OncePer, error_site, get_logger
from meshd.common.wire import FrameDecoder, WireError, decode_message, encode_message, frame
from meshd.mesh.messages import WorldParams
from meshd.mesh.plugins import INPUT_PREFIX, PluginSet
from meshd.mesh.replication import Replication
from meshd.mesh.supervisor import Supervisor, WorkerFailed
from meshd.players.accounts import (
    RESUME_KEY_BYTES,
    SALT_BYTES,
    Account,
    AccountError,
    Registry,
    SignupLimits,
    address_key,
    hash_secret,
    scrypt_parameters,
)
from meshd.players.interest import watch_cells
from meshd.players.journal import Journal
from meshd.players.messages import (
    GATEWAY_TO_CORE,
    AccountInfo,
    Actions,
    Enter,
    Entered,
    GatewayInit,
    GatewayReady,
    Inputs,
    Kick,
    Left,
    Lookup,
    Publish,
)
from meshd.players.names import BadName, canonical_name
from meshd.players.ports import Reservation
from meshd.players.protocol import MAX_SECRET, Refused
from meshd.players.views import Publisher
from meshd.plugin import FORGET, GATEWAY, JOIN, LEAVE, WorldBuilder
from meshd.store.db import Store
from meshd.store.schema import NO_ENTITY, StoreError

MODULE = "meshd.players.gateway"
GATEWAY_FRAME_CAP = 1 << 28
"""A gateway is trusted; one tick's ``Inputs`` of many players may be large."""
UNANSWERED_PUBLISHES = 40
"""``Publish`` messages a gateway may leave unanswered (two seconds of ticks at 20 Hz)
before it counts as hung and is replaced."""


@attrs.define(eq=False)
class GatewayLink:
    """One live gateway process."""

    slot: int
    epoch: int
    pid: int
    process: trio.Process
    stream: trio.SocketStream
    decoder: FrameDecoder
    outbox: trio.MemorySendChannel[bytes]
    sessions: dict[int, int] = attrs.field(factory=dict)
    """Its players: entity -> session."""
    batches: list[Inputs] = attrs.field(factory=list)
    """``Inputs`` received and not yet taken by a tick."""
    taken: int = 0
    """The last batch a tick has taken."""
    published_batch: int = 0
    """The last batch taken by the last committed tick: its views acknowledge it."""
    failed: list[list[Any]] = attrs.field(factory=list)
    messages: list[list[Any]] = attrs.field(factory=list)
    """Plugins' messages for its players, for the next ``Publish``."""
    world: dict[str, Any] | None = None
    """The world state it was last sent."""
    unanswered: int = 0
    """``Publish`` messages sent and not yet answered by ``Inputs``."""
    stats: dict[str, Any] = attrs.field(factory=dict)
    cells: list[list[int]] = attrs.field(factory=list)
    """The cells around its players, as of the last committed tick."""
    cpu: float = 0.0
    """Cores the process used lately (from its own CPU clock, over a second or more)."""
    _cpu_mark: tuple[float, float] | None = None

    def measure_cpu(self, now: float) -> None:
        cpu_s = self.stats.get("cpu_s", 0.0)
        if self._cpu_mark is None:
            self._cpu_mark = (now, cpu_s)
        elif now - self._cpu_mark[0] >= 1.0:
            self.cpu = (cpu_s - self._cpu_mark[1]) / (now - self._cpu_mark[0])
            self._cpu_mark = (now, cpu_s)

    def send(self, message: Any) -> None:
        """Queue ``message`` for the gateway (a link that is closing drops it)."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            self.outbox.send_nowait(frame(encode_message(message)))

    def publish(self, publish: Publish) -> None:
        """Send a tick's ``Publish``; kill a gateway that stopped answering them.

        Every ``Publish`` is answered by one ``Inputs``; a gateway that falls
        ``UNANSWERED_PUBLISHES`` behind is hung or overloaded, and its players
        are better off reconnecting to another (it is replaced).
        """
        self.unanswered += 1
        if self.unanswered == UNANSWERED_PUBLISHES + 1:
            get_logger(component="gateways").warning(
                "gateway stopped answering; killed, its players reconnect",
                gateway=self.slot,
                pid=self.pid,
                unanswered=UNANSWERED_PUBLISHES,
            )
        if self.unanswered > UNANSWERED_PUBLISHES:
            Supervisor.kill(self.process)
            return
        self.send(publish)


class AccountStore:
    """The accounts' writes to world.db, each in a thread under the lock every store call
    takes; a write that fails raises :class:`AccountError` saying why."""

    def __init__(self, store: Store, lock: trio.CapacityLimiter) -> None:
        self.store = store
        self.lock = lock

    async def put(self, name: str, salt: bytes, digest: bytes, kdf: str) -> None:
        await self._run(self.store.put_account, name, salt, digest, kdf)

    async def rename(self, old: str, new: str) -> None:
        await self._run(self.store.rename_account, old, new)

    async def disable(self, name: str, disabled: bool) -> None:
        await self._run(self.store.disable_account, name, disabled)

    async def delete(self, name: str) -> None:
        await self._run(self.store.delete_account, name)

    async def _run(self, function: Callable[..., None], *args: Any) -> None:
        try:
            await trio.to_thread.run_sync(function, *args, limiter=self.lock)
        except (KeyError, sqlite3.Error, StoreError, OSError) as exc:
            raise AccountError(f"the database refused it: {exc}") from None


@attrs.define(eq=False)
class _Join:
    """A player waiting for the tick boundary that creates its entity."""

    name: str
    done: trio.Event = attrs.field(factory=trio.Event)
    entity: int = 0
    error: str = ""


class Gateways:
    """Gateway processes and everything the core keeps of the players."""

    def __init__(
        self,
        config: Config,
        plugins: PluginSet,
        world: WorldParams,
        replication: Replication,
        accounts: Registry,
        supervisor: Supervisor,
        reservation: Reservation,
        store: AccountStore,
        journal: Journal | None = None,
    ) -> None:
        self.config = config.gateway
        self.log_config = config.log
        self.rate = config.tick.rate
        self.restart_window = config.supervise.restart_window
        self.max_restarts = config.supervise.max_restarts
        self.processes = self.config.processes or _default_processes()
        self.plugins = plugins
        self.world = world
        self.replication = replication
        self.accounts = accounts
        self.supervisor = supervisor
        self.reservation = reservation
        self.store = store
        self.signups = SignupLimits(
            self.config.signup_per_address,
            self.config.signup_per_minute,
            frozenset(address_key(address) for address in self.config.signup_trusted),
        )
        self.journal = journal
        self.address = ""
        """The players' address, once the gateways accept players on it."""
        self.resume_key = os.urandom(RESUME_KEY_BYTES)
        self.links: dict[int, GatewayLink] = {}
        self.down: dict[int, str] = {}
        """Gateway slots given up on (restart budget spent): slot -> why."""
        self.restarts: dict[int, list[float]] = {}
        self.players: dict[int, tuple[int, int]] = {}
        """Entity -> (gateway slot, session) of every player in the world."""
        self.new_claims: list[tuple[str, int]] = []
        """(name, entity) of players' new entities, for the next persisted tick."""
        self._claiming: set[str] = set()
        self._joins: list[_Join] = []
        self._inputs: list[list[Any]] = []
        """JOIN/LEAVE of the core's own making, in order: [entity, action, args, 0]."""
        self._in_flight: dict[int, tuple[int, int, str, int]] = {}
        """Input event seq -> (entity, client seq, action, gateway) for the tick in flight."""
        self._publisher = Publisher(lambda kind, state: self.plugins.codecs[kind].to_dict(state))
        self._views_due: int | None = None
        self._tick = replication.tick
        self._epochs: dict[int, int] = {}
        self._input_errors = OncePer()
        self._stopping = False
        self.refused: dict[str, int] = {}
        """Logins the core refused, by error code (the gateways count their own)."""
        self._nursery: trio.Nursery
        self._log = get_logger(component="gateways")

    # -- processes ---------------------------------------------------------

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start every gateway process, then keep them running until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                async with trio.open_nursery() as starting:
                    for slot in range(self.processes):
                        starting.start_soon(self._start, slot)
                self.address = self.reservation.address
                self._log.info(
                    "gateway listening",
                    address=self.address,
                    tls=bool(self.config.tls_cert),
                    processes=len(self.links),
                )
                task_status.started(self.address)
        finally:
            with trio.CancelScope(shield=True):
                await self.stop()

    async def _start(self, slot: int) -> None:
        """Start the gateway process of ``slot`` and serve its link in the background."""
        epoch = self._epochs[slot] = self._epochs.get(slot, 0) + 1
        process, stream, hello, decoder = await self.supervisor.spawn_child(
            MODULE, "gateway", slot, epoch
        )
        decoder.max_frame = GATEWAY_FRAME_CAP
        send, receive = trio.open_memory_channel[bytes](math.inf)
        link = GatewayLink(slot, epoch, hello.pid, process, stream, decoder, send)
        actions = self._actions()
        init = GatewayInit(
            gateway=slot,
            config=self.config,
            rate=self.rate,
            world_size=self.world.size,
            actions=actions.actions,
            shapes=actions.shapes,
            players=actions.players,
            resume_key=self.resume_key,
            tick=self.replication.tick,
            log_level=self.log_config.level,
            log_json=self.log_config.json,
            listen=[list(address) for address in self.reservation.addresses],
        )
        try:
            await stream.send_all(frame(encode_message(init)))
            decode_message(await receive_frame(stream, decoder), (GatewayReady,))
        except (EOFError, WireError, trio.BrokenResourceError) as exc:
            Supervisor.kill(process)
            raise WorkerFailed(slot, f"gateway did not start: {exc!r}") from None
        self.links[slot] = link
        self._log.info("gateway started", gateway=slot, epoch=epoch, pid=link.pid)
        self._nursery.start_soon(self._serve_link, link, receive)

    def _actions(self) -> Actions:
        plugins = self.plugins
        return Actions(
            plugins.input_actions(), plugins.input_shapes, plugins.new_player is not None
        )

    def adopt(self, plugins: PluginSet) -> None:
        """The plugins' code changed (``meshd reload``): serve players with ``plugins`` from
        the next tick; every gateway learns the actions and argument shapes now."""
        self.plugins = plugins
        actions = self._actions()
        for link in self.links.values():
            link.send(actions)

    async def _serve_link(
        self, link: GatewayLink, outbox: trio.MemoryReceiveChannel[bytes]
    ) -> None:
        reason = "closed its socket (exited?)"
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, link, outbox, nursery.cancel_scope)
                try:
                    while True:
                        body = await receive_frame(link.stream, link.decoder)
                        self._received(link, decode_message(body, GATEWAY_TO_CORE))
                except EOFError:
                    pass
                except WireError as exc:
                    reason = f"sent a bad frame: {exc}"
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._lost(link, reason)

    @staticmethod
    async def _write(
        link: GatewayLink, outbox: trio.MemoryReceiveChannel[bytes], done: trio.CancelScope
    ) -> None:
        try:
            async for data in outbox:
                await link.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()

    async def _lost(self, link: GatewayLink, reason: str) -> None:
        """A gateway died: its players leave; start its successor within the restart budget."""
        if self.links.get(link.slot) is not link:
            return
        del self.links[link.slot]
        Supervisor.kill(link.process)
        await link.stream.aclose()
        self.supervisor.reap(link.process)
        self._publisher.forget(link.slot)
        for entity in list(link.sessions):
            if self.players.get(entity) == (link.slot, link.sessions[entity]):
                del self.players[entity]
                self._player_input(entity, LEAVE)
        if self._stopping:
            return
        self._log.warning(
            "gateway failed; its players reconnect",
            gateway=link.slot,
            epoch=link.epoch,
            players=len(link.sessions),
            reason=reason,
        )
        now = trio.current_time()
        history = self.restarts.setdefault(link.slot, [])
        history[:] = [t for t in history if now - t < self.restart_window]
        if len(history) >= self.max_restarts:
            self.down[link.slot] = f"restarted {len(history)} times in {self.restart_window:g} s"
            self._log.error("gateway slot given up", gateway=link.slot, why=self.down[link.slot])
            return
        history.append(now)
        try:
            await self._start(link.slot)
        except WorkerFailed as failure:
            self.down[link.slot] = failure.reason
            self._log.error("gateway cannot be restarted", gateway=link.slot, why=failure.reason)

    async def stop(self) -> None:
        """Close every gateway's link (they exit on EOF), then kill what is left."""
        self._stopping = True
        links = list(self.links.values())
        for link in links:
            await link.stream.aclose()
        with trio.move_on_after(2.0):
            for link in links:
                await link.process.wait()
        for link in links:
            Supervisor.kill(link.process)
            await link.process.wait()

    def _received(self, link: GatewayLink, message: Any) -> None:
        if isinstance(message, Inputs):
            link.unanswered = max(0, link.unanswered - 1)
            link.batches.append(message)
            if message.stats:
                link.stats = message.stats
                link.measure_cpu(time.monotonic())
        elif isinstance(message, Lookup):
            link.send(self._account_info(message))
        elif isinstance(message, Enter):
            self._nursery.start_soon(self._enter, link, message)
        elif isinstance(message, Left):
            if link.sessions.get(message.entity) == message.session:
                del link.sessions[message.entity]
            if self.players.get(message.entity) == (link.slot, message.session):
                del self.players[message.entity]
                self._player_input(message.entity, LEAVE)

    # -- logins ------------------------------------------------------------

    def _account_info(self, lookup: Lookup) -> AccountInfo:
        """The account to check a secret against, or why the login is refused before that."""
        account = self.accounts.get(lookup.name)
        if account is None:
            code, why = self._signup_refusal(lookup.name, lookup.address)
            return AccountInfo(lookup.request, False, code=code, message=why)
        if account.disabled:
            return AccountInfo(
                lookup.request, True, code="disabled", message=_disabled(lookup.name)
            )
        return AccountInfo(lookup.request, True, account.salt, account.digest, account.kdf)

    def _signup_refusal(self, name: str, address: str) -> tuple[str, str]:
        """``(code, message)`` refusing ``name`` as a new name from ``address``, or ``("", "")``."""
        if self.config.signup == "closed":
            return "closed", (
                f"sign-ups are closed: only names an operator created log in, and {name!r} "
                "is not one of them"
            )
        try:
            problem = "" if canonical_name(name) == name else f"{name!r} is not canonical"
        except BadName as exc:
            problem = str(exc)
        problem = problem or self.accounts.clash(name)
        if problem:
            return "bad_name", problem
        limit = self.signups.refusal(address, trio.current_time())
        return ("signup_limit", limit) if limit else ("", "")

    async def _enter(self, link: GatewayLink, enter: Enter) -> None:
        try:
            entity = await self._entity_for(enter)
        except Refused as refused:
            self.refused[refused.code] = self.refused.get(refused.code, 0) + 1
            link.send(Entered(enter.request, code=refused.code, message=refused.message))
            return
        if self.links.get(link.slot) is not link:
            return  # the gateway died meanwhile; the player will come back
        if len(self.players) >= self.config.max_clients and entity not in self.players:
            link.send(
                Entered(
                    enter.request,
                    code="full",
                    message=f"the server takes {self.config.max_clients} players",
                )
            )
            return
        previous = self.players.get(entity)
        if previous is not None:
            old = self.links.get(previous[0])
            if old is not None:
                old.sessions.pop(entity, None)
                old.send(Kick(entity, previous[1], "replaced", "you logged in from somewhere else"))
        else:
            # (A player taking over its own session stays in the world: no leave, no join.)
            self._player_input(entity, JOIN)
        self.players[entity] = (link.slot, enter.session)
        link.sessions[entity] = enter.session
        link.send(Entered(enter.request, entity))

    async def _entity_for(self, enter: Enter) -> int:
        """The entity of ``enter.name`` (made at the next tick if it has none); stores
        what the gateway hashed. Raises :class:`Refused`."""
        name = enter.name
        if name in self._claiming:
            raise Refused("busy", f"the name {name!r} is being claimed right now")
        self._claiming.add(name)
        try:
            account = self.accounts.get(name)
            if account is not None and account.disabled:
                raise Refused("disabled", _disabled(name))
            if enter.new and account is not None:
                raise Refused("busy", f"the name {name!r} was claimed a moment ago")
            if not enter.new and account is None:
                raise Refused("auth", f"no account {name!r}")
            if enter.new:
                code, why = self._signup_refusal(name, enter.address)
                if code:
                    raise Refused(code, why)
                # Charged now, so that logins at once from one address cannot all pass.
                self.signups.charge(enter.address, trio.current_time())
            if enter.store:
                salt, digest, kdf = enter.store
                try:
                    await self.store.put(name, salt, digest, kdf)
                except Exception as exc:
                    self._log.error("cannot store a player's secret", name=name, error=str(exc))
                    if account is None:
                        raise Refused(
                            "server_error", "the server cannot store new names right now"
                        ) from None
                else:
                    if account is None:
                        account = Account(salt, digest, NO_ENTITY, kdf)
                        self.accounts.add(name, account)
                    else:
                        account.salt, account.digest, account.kdf = salt, digest, kdf
            assert account is not None
            if account.entity in self.replication.records:
                return account.entity
            # its entity is gone (or never reached the database): a new one
            join = _Join(name)
            self._joins.append(join)
            await join.done.wait()
            if join.error:
                raise Refused("server_error", join.error)
            account.entity = join.entity
            self.new_claims.append((name, join.entity))
            self._log.info(
                "new player entity", name=name, entity=join.entity, address=enter.address or None
            )
            return join.entity
        finally:
            self._claiming.discard(name)

    def _player_input(self, entity: int, action: str) -> None:
        if self.plugins.accepts(action):
            self._inputs.append([entity, action, {}, 0])

    # -- operators' account commands (the admin socket checked who asks) ----

    def accounts_view(self) -> list[dict[str, Any]]:
        """Every account, for ``meshd accounts list``."""
        records = self.replication.records
        rows = []
        for name, account in sorted(self.accounts.accounts.items()):
            entity = account.entity if account.entity in records else None
            rows.append(
                {
                    "name": name,
                    "entity": entity,
                    "online": entity is not None and entity in self.players,
                    "disabled": account.disabled,
                    "note": self.accounts.unreachable.get(name, ""),
                }
            )
        return rows

    async def create_account(self, raw: str, secret: str, peer: dict[str, int]) -> dict[str, Any]:
        """A new account (its entity is made at its first login), whatever the sign-up policy."""
        name = self.accounts.new_name(raw)
        if not 1 <= len(secret) <= MAX_SECRET:
            raise AccountError(f"a secret is 1-{MAX_SECRET} characters")
        with self._holding(name):
            kdf = scrypt_parameters(self.config.hash_cost)
            salt = os.urandom(SALT_BYTES)
            digest = await trio.to_thread.run_sync(hash_secret, secret, salt, kdf)
            name = self.accounts.new_name(raw)  # still free after the hashing?
            await self.store.put(name, salt, digest, kdf)
            self.accounts.add(name, Account(salt, digest, NO_ENTITY, kdf))
        self._log.warning("operator created an account", name=name, **peer)
        return {"name": name}

    async def rename_account(self, raw: str, raw_new: str, peer: dict[str, int]) -> dict[str, Any]:
        """Give an account another name; its entity stays, its connected player is kicked."""
        old = self.accounts.find(raw)
        new = self.accounts.new_name(raw_new, keeping=old)
        if new == old:
            raise AccountError(f"the account is called {old!r} already")
        with self._holding(old), self._holding(new):
            await self.store.rename(old, new)
        account = self.accounts.rename(old, new)
        # The link to its entity is written under the new name with the next tick (a link
        # under the old name still on its way to the database then matches nothing).
        self.new_claims = [(new if name == old else name, e) for name, e in self.new_claims]
        if account.entity != NO_ENTITY:
            self.new_claims.append((new, account.entity))
        kicked = self._end_session(
            account.entity, "renamed", f"an operator renamed your account to {new!r}"
        )
        self._log.warning(
            "operator renamed an account", name=new, was=old, entity=account.entity, **peer
        )
        return {"name": new, "was": old, "entity": self._entity_of(account), "kicked": kicked}

    async def disable_account(
        self, raw: str, disabled: bool, peer: dict[str, int]
    ) -> dict[str, Any]:
        """Disable (its connected player is kicked) or enable an account again."""
        name = self.accounts.find(raw)
        account = self.accounts.accounts[name]
        with self._holding(name):
            await self.store.disable(name, disabled)
        account.disabled = disabled
        kicked = disabled and self._end_session(account.entity, "disabled", _disabled(name))
        self._log.warning(
            "operator disabled an account" if disabled else "operator enabled an account",
            name=name,
            **peer,
        )
        return {"name": name, "disabled": disabled, "kicked": kicked}

    async def delete_account(self, raw: str, peer: dict[str, int]) -> dict[str, Any]:
        """Delete an account: its player is kicked, its entity gets ``leave`` then ``forget``
        (the plugin decides what becomes of it; without a handler it is despawned), and the
        name is free again."""
        name = self.accounts.find(raw)
        with self._holding(name):
            await self.store.delete(name)
        account = self.accounts.remove(name)
        self.new_claims = [(n, entity) for n, entity in self.new_claims if n != name]
        kicked = self._end_session(account.entity, "deleted", "an operator deleted your account")
        entity = self._entity_of(account)
        if entity is not None:
            self._player_input(entity, FORGET)
        self._log.warning("operator deleted an account", name=name, entity=entity, **peer)
        return {"name": name, "entity": entity, "kicked": kicked}

    @contextlib.contextmanager
    def _holding(self, name: str) -> Iterator[None]:
        """Keep logins off ``name`` while an operator changes it (refused if one is under way)."""
        if name in self._claiming:
            raise AccountError(f"a login of {name!r} is under way; try again")
        self._claiming.add(name)
        try:
            yield
        finally:
            self._claiming.discard(name)

    def _entity_of(self, account: Account) -> int | None:
        return account.entity if account.entity in self.replication.records else None

    def _end_session(self, entity: int, code: str, message: str) -> bool:
        """Kick the player of ``entity`` (it gets ``leave``); whether one was connected."""
        where = self.players.pop(entity, None)
        if where is None:
            return False
        link = self.links.get(where[0])
        if link is not None:
            link.sessions.pop(entity, None)
            link.send(Kick(entity, where[1], code, message))
        self._player_input(entity, LEAVE)
        return True

    # -- the tick loop's side ---------------------------------------------

    def before_tick(self, tick: int) -> None:
        """Players' inputs, new players' entities and join/leave into the world."""
        repl = self.replication
        joins, self._joins = self._joins, []
        plugin = self.plugins.new_player
        entities = []
        for join in joins:
            assert plugin is not None and plugin.new_player is not None
            builder = WorldBuilder(self.plugins, self.world, first_id=repl.next_id, tick=tick)
            builder.settings = self.plugins.settings.get(plugin.name)
            try:
                plugin.new_player(join.name, builder)
                if len(builder.records) != 1:
                    raise ValueError(f"spawned {len(builder.records)} entities instead of one")
            except Exception as exc:
                join.error = f"plugin {plugin.name}: new_player failed: {exc}"
                self._log.error("new player refused", name=join.name, error=join.error)
            else:
                repl.add_entity(builder.records[0])
                entities.append(builder.records[0])
                join.entity = builder.records[0][0]
            join.done.set()
        inputs: list[tuple[list[Any], int]] = [(item, -1) for item in self._inputs]
        self._inputs = []
        for slot, link in sorted(self.links.items()):
            for batch in link.batches:
                inputs.extend((item, slot) for item in batch.items)
                link.taken = batch.batch
            link.batches.clear()
        # One order whichever gateway read them: by entity, then as each player sent them.
        inputs.sort(key=lambda pair: pair[0][0])
        events = []
        self._in_flight = {}
        for seq, ((entity, action, args, client_seq), slot) in enumerate(inputs):
            events.append([entity, GATEWAY, seq, INPUT_PREFIX + action, args])
            self._in_flight[seq] = (entity, client_seq, action, slot)
        repl.inject(events)  # inputs for a player entity that is gone are dropped
        if self.journal is not None:
            self.journal.record(tick, entities, events)

    def inputs_failed(self, failures: list[tuple[int, int, str, str]]) -> None:
        """Tell players whose inputs of the tick just committed failed in the plugin.

        ``failures``: (entity, input event seq, where, error) from the commit.
        The input was undone; the connection stays. Each distinct failure is
        logged once (where it failed, for the plugin's author).
        """
        for entity, seq, where, text in failures:
            _entity, client_seq, action, slot = self._in_flight.get(seq, (entity, 0, "?", -1))
            link = self.links.get(slot)
            if link is not None and client_seq:
                link.failed.append([entity, client_seq, action, text])
            if self._input_errors.first((action, *error_site(where, text))):
                self._log.info(
                    "input failed and was undone (logged once per place)",
                    entity=entity,
                    action=action,
                    where=where or None,
                    error=text,
                )

    def deliver(self, messages: list[list[Any]]) -> None:
        """Each message to the gateways that may have its players: a ``tell`` to its
        player's gateway only, an ``announce`` to every gateway (it picks who is near)."""
        for sender, _seq, player, x, y, radius, data in messages:
            item = [sender, player, x, y, radius, data]
            if player:
                where = self.players.get(player)
                link = None if where is None else self.links.get(where[0])
                if link is not None:
                    link.messages.append(item)
            else:
                for link in self.links.values():
                    link.messages.append(item)

    def after_tick(self, tick: int) -> None:
        """Watch the cells around players (from the next step on); a view update is due."""
        repl = self.replication
        records = repl.records
        for entity, (slot, session) in list(self.players.items()):
            if entity not in records:  # a plugin despawned it; logging in again makes a new one
                del self.players[entity]
                link = self.links.get(slot)
                if link is not None:
                    link.sessions.pop(entity, None)
                    link.send(
                        Kick(entity, session, "gone", "your entity left the world; log in again")
                    )
        watched: set[tuple[int, int]] = set()
        for link in self.links.values():
            link.cells = watch_cells(
                np.array(
                    [records[e][2:4] for e in link.sessions if e in records], dtype=np.float64
                ).reshape(-1, 2),
                self.config.view_radius,
                repl.cell_size,
            )
            watched.update(map(tuple, link.cells))
        repl.set_watch([list(cell) for cell in sorted(watched)])
        for link in self.links.values():
            link.published_batch = link.taken
        self._tick = tick
        self._views_due = None if tick % self.config.view_every else tick

    def send_views(self) -> None:
        """Send every gateway what changed in its players' cells at the last committed tick.

        The tick loop calls this while the workers simulate the next tick.
        """
        repl = self.replication
        records, cells = repl.records, repl.cells
        due, self._views_due = self._views_due is not None, None
        world = repl.world_fields()
        for slot, link in self.links.items():
            watched = [i for cx, cy in link.cells for i in cells.get((cx, cy), ())]
            ids, positions, states, gone = self._publisher.publish(
                slot, self._tick, records, watched
            )
            failed, link.failed = link.failed, []
            messages, link.messages = link.messages, []
            changed = world if world and link.world != world else None
            link.world = world
            link.publish(
                Publish(
                    tick=self._tick,
                    batch=link.published_batch,
                    ids=ids,
                    positions=positions,
                    states=states,
                    gone=gone,
                    failed=failed,
                    messages=messages,
                    view=due,
                    world=changed,
                )
            )

    def take_claims(self) -> list[tuple[str, int]]:
        claims, self.new_claims = self.new_claims, []
        return claims

    def status(self) -> dict[str, Any]:
        stats = [link.stats for link in self.links.values()]
        refused = dict(self.refused)
        kicked: dict[str, int] = {}
        for stat in stats:
            for code, count in stat.get("refused", {}).items():
                refused[code] = refused.get(code, 0) + count
            for code, count in stat.get("kicked", {}).items():
                kicked[code] = kicked.get(code, 0) + count
        return {
            "address": self.address,
            "tls": bool(self.config.tls_cert),
            "processes": len(self.links),
            "players": len(self.players),
            "connections": sum(stat.get("connections", 0) for stat in stats),
            "refused": refused,
            "kicked": kicked,
            "bytes_sent": sum(stat.get("bytes_sent", 0) for stat in stats),
        }

    def gateways_view(self) -> list[dict[str, Any]]:
        """One row per gateway slot, for ``inspect gateways``."""
        rows = []
        for slot in sorted({*self.links, *self.down}):
            link = self.links.get(slot)
            stats = link.stats if link is not None else {}
            rows.append(
                {
                    "id": slot,
                    "state": "running" if link is not None else f"down: {self.down[slot]}",
                    "pid": link.pid if link is not None else None,
                    "epoch": link.epoch if link is not None else None,
                    "players": len(link.sessions) if link is not None else 0,
                    "conns": stats.get("connections", 0),
                    "cpu": round(link.cpu, 3) if link is not None else 0.0,
                    "inputs": sum(len(b.items) for b in link.batches) if link else 0,
                    "link_q": link.outbox.statistics().current_buffer_used if link else 0,
                    "backlog": stats.get("backlog", 0),
                    "restarts": len(self.restarts.get(slot, [])),
                }
            )
        return rows


def _disabled(name: str) -> str:
    return f"the account {name!r} is disabled by an operator"


def _default_processes() -> int:
    """One gateway per two CPUs, at least one: the workers and the core need the rest."""
    return max(1, (os.cpu_count() or 1) // 2)


def cell_size(config: GatewayConfig) -> float:
    """Side of the interest cells: the view radius (a view spans at most 3 x 3 cells)."""
    return math.ceil(config.view_radius)
