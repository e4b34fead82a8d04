"""Messages between the core and its gateway processes (pure data, converted with cattrs).

A gateway starts like a worker (``Hello`` with ``role="gateway"`` and its
one-time token), gets :class:`GatewayInit` and answers :class:`GatewayReady`.
Then, in any order:

- logins, with the name in its canonical form (:mod:`meshd.players.names`):
  ``Lookup`` -> ``AccountInfo`` (the gateway hashes the secret itself; a
  name the sign-up policy refuses, or a disabled account, is refused
  there, before any hashing), ``Enter`` -> ``Entered`` (the core stores a
  new name, finds or makes the player's entity, and ``Kick``\\ s an older
  session of it); ``Left`` when a session ends; ``Kick`` also when an
  operator disables, renames or deletes a connected player's account;
- every tick: the core sends ``Publish`` (the watched records that changed
  for this gateway, which input batches the tick took, failed inputs), and
  the gateway answers with one ``Inputs`` batch (what its players sent
  since the last one, and its counters).

Per-entity data travels as plain lists or packed arrays (``Publish``), so
one message costs one cattrs call however many players or entities it
carries.
"""

from __future__ import annotations

from typing import Any

import attrs

from meshd.common.config import GatewayConfig
from meshd.common.wire import Bulk
from meshd.plugin import Arg


@attrs.define
class GatewayInit:
    """Core -> gateway: who it is and what it serves."""

    gateway: int
    config: GatewayConfig
    rate: float
    world_size: float
    actions: list[str]
    """Actions a player may send (``Input.action``), the plugins' input handlers."""
    shapes: dict[str, dict[str, Arg]]
    """Per action, its declared arguments (``meshd.takes``): checked here, not in the world."""
    players: bool
    """Whether a plugin makes player entities (a login is refused otherwise)."""
    resume_key: bytes
    tick: int
    log_level: str
    log_json: bool | None
    listen: Bulk
    """``[family, host, port]`` of each socket to listen on (``SO_REUSEPORT``)."""


@attrs.define
class GatewayReady:
    gateway: int


@attrs.define
class Lookup:
    """Gateway -> core: the account of ``name``, to check a secret against."""

    request: int
    name: str
    address: str = ""
    """The client's address (sign-ups are limited per address)."""


@attrs.define
class AccountInfo:
    """Core -> gateway: ``found`` False for a name nobody has claimed; ``code`` not empty
    for a login refused before its secret is hashed (``Error(code, message)``)."""

    request: int
    found: bool
    salt: bytes = b""
    digest: bytes = b""
    kdf: str = ""
    code: str = ""
    message: str = ""


@attrs.define
class Enter:
    """Gateway -> core: ``name`` proved who it is; give it its entity.

    ``store`` is ``[salt, digest, kdf]`` to store for the name (a new name,
    or a secret rehashed with the configured parameters), else empty;
    ``new`` says the name was free when it was looked up.
    """

    request: int
    name: str
    session: int
    new: bool
    store: Bulk = attrs.field(factory=list)
    address: str = ""


@attrs.define
class Entered:
    """Core -> gateway: the player's entity, or why not (``code`` not empty)."""

    request: int
    entity: int = 0
    code: str = ""
    message: str = ""


@attrs.define
class Actions:
    """Core -> gateway: the plugins' code changed (``meshd reload``): what players may send
    from now on, as in :class:`GatewayInit`."""

    actions: list[str]
    shapes: dict[str, dict[str, Arg]]
    players: bool


@attrs.define
class Kick:
    """Core -> gateway: end session ``session`` of ``entity`` with ``Error(code, message)``."""

    entity: int
    session: int
    code: str
    message: str


@attrs.define
class Left:
    """Gateway -> core: the session ended (whatever the reason)."""

    entity: int
    session: int


@attrs.define
class Inputs:
    """Gateway -> core, once a tick: what its players sent, in the order it was read.

    ``items``: ``[entity, action, args, client_seq]``. ``stats``: the
    gateway's counters for ``inspect gateways``, in every tenth batch (empty
    in the others).
    """

    batch: int
    items: Bulk
    stats: dict[str, Any] = attrs.field(factory=dict)


@attrs.define
class Publish:
    """Core -> gateway after each tick: what its players' views are built from.

    ``ids`` (int64) and ``positions`` (float64 x, y, z per id), native byte
    order: every watched record that is new to this gateway, moved or
    changed since its last ``Publish``. ``states``: ``[id, kind, state]``
    for those new to it or whose state changed, ``state`` the CBOR of the
    field map. ``gone`` (int64): ids it no longer needs. ``batch``: the
    last of its ``Inputs`` the world has taken up to this tick.
    ``failed``: ``[entity, client_seq, action, text]`` inputs that failed
    in the plugin this tick.
    """

    tick: int
    batch: int
    ids: bytes
    positions: bytes
    states: Bulk
    gone: bytes
    failed: Bulk = attrs.field(factory=list)
    messages: Bulk = attrs.field(factory=list)
    """The plugins' messages for its players: ``[sender, player, x, y, radius, data]``
    (player 0: an announcement, to everyone if radius < 0, else to those within it)."""
    view: bool = True
    """Whether a view update is due (``gateway.view_every``)."""
    world: Any = None
    """The plugins' world state (per plugin, a field map) when it changed since this
    gateway's last ``Publish`` (or it has had none); None otherwise."""


CORE_TO_GATEWAY = (GatewayInit, AccountInfo, Entered, Kick, Publish, Actions)
GATEWAY_TO_CORE = (GatewayReady, Lookup, Enter, Left, Inputs)
