"""Who may come in: connection limits per address and login backoff (pure).

A gateway asks its :class:`Door` before it reads a login, before it hashes
a secret, and tells it how each login ended. Addresses are grouped by
prefix (``gateway.address_prefix_v4`` / ``_v6``), so one host, or one IPv6
/64, counts as one. A refusal names the limit it hit (a :class:`~meshd.players.protocol.Refused`
for the gateway to raise).

- **Pending connections** (not logged in yet) have their own cap, overall
  and per address: a flood of idle connections from one address fills only
  that address's share, never the door for everyone else.
- **Players** per address are capped too.
- **Failed logins** are counted per address and per (name, address): after
  ``login_failures`` of them, each further attempt from there waits, twice
  as long after each failure (up to ``MAX_BACKOFF``), and is refused without
  hashing meanwhile. The name's owner, coming from elsewhere, is never made
  to wait for an attacker's failures.

Counts are per gateway process (the kernel spreads connections over them).
"""

from __future__ import annotations

import ipaddress
from typing import Any

import attrs

from meshd.common.config import GatewayConfig
from meshd.players.protocol import Refused

MAX_BACKOFF = 300.0
"""Seconds an address (or a name from it) waits at most after failed logins."""
FIRST_BACKOFF = 1.0
FORGET_AFTER = 900.0
"""Seconds without a failure after which an address's failures are forgotten."""
REMEMBERED = 100_000
"""Failure records kept at most per table (the oldest are forgotten first)."""


@attrs.define
class _Failures:
    count: int = 0
    last: float = 0.0

    def wait_until(self, free: int) -> float:
        if self.count < free:
            return 0.0
        return self.last + min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (self.count - free))


class Door:
    """Counts per address prefix: pending connections, players, failed logins."""

    def __init__(self, limits: GatewayConfig) -> None:
        self.limits = limits
        self.pending = 0
        self._pending: dict[str, int] = {}
        self._players: dict[str, int] = {}
        self._failures: dict[str, _Failures] = {}
        self._name_failures: dict[tuple[str, str], _Failures] = {}

    def group(self, host: str) -> str:
        """The address prefix ``host`` counts under (an IPv4-mapped IPv6 address as IPv4)."""
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return host  # not an IP address (a Unix socket in tests): itself
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        limits = self.limits
        prefix = limits.address_prefix_v4 if address.version == 4 else limits.address_prefix_v6
        return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))

    def arrive(self, group: str) -> Refused | None:
        """A connection from ``group`` opened: counted as pending, or refused (not counted)."""
        limits = self.limits
        if self.pending >= limits.max_pending:
            return Refused(
                "busy",
                f"{limits.max_pending} connections are logging in right now "
                "(gateway.max_pending): try again in a moment",
            )
        if self._pending.get(group, 0) >= limits.max_pending_per_address:
            return Refused(
                "address_pending",
                f"your address has {limits.max_pending_per_address} connections logging in "
                "already (gateway.max_pending_per_address)",
            )
        self.pending += 1
        self._pending[group] = self._pending.get(group, 0) + 1
        return None

    def admit(self, group: str) -> Refused | None:
        """A pending connection from ``group`` proved who it is: a player now, or refused
        (and still pending)."""
        limit = self.limits.max_players_per_address
        if self._players.get(group, 0) >= limit:
            return Refused(
                "address_players",
                f"your address has {limit} players in the world already "
                "(gateway.max_players_per_address)",
            )
        self._leave_pending(group)
        self._players[group] = self._players.get(group, 0) + 1
        return None

    def gone(self, group: str, *, admitted: bool) -> None:
        """A connection from ``group`` ended (``admitted``: as a player)."""
        if admitted:
            _take(self._players, group)
        else:
            self._leave_pending(group)

    def may_try(self, group: str, name: str, now: float) -> Refused | None:
        """Whether ``group`` may have a secret for ``name`` checked now."""
        free = self.limits.login_failures
        waits = [
            failures.wait_until(free)
            for failures in (self._failures.get(group), self._name_failures.get((name, group)))
            if failures is not None
        ]
        until = max(waits, default=0.0)
        if until > now:
            return Refused(
                "backoff",
                f"too many failed logins from your address: try again in {until - now:.0f} s",
            )
        return None

    def failed(self, group: str, name: str, now: float) -> None:
        """A secret from ``group`` for ``name`` was wrong (a success forgets nothing: an
        attacker's own account must not wipe its guesses)."""
        _note(self._failures, group, now)
        _note(self._name_failures, (name, group), now)

    def _leave_pending(self, group: str) -> None:
        self.pending -= 1
        _take(self._pending, group)


def _note(table: dict[Any, _Failures], key: Any, now: float) -> None:
    failures = table.get(key)
    if failures is None or now - failures.last > FORGET_AFTER:
        if len(table) >= REMEMBERED:
            oldest = sorted(table, key=lambda k: table[k].last)[: len(table) // 2]
            for stale in oldest:
                del table[stale]
        failures = table[key] = _Failures()
    failures.count += 1
    failures.last = now


def _take(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
