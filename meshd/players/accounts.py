"""Player accounts and resume tokens: hashing secrets and proving a reconnect (pure).

The core keeps the accounts (name -> salt, hash, hashing parameters,
entity) and stores them; gateways hash secrets, which is slow on purpose,
so the core's tick thread never does. A ``Welcome`` carries a *resume
token*: an HMAC of the name and entity under a key the core makes at start
and gives every gateway, so any gateway can check a reconnect without the
core and without hashing the secret again (a gateway's players all coming
back at once would otherwise cost seconds of scrypt). A token is valid
until the core stops.
"""

from __future__ import annotations

import hashlib
import hmac

import attrs

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
