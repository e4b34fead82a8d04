"""The players' port, shared by every gateway process (a shell: sockets only).

Each gateway process opens its own listening socket on the players'
address with ``SO_REUSEPORT``, and the kernel spreads new connections over
them by a hash of the client's address and port: no process hands
connections to another, and the spread was even in the players benchmark
(``docs/benchmarks.md``). The core *reserves* the address first: it checks
that nothing else holds it (a plain bind, so a busy port fails at start
with one clear line, whoever holds it) and then keeps a bound, never
listening ``SO_REUSEPORT`` socket for its whole life, so the port stays
meshd's while gateways die and start (the kernel lets only the same user
join a reuse group).

:func:`check_plaintext` keeps players' secrets off the network in clear: a
players' port on an address other than loopback serves TLS, or says
``gateway.allow_plaintext`` and is warned about at every start.
"""

from __future__ import annotations

import ipaddress
import socket

import attrs

from meshd.common.config import ConfigError, GatewayConfig

BACKLOG = 1024
"""Connections the kernel queues for one gateway before it accepts them."""


def _addresses(config: GatewayConfig) -> list[tuple[int, tuple[str, int]]]:
    host, port = config.address()
    found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return list(dict.fromkeys((family, address[:2]) for family, _, _, _, address in found))


def exposed(config: GatewayConfig) -> list[str]:
    """The addresses ``gateway.listen`` stands for that are not loopback (reachable from
    other machines, or all of them: ``0.0.0.0``, ``::``)."""
    try:
        hosts = [host for _, (host, _) in _addresses(config)]
    except OSError:
        hosts = [config.address()[0]]  # unresolvable: reserve() says so
    found = []
    for host in hosts:
        try:
            loopback = ipaddress.ip_address(host.partition("%")[0]).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            found.append(host)
    return found


def check_plaintext(config: GatewayConfig) -> list[str]:
    """Whether plain TCP may be served on ``gateway.listen``: the non-loopback addresses it
    would be served on (for a warning: ``gateway.allow_plaintext`` says so), or none.

    Raises :class:`ConfigError` (one line, naming the settings) for a plain
    port on an address other than loopback without ``gateway.allow_plaintext``.
    """
    if config.tls_cert:
        return []
    hosts = exposed(config)
    if hosts and not config.allow_plaintext:
        raise ConfigError(
            f"gateway.listen {config.listen} is reachable from other machines and the port "
            "would speak plain TCP, players' names and secrets in clear: set gateway.tls_cert "
            "and gateway.tls_key, or gateway.allow_plaintext = true to serve it anyway"
        )
    return hosts


def _reuse_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return sock


@attrs.define
class Reservation:
    """The players' address, held by the core: where the gateways listen."""

    addresses: list[tuple[int, str, int]] = attrs.field(factory=list)
    """(family, host, port) of each socket the gateways open."""
    holders: list[socket.socket] = attrs.field(factory=list)

    @property
    def address(self) -> str:
        """``HOST:PORT`` of the first address, as players would connect to it."""
        family, host, port = self.addresses[0]
        return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"

    def close(self) -> None:
        """Let the address go (the core is stopping)."""
        for holder in self.holders:
            holder.close()
        self.holders.clear()


def reserve(config: GatewayConfig) -> Reservation:
    """Take the players' address for this core.

    Raises :class:`ConfigError` naming the setting if the address is taken or
    cannot be bound.
    """
    reservation = Reservation()
    bound = reservation.addresses
    try:
        for family, (host, port) in _addresses(config):
            if port == 0 and bound:
                port = bound[0][2]  # every family on the one port picked first
            probe = socket.socket(family, socket.SOCK_STREAM)
            try:
                # SO_REUSEADDR so that connections still in TIME_WAIT do not count as
                # "in use"; a socket listening there (anyone's) still does.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind((host, port))  # without SO_REUSEPORT: fails if anyone listens there
                port = probe.getsockname()[1]
            finally:
                probe.close()
            holder = _reuse_socket(family)
            reservation.holders.append(holder)
            holder.bind((host, port))
            bound.append((int(family), host, port))
    except OSError as exc:
        reservation.close()
        raise ConfigError(
            f"cannot listen for players on {config.listen}: {exc.strerror or exc}; "
            'set gateway.listen (or serve --listen) to a free HOST:PORT, or "" for none'
        ) from None
    return reservation


def open_listeners(addresses: list[tuple[int, str, int]]) -> list[socket.socket]:
    """A gateway's own listening sockets on the reserved ``addresses`` (non-blocking)."""
    sockets = []
    for family, host, port in addresses:
        sock = _reuse_socket(socket.AddressFamily(family))
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets
