"""Open to the Internet: names people can trust, the sign-up policy, operators' account
commands, and who may use the admin socket (issue #14, parts 5, 6 and 8)."""

from __future__ import annotations

import grp
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import TAVERN, meshd, start_daemon, write_config
from test_players import gateway_of

from meshd import client
from meshd.ops import admin
from meshd.players.accounts import Account, Registry, SignupLimits
from meshd.players.names import BadName, canonical_name, look_alike

# -- the rule, pure ----------------------------------------------------------

FULLWIDTH_ADA = "\uff41\uff44\uff41"
CYRILLIC_A = "\u0430"

NAMES = [
    # as typed, canonical form (or the words of the refusal)
    (FULLWIDTH_ADA, "ada"),
    ("  ada\t", "ada"),
    ("\u3000ada", "ada"),  # an ideographic space is trimmed too
    ("\ufb01sh", "fish"),  # a ligature is its letters
    ("Zo\u00eb", "Zo\u00eb"),
    ("Zoe\u0308", "Zo\u00eb"),  # composed
    ("ada_01.x-y", "ada_01.x-y"),
    ("\u0418\u0432\u0430\u043d", "\u0418\u0432\u0430\u043d"),  # all Cyrillic
    ("\u5c71\u7530\u305f\u308d\u3046", "\u5c71\u7530\u305f\u308d\u3046"),  # kanji and kana
    (CYRILLIC_A + "da", "mixes scripts (Cyrillic"),
    ("\u03b4ada", "mixes scripts (Greek"),
    ("ada\u0661", "mixes scripts"),  # an Arabic-Indic digit in a Latin name
    ("ad\u200ba", "U+200B in"),  # zero-width space
    ("ad\u200da", "control or invisible"),  # zero-width joiner
    ("ad\x07a", "control or invisible"),
    ("ada\ufe0f", "control or invisible"),  # a variation selector
    ("\u3164ada", "control or invisible"),  # a Hangul filler
    ("ad a", "is a space"),
    ("ada!", "not allowed: names are letters, digits and _ - ."),
    ("\u0301ada", "starts with a letter or digit"),
    ("a" * 33, "at most 32 characters"),
    ("   ", "at least one letter or digit"),
]


@pytest.mark.parametrize(("typed", "expected"), NAMES)
def test_the_name_rule(typed: str, expected: str) -> None:
    try:
        got = canonical_name(typed)
    except BadName as exc:
        assert expected in str(exc)
    else:
        assert got == expected


def test_new_names_may_not_look_like_existing_ones_and_stored_ones_stay_reachable() -> None:
    assert look_alike("Ada") == look_alike("ada") == look_alike("\u0410\u0434\u0430"[0] + "da")
    account = Account(b"s", b"h", 7, "")
    registry, renames = Registry.load(
        [
            ("ada", account),
            (FULLWIDTH_ADA, Account(b"s", b"h", 8, "")),  # its canonical form is ada's
            (" dan ", Account(b"s", b"h", 9, "")),
            (CYRILLIC_A + "da", Account(b"s", b"h", 10, "")),
        ]
    )
    assert renames == [(" dan ", "dan")]
    assert sorted(registry.accounts) == sorted(["ada", "dan", FULLWIDTH_ADA, CYRILLIC_A + "da"])
    assert set(registry.unreachable) == {FULLWIDTH_ADA, CYRILLIC_A + "da"}
    assert registry.clash("Ada") == "'Ada' looks like the existing name 'ada'"
    assert registry.clash("ada") == "the name 'ada' is taken"
    assert registry.clash("Ada", keeping="ada") == ""  # renaming ada to Ada
    assert registry.find(" ada ") == "ada" and registry.find(FULLWIDTH_ADA) == FULLWIDTH_ADA


def test_signup_limits_slide_per_address_and_overall() -> None:
    limits = SignupLimits(per_address=2, overall=3, trusted=frozenset({"127.0.0.1"}))
    for at in (0.0, 1.0):
        assert limits.refusal("10.0.0.1", at) == ""
        limits.charge("10.0.0.1", at)
    assert "gateway.signup_per_address" in limits.refusal("10.0.0.1", 2.0)
    assert "try again in 58 s" in limits.refusal("::ffff:10.0.0.1", 2.0)  # the same address
    limits.charge("10.0.0.2", 3.0)
    assert "gateway.signup_per_minute" in limits.refusal("10.0.0.3", 3.0)
    assert limits.refusal("127.0.0.1", 3.0) == ""  # trusted: never limited, never counted
    assert limits.refusal("10.0.0.3", 60.5) == ""  # the first left the window
    assert limits.refusal("10.0.0.1", 61.5) == ""


# -- a running daemon: signups open, limited ---------------------------------

OPEN = {
    **TAVERN,
    "plugins": {"load": ["tavern"], "tavern": {"npcs": 20}},
    "gateway": {
        "hash_cost": 10,
        "signup_per_address": 2,
        "signup_per_minute": 5,
        "signup_trusted": ["127.0.0.1"],
    },
}


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory):
    """One daemon for the checks that share it (each with its own names)."""
    config = write_config(tmp_path_factory.mktemp("open"), OPEN)
    daemon = start_daemon(config, "--rate", "30", "--workers", "1")
    try:
        yield config, gateway_of(config), config.parent / "data" / "meshd.sock"
    finally:
        daemon.kill()
        daemon.wait(timeout=10)


async def enter(address, name: str, secret: str, local: str | None = None) -> int:
    """Log in and out; the player's entity."""
    async with await client.connect(*address, name, secret, local_address=local) as player:
        return player.entity


async def refused(address, name: str, secret: str, local: str | None = None) -> client.ServerError:
    with pytest.raises(client.ServerError) as error:
        await client.connect(*address, name, secret, local_address=local)
    return error.value


def test_names_are_canonical_before_they_are_claimed_or_compared(open_server) -> None:
    _config, address, _sock = open_server

    async def main() -> None:
        ada = await enter(address, "ada", "lovelace")
        assert await enter(address, FULLWIDTH_ADA, "lovelace") == ada
        assert await enter(address, "  ada ", "lovelace") == ada
        error = await refused(address, FULLWIDTH_ADA, "wrong")
        assert (error.code, error.message) == ("auth", "wrong secret for 'ada'")
        for typed, words in [
            (CYRILLIC_A + "da", "mixes scripts (Cyrillic 'а', Latin 'd')"),  # noqa: RUF001
            ("ad\u200da", "U+200D in 'ad\\u200da' is a control or invisible character"),
            ("ad\x07a", "U+0007 in 'ad\\x07a' is a control or invisible character"),
            ("Ada", "'Ada' looks like the existing name 'ada'"),
        ]:
            error = await refused(address, typed, "lovelace")
            assert error.code == "bad_name" and words in error.message, error.message

    trio.run(main)


def test_signups_are_limited_per_address_and_overall(open_server) -> None:
    _config, address, _sock = open_server

    async def main() -> None:
        await enter(address, "p2a", "s", "127.0.0.2")
        await enter(address, "p2b", "s", "127.0.0.2")
        error = await refused(address, "p2c", "s", "127.0.0.2")
        assert error.code == "signup_limit"
        assert "at most 2 new names a minute come from one address" in error.message
        assert "(gateway.signup_per_address), and 127.0.0.2 has had them" in error.message
        await enter(address, "p2a", "s", "127.0.0.2")  # an existing name is no sign-up
        await enter(address, "p3a", "s", "127.0.0.3")  # another address has its own
        await enter(address, "p3b", "s", "127.0.0.3")
        await enter(address, "p4a", "s", "127.0.0.4")  # the fifth this minute
        error = await refused(address, "p5a", "s", "127.0.0.5")
        assert error.code == "signup_limit"
        assert "at most 5 new names a minute are taken in all" in error.message
        assert "(gateway.signup_per_minute)" in error.message
        await enter(address, "local-bot", "s", "127.0.0.1")  # trusted: not limited

    trio.run(main)


def meshd_accounts(config: Path, *args: str, secret: str | None = None) -> Any:
    """``meshd accounts ARGS --json`` as the operator types it (the secret on stdin)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHD_")}
    done = subprocess.run(
        [sys.executable, "-m", "meshd", "accounts", *args, "--config", str(config), "--json"],
        input=f"{secret}\n" if secret is not None else "",
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def listed(sock: Path) -> list[dict[str, Any]]:
    return admin.request(sock, admin.AdminRequest("accounts"))


def entity_exists(sock: Path, entity: int) -> bool:
    try:
        admin.request(sock, admin.AdminRequest("entity", entity=entity))
    except admin.AdminError as exc:
        assert str(exc) == f"no entity {entity}"
        return False
    return True


async def kicked(address, name: str, secret: str, sock: Path, request) -> tuple[Any, Any]:
    """Log in, be in the world, then the operator's ``request``: its answer and the error
    that ended the player's connection."""
    async with await client.connect(*address, name, secret, reconnect_within=0) as player:
        async for _view in player.views():
            break
        answer = await trio.to_thread.run_sync(admin.request, sock, request)
        with trio.fail_after(10), pytest.raises(client.ServerError) as error:
            async for _view in player.views():
                pass
    return answer, (error.value.code, error.value.message)


def test_account_commands_on_a_running_daemon(open_server) -> None:
    config, address, sock = open_server
    assert meshd_accounts(config, "create", "carol", secret="c-secret") == {"name": "carol"}

    async def main() -> None:
        carol = await enter(address, "carol", "c-secret")
        answer, error = await kicked(
            address,
            "carol",
            "c-secret",
            sock,
            admin.AdminRequest("rename_account", name="carol", new_name="caroline"),
        )
        assert answer == {"name": "caroline", "was": "carol", "entity": carol, "kicked": True}
        assert error == ("renamed", "an operator renamed your account to 'caroline'")
        assert await enter(address, "caroline", "c-secret") == carol  # the same entity
        assert await enter(address, "carol", "c-secret") != carol  # a new name, free again

        answer, error = await kicked(
            address,
            "caroline",
            "c-secret",
            sock,
            admin.AdminRequest("disable_account", name="caroline"),
        )
        assert answer == {"name": "caroline", "disabled": True, "kicked": True}
        assert error == ("disabled", "the account 'caroline' is disabled by an operator")
        error = await refused(address, "caroline", "c-secret")
        assert error.code == "disabled"
        assert admin.request(sock, admin.AdminRequest("enable_account", name="caroline")) == {
            "name": "caroline",
            "disabled": False,
            "kicked": False,
        }
        assert await enter(address, "caroline", "c-secret") == carol

        answer, error = await kicked(
            address,
            "caroline",
            "c-secret",
            sock,
            admin.AdminRequest("delete_account", name="caroline"),
        )
        assert answer == {"name": "caroline", "entity": carol, "kicked": True}
        assert error == ("deleted", "an operator deleted your account")
        with trio.fail_after(10):  # no plugin handles forget: the entity leaves the world
            while await trio.to_thread.run_sync(entity_exists, sock, carol):
                await trio.sleep(0.05)

    trio.run(main)
    listed = {row["name"]: row for row in meshd_accounts(config, "list")}
    assert "caroline" not in listed and listed["carol"]["disabled"] is False
    assert listed["ada"]["disabled"] is False and listed["ada"]["entity"] > 0


# -- a running daemon: signups closed, a plugin that keeps forgotten players --

HALL = textwrap.dedent(
    """
    import attrs
    from meshd import Kind, Plugin

    @attrs.frozen
    class Guest:
        name: str = ""
        forgotten: bool = False

    def new_player(name, world):
        world.spawn("guest", 10.0, 10.0, state=Guest(name=name))

    def on_forget(me, event, ctx):
        # the hall keeps a deleted player's guest, marked
        me.state = attrs.evolve(me.state, forgotten=True)

    plugin = Plugin(
        name="hall",
        kinds={"guest": Kind(Guest)},
        new_player=new_player,
        inputs={"forget": on_forget},
    )
    """
)
PAT_SECRET = "pat's secret 4711"
ASK_AS = textwrap.dedent(
    """
    import os, sys
    from meshd.ops import admin
    sock, folder, member, other = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

    def ask_as(gid):
        # status, accounts and a rename, asked as uid 65534 in group gid (a child)
        if os.fork() == 0:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(65534)
            for request in (
                admin.AdminRequest("status"),
                admin.AdminRequest("accounts"),
                admin.AdminRequest("rename_account", name="pat", new_name="patricia"),
            ):
                try:
                    answer = admin.request(sock, request)
                    print("ok", answer["tick"] > 0 if request.view == "status" else len(answer))
                except admin.AdminError as exc:
                    print(exc)
            sys.stdout.flush()
            os._exit(0)
        os.wait()

    ask_as(member)
    os.chmod(folder, 0o711)  # open the way on purpose: the modes are the first guard
    os.chmod(sock, 0o666)
    ask_as(other)
    """
)


def ask_as(sock: Path, member: int, other: int) -> list[str]:
    """The answers to status, accounts and a rename, asked as uid 65534 with group
    ``member``, then with group ``other`` once the socket's modes let anyone reach it."""
    done = subprocess.run(
        [sys.executable, "-c", ASK_AS, str(sock), str(sock.parent), str(member), str(other)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def _other_group() -> grp.struct_group | None:
    """The group of uid 65534 (nobody), to act as: root only."""
    try:
        return grp.getgrgid(65534) if os.geteuid() == 0 else None
    except KeyError:
        return None


def test_closed_signups_the_forget_hook_and_the_admin_group(tmp_path: Path) -> None:
    group = _other_group()  # the admin group part acts as uid 65534: with root only
    (tmp_path / "hall.py").write_text(HALL)
    reachable = Path(tempfile.mkdtemp(prefix="meshd-group-"))  # pytest's tmp is 0700
    reachable.chmod(0o711)
    data = reachable / "data"
    config = write_config(
        tmp_path,
        {
            "world": {"size": 50.0},
            "data": {"dir": str(data)},
            "gateway": {"signup": "closed", "hash_cost": 10},
            "admin": {"group": group.gr_name if group is not None else ""},
            "plugins": {"load": ["hall"], "dirs": [str(tmp_path)]},
        },
    )
    # No daemon yet: the operator makes the first account on the data folder itself.
    assert meshd_accounts(config, "create", "olga", secret="o-secret") == {"name": "olga"}
    daemon = start_daemon(config, "--rate", "30")
    try:
        address = gateway_of(config)
        sock = data / "meshd.sock"

        async def main() -> int:
            error = await refused(address, "mallory", "m")
            assert error.code == "closed"
            assert error.message == (
                "sign-ups are closed: only names an operator created log in, and 'mallory' "
                "is not one of them"
            )
            olga = await enter(address, "olga", "o-secret")
            created = await trio.to_thread.run_sync(
                admin.request,
                sock,
                admin.AdminRequest("create_account", name="pat", secret=PAT_SECRET),
            )
            assert created == {"name": "pat"}
            await enter(address, "pat", PAT_SECRET)
            with trio.fail_after(10):  # olga's connection has ended, as far as the core knows
                while any(row["online"] for row in await trio.to_thread.run_sync(listed, sock)):
                    await trio.sleep(0.02)
            deleted = await trio.to_thread.run_sync(
                admin.request, sock, admin.AdminRequest("delete_account", name="olga")
            )
            assert deleted == {"name": "olga", "entity": olga, "kicked": False}
            assert (await refused(address, "olga", "o-secret")).code == "closed"
            return olga

        olga = trio.run(main)
        deadline = time.monotonic() + 10
        while True:  # the hall's forget handler keeps the guest and marks it
            guest = admin.request(sock, admin.AdminRequest("entity", entity=olga))
            if guest["state"]["forgotten"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert guest["state"] == {"name": "olga", "forgotten": True}

        if group is not None:
            # admin.group: the socket and the folder are the group's, and nobody else's
            for path, mode in ((sock, 0o660), (data, 0o710)):
                found = (stat.S_IMODE(path.stat().st_mode), path.stat().st_gid)
                assert found == (mode, group.gr_gid)
            refusal = (
                "the admin socket answers the daemon's own user (uid 0) and members of group "
                f"{group.gr_name!r} (admin.group), and uid 65534 (gid 1) is neither"
            )
            assert ask_as(sock, group.gr_gid, 1) == [
                "ok True",  # a member may look...
                "ok 1",
                "rename_account changes the accounts: only the daemon's own user (uid 0) may "
                "ask for it",  # ...and not change
                *[refusal] * 3,  # anyone else gets nothing
            ]
    finally:
        daemon.kill()
        daemon.wait(timeout=10)
        shutil.rmtree(reachable)
    log = [json.loads(line) for line in daemon.stderr.read().splitlines() if line[:1] == "{"]
    said = [
        (line["event"], line.get("name"), line.get("uid"))
        for line in log
        if line["event"].startswith("operator") or line["event"] == "admin request refused"
    ]
    assert said == [  # each change with who asked, and each refused peer
        ("operator created an account", "pat", os.geteuid()),
        ("operator deleted an account", "olga", os.geteuid()),
        *[("admin request refused", None, 65534)] * (3 if group is not None else 0),
    ]
    assert not [line for line in log if PAT_SECRET in json.dumps(line)]


def test_an_admin_group_that_does_not_exist_stops_the_start(tmp_path: Path) -> None:
    config = write_config(tmp_path, {**OPEN, "admin": {"group": "no-such-group-here"}})
    refused = meshd("serve", "--config", str(config), "--ticks", "1", check=False)
    assert refused.returncode == 1
    assert "admin.group: there is no group 'no-such-group-here' on this system" in refused.stderr
    assert not (tmp_path / "data").exists()  # refused before the data folder is touched
