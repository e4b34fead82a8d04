"""``meshd accounts`` with no daemon running: the accounts in the data folder (blocking shell).

With a daemon running, ``meshd accounts`` asks it through the admin socket
(:mod:`meshd.ops.admin`; the core's side is :mod:`meshd.players.fleet`).
Without one, ``list``, ``create``, ``rename``, ``disable`` and ``enable``
change ``world.db`` here, under the same rules, holding the data folder's
lock as ``meshd serve`` does (a daemon cannot start meanwhile, and this
refuses to run beside one); ``create`` makes the data folder if there is
none yet, so that a closed world has its accounts before its first start.
``delete`` needs the daemon: the world's plugins decide what becomes of the
player's entity (``forget``).
"""

from __future__ import annotations

import os
from typing import Any

from meshd.common.config import Config
from meshd.ops.admin import ACCOUNT_WRITES, AdminRequest, admin_group
from meshd.ops.serve import load_accounts, lock_data_dir
from meshd.players.accounts import (
    SALT_BYTES,
    AccountError,
    Registry,
    hash_secret,
    scrypt_parameters,
)
from meshd.players.protocol import MAX_SECRET
from meshd.store.db import DB_NAME, Store
from meshd.store.schema import NO_ENTITY


def offline(config: Config, request: AdminRequest) -> Any:
    """Do ``request`` (an account view or command) on the data folder; the daemon's answer.

    Raises :class:`AccountError` saying why it cannot be done,
    :class:`~meshd.ops.serve.StartupError` when the folder is in use or not
    private, :class:`~meshd.store.schema.StoreError` for an unusable database.
    """
    if request.view != "accounts" and request.view not in ACCOUNT_WRITES:
        raise AccountError(f"{request.view} needs the running daemon")
    if request.view == "delete_account":
        raise AccountError(
            "deleting an account needs the running daemon (the world's plugins decide what "
            "becomes of the player's entity): start meshd serve and delete it then"
        )
    data_dir = config.data_dir
    if not data_dir.is_dir() and request.view != "create_account":
        raise AccountError(f"there is no data folder {data_dir} (data.dir, or --data)")
    try:
        group = admin_group(config.admin.group)
    except ValueError as exc:
        raise AccountError(str(exc)) from None
    lock = lock_data_dir(data_dir, None if group is None else group.gr_gid)
    try:
        store = Store(data_dir / DB_NAME, synchronous=config.data.synchronous)
        try:
            registry, _renames = load_accounts(store)
            return _do(config, store, registry, request)
        finally:
            store.close()
    finally:
        os.close(lock)


def _do(config: Config, store: Store, registry: Registry, request: AdminRequest) -> Any:
    view, raw = request.view, request.name
    if view == "accounts":
        return [
            {
                "name": name,
                "entity": account.entity
                if account.entity != NO_ENTITY and store.row(account.entity) is not None
                else None,
                "online": False,
                "disabled": account.disabled,
                "note": registry.unreachable.get(name, ""),
            }
            for name, account in sorted(registry.accounts.items())
        ]
    if view == "create_account":
        name = registry.new_name(raw)
        if not 1 <= len(request.secret) <= MAX_SECRET:
            raise AccountError(f"a secret is 1-{MAX_SECRET} characters")
        kdf = scrypt_parameters(config.gateway.hash_cost)
        salt = os.urandom(SALT_BYTES)
        store.put_account(name, salt, hash_secret(request.secret, salt, kdf), kdf)
        return {"name": name}
    if view == "rename_account":
        old = registry.find(raw)
        new = registry.new_name(request.new_name, keeping=old)
        if new == old:
            raise AccountError(f"the account is called {old!r} already")
        store.rename_account(old, new)
        entity = registry.accounts[old].entity
        return {"name": new, "was": old, "entity": entity or None, "kicked": False}
    name = registry.find(raw)
    disabled = view == "disable_account"
    store.disable_account(name, disabled)
    return {"name": name, "disabled": disabled, "kicked": False}
