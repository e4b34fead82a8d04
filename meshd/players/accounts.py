"""Player accounts, sign-ups and resume tokens (pure).

The core keeps the accounts (name -> salt, hash, hashing parameters,
entity, disabled) in a :class:`Registry` and stores them; gateways hash
secrets, which is slow on purpose, so the core's tick thread never does. A
``Welcome`` carries a *resume token*: an HMAC of the name and entity under a
key the core makes at start and gives every gateway, so any gateway can
check a reconnect without the core and without hashing the secret again (a
gateway's players all coming back at once would otherwise cost seconds of
scrypt). A token is valid until the core stops.

Names are canonical (:mod:`meshd.players.names`) before they reach the
registry; a new one must also not look like an existing one. New names from
players are limited per address and overall by :class:`SignupLimits`
(operators' ``meshd accounts create`` is not).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections import deque
from collections.abc import Iterable

import attrs

from meshd.players.names import BadName, canonical_name, look_alike

SALT_BYTES = 16
RESUME_KEY_BYTES = 32


def scrypt_parameters(cost: int) -> str:
    """The hashing parameters stored with an account: ``"scrypt:N:r:p"`` with N = 2**cost."""
    return f"scrypt:{1 << cost}:8:1"


def hash_secret(secret: str, salt: bytes, kdf: str) -> bytes:
    """The secret hashed with an account's parameters: slow on purpose; call it in a thread.

    Raises ``ValueError`` for parameters it does not know.
    """
    algorithm, *numbers = kdf.split(":")
    if algorithm != "scrypt" or len(numbers) != 3:
        raise ValueError(f"unknown hashing parameters {kdf!r}")
    n, r, p = map(int, numbers)
    return hashlib.scrypt(
        secret.encode(), salt=salt, n=n, r=r, p=p, maxmem=132 * r * (n + p), dklen=32
    )


@attrs.define
class Account:
    salt: bytes
    digest: bytes
    entity: int
    kdf: str
    """How ``digest`` was made (:func:`scrypt_parameters`); "" for the configured cost."""
    disabled: bool = False
    """An operator disabled it: it cannot log in (``meshd accounts disable``)."""


def resume_token(key: bytes, name: str, entity: int) -> str:
    """The token that lets ``name`` come back to ``entity`` while this core runs."""
    message = f"{entity}\n{name}".encode()
    return f"{entity}.{hmac.new(key, message, hashlib.sha256).hexdigest()}"


def resumed_entity(key: bytes, name: str, token: str) -> int | None:
    """The entity ``token`` proves ``name`` may resume, or None if it proves nothing."""
    entity_text, _, _mac = token.partition(".")
    if not entity_text.isdigit() or len(entity_text) > 20:
        return None
    entity = int(entity_text)
    if not hmac.compare_digest(resume_token(key, name, entity), token):
        return None
    return entity


class AccountError(ValueError):
    """An account command that cannot be done (no such account, a name taken); says why."""


@attrs.define
class Registry:
    """Every account by its name, and which new names may still be claimed.

    Names are canonical (:func:`~meshd.players.names.canonical_name`), except
    ``unreachable`` ones: stored before names were canonical, whose canonical
    form is refused by the rule or is another account's. No login reaches
    those; an operator renames or deletes them.
    """

    accounts: dict[str, Account] = attrs.field(factory=dict)
    unreachable: dict[str, str] = attrs.field(factory=dict)
    """Stored name -> why no login reaches it."""
    _looks: dict[str, set[str]] = attrs.field(factory=dict)
    """:func:`~meshd.players.names.look_alike` -> the reachable names that look so."""

    @classmethod
    def load(cls, rows: Iterable[tuple[str, Account]]) -> tuple[Registry, list[tuple[str, str]]]:
        """The stored accounts, and the renames ``(stored, canonical)`` to write back.

        A stored name that is canonical stays as it is. One stored before
        names were canonical (``" dan "``, or in fullwidth letters) takes its
        canonical form when the rule allows it and no other account has it (a
        canonical name first, then the first by stored name); otherwise it
        stays unreachable.
        """
        stored = dict(rows)
        registry = cls()
        renames: list[tuple[str, str]] = []
        later: list[tuple[str, str]] = []
        for name in sorted(stored):
            try:
                canonical = canonical_name(name)
            except BadName as exc:
                registry.accounts[name] = stored[name]
                registry.unreachable[name] = f"the name rule refuses it: {exc}"
                continue
            if canonical == name:
                registry.add(name, stored[name])
            else:
                later.append((name, canonical))
        for name, canonical in later:
            if canonical in registry.accounts:
                registry.accounts[name] = stored[name]
                registry.unreachable[name] = (
                    f"its canonical form {canonical!r} is another account's name"
                )
            else:
                registry.add(canonical, stored[name])
                renames.append((name, canonical))
        return registry, renames

    def __contains__(self, name: str) -> bool:
        return name in self.accounts

    def __len__(self) -> int:
        return len(self.accounts)

    def get(self, name: str) -> Account | None:
        return self.accounts.get(name)

    def find(self, name: str) -> str:
        """The stored name an operator means by ``name``: as stored, else its canonical form."""
        if name in self.accounts:
            return name
        try:
            canonical = canonical_name(name)
        except BadName:
            canonical = ""
        if canonical in self.accounts:
            return canonical
        raise AccountError(f"no account {name!r}")

    def clash(self, name: str, *, keeping: str = "") -> str:
        """Why the canonical ``name`` cannot be claimed ("" if it can): an account has it, or
        one looks like it (``keeping``, an account being renamed, does not count)."""
        if name in self.accounts and name != keeping:
            return f"the name {name!r} is taken"
        others = sorted(self._looks.get(look_alike(name), set()) - {keeping})
        if others:
            return f"{name!r} looks like the existing name {others[0]!r}"
        return ""

    def new_name(self, raw: str, *, keeping: str = "") -> str:
        """``raw``'s canonical form, free to claim; :class:`AccountError` saying why not."""
        try:
            name = canonical_name(raw)
        except BadName as exc:
            raise AccountError(str(exc)) from None
        problem = self.clash(name, keeping=keeping)
        if problem:
            raise AccountError(problem)
        return name

    def add(self, name: str, account: Account) -> None:
        self.accounts[name] = account
        self._looks.setdefault(look_alike(name), set()).add(name)

    def remove(self, name: str) -> Account:
        account = self.accounts.pop(name)
        self.unreachable.pop(name, None)
        looks = self._looks.get(look_alike(name))
        if looks is not None:
            looks.discard(name)
            if not looks:
                del self._looks[look_alike(name)]
        return account

    def rename(self, old: str, new: str) -> Account:
        account = self.remove(old)
        self.add(new, account)
        return account


def address_key(address: str) -> str:
    """A client's address as sign-ups count it: an IPv4-mapped IPv6 address as IPv4."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed)


@attrs.define
class SignupLimits:
    """New names from players: at most ``per_address`` a ``window`` from one address and
    ``overall`` from all (sliding windows); ``trusted`` addresses are not limited."""

    per_address: int
    overall: int
    trusted: frozenset[str] = frozenset()
    window: float = 60.0
    _recent: deque[float] = attrs.field(factory=deque)
    _by_address: dict[str, deque[float]] = attrs.field(factory=dict)

    def refusal(self, address: str, now: float) -> str:
        """Why a new name from ``address`` is refused at ``now`` ("" if it is not)."""
        key = address_key(address)
        if key in self.trusted:
            return ""
        self._forget(now)
        mine = self._by_address.get(key, ())
        if len(mine) >= self.per_address:
            return (
                f"at most {self.per_address} new names a minute come from one address "
                f"(gateway.signup_per_address), and {key} has had them; try again in "
                f"{self._wait(mine, now)} s"
            )
        if len(self._recent) >= self.overall:
            return (
                f"at most {self.overall} new names a minute are taken in all "
                f"(gateway.signup_per_minute); try again in {self._wait(self._recent, now)} s"
            )
        return ""

    def charge(self, address: str, now: float) -> None:
        """A new name from ``address`` was claimed at ``now``."""
        key = address_key(address)
        if key not in self.trusted:
            self._recent.append(now)
            self._by_address.setdefault(key, deque()).append(now)

    def _forget(self, now: float) -> None:
        """Drop what left the window (memory: at most ``overall`` times a window)."""
        since = now - self.window
        while self._recent and self._recent[0] <= since:
            self._recent.popleft()
        for key in [key for key, times in self._by_address.items() if times[-1] <= since]:
            del self._by_address[key]
        for times in self._by_address.values():
            while times[0] <= since:
                times.popleft()

    def _wait(self, times: deque[float] | tuple[()], now: float) -> int:
        return max(1, int(times[0] + self.window - now + 0.999)) if times else 1
