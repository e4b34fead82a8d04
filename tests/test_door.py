"""The door of a gateway: limits per address and login backoff (pure, microseconds)."""

from __future__ import annotations

from meshd.common.config import GatewayConfig as Limits
from meshd.players.door import MAX_BACKOFF, Door


def test_addresses_count_by_prefix() -> None:
    door = Door(Limits(address_prefix_v4=24, address_prefix_v6=64))
    assert door.group("10.1.2.3") == door.group("10.1.2.200") == "10.1.2.0/24"
    assert door.group("::ffff:10.1.2.9") == "10.1.2.0/24"  # IPv4 through an IPv6 socket
    assert door.group("2001:db8::1") == door.group("2001:db8::ffff:1") == "2001:db8::/64"
    assert door.group("2001:db8:0:1::1") != door.group("2001:db8::1")


def test_pending_connections_are_capped_per_address_and_overall() -> None:
    door = Door(Limits(max_pending=5, max_pending_per_address=2))
    assert door.arrive("a") is None and door.arrive("a") is None
    refused = door.arrive("a")
    assert refused is not None and refused.code == "address_pending"
    assert "gateway.max_pending_per_address" in refused.message
    assert door.arrive("b") is None  # another address is not hurt
    door.gone("a", admitted=False)
    assert door.arrive("a") is None  # a share comes back when a connection ends
    assert door.arrive("c") is None and door.arrive("c") is None
    everyone = door.arrive("d")
    assert everyone is not None and everyone.code == "busy" and door.pending == 5


def test_players_are_capped_per_address_and_a_refused_one_stays_pending() -> None:
    door = Door(Limits(max_players_per_address=1))
    door.arrive("a")
    door.arrive("a")
    assert door.admit("a") is None and door.pending == 1
    refused = door.admit("a")
    assert refused is not None and refused.code == "address_players" and door.pending == 1
    door.gone("a", admitted=False)
    door.gone("a", admitted=True)
    door.arrive("a")
    assert door.admit("a") is None and door.pending == 0


def test_failed_logins_make_the_address_wait_longer_each_time_but_not_the_owner() -> None:
    door = Door(Limits(login_failures=3))
    for second in range(3):
        assert door.may_try("attacker", "victim", second) is None
        door.failed("attacker", "victim", second)
    refused = door.may_try("attacker", "victim", 2.5)
    assert refused is not None and refused.code == "backoff"
    assert door.may_try("attacker", "victim", 3.1) is None  # 1 s after the third failure
    door.failed("attacker", "victim", 3.1)
    assert door.may_try("attacker", "victim", 4.5) is not None  # now 2 s
    assert door.may_try("attacker", "victim", 5.2) is None
    assert door.may_try("owner", "victim", 3.2) is None  # the victim, from elsewhere
    for _ in range(40):
        door.failed("attacker", "victim", 10.0)
    assert door.may_try("attacker", "anyone", 10.0 + MAX_BACKOFF + 0.1) is None  # capped


def test_failures_from_one_address_at_many_names_back_that_address_off() -> None:
    door = Door(Limits(login_failures=2))
    door.failed("attacker", "ann", 0.0)
    door.failed("attacker", "bob", 0.0)
    assert door.may_try("attacker", "cy", 0.5) is not None
    assert door.may_try("friend", "cy", 0.5) is None
