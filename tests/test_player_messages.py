"""Messages from the rules to players (``ctx.tell``, ``ctx.announce``), through a real gateway."""

from __future__ import annotations

import pytest
import trio
from conftest import REPO, start_daemon, write_config
from test_players import gateway_of

from meshd import client
from meshd.testing import World

CHAT = REPO / "tests" / "fixtures" / "plugins"


async def _until(condition, limit: float = 10.0) -> None:
    with trio.fail_after(limit):
        while not condition():
            await trio.sleep(0.02)


def test_players_get_what_is_said_near_them_shouted_or_whispered_to_them(tmp_path) -> None:
    config = write_config(
        tmp_path,
        {
            "world": {"size": 200.0, "halo": 5.0},
            "plugins": {"load": ["chat"], "dirs": [str(CHAT)]},
            "gateway": {"listen": "127.0.0.1:0", "processes": 2},
        },
    )
    daemon = start_daemon(config, "--rate", "30")
    try:
        address = gateway_of(config)

        async def main() -> dict[str, list]:
            async with (
                await client.connect(*address, "ann-10", "a") as ann,
                await client.connect(*address, "bob-15", "b") as bob,
                await client.connect(*address, "cy-90", "c") as cy,
            ):
                players = {"ann": ann, "bob": bob, "cy": cy}
                async with trio.open_nursery() as nursery:
                    for player in players.values():
                        nursery.start_soon(_read, player)
                    await ann.send("say", text="hi")  # earshot 10 m: ann and bob
                    await bob.send("whisper", to=cy.entity, text="psst")
                    await _until(lambda: cy.messages)
                    await cy.send("shout", text="HEY")
                    await _until(lambda: all(len(p.messages) >= 2 for p in (ann, bob, cy)))
                    counted = {"chat": {"said": 1, "shouted": 1}}
                    await _until(lambda: all(p.world_state == counted for p in (ann, bob, cy)))
                    # one who comes later gets the world state right after its Welcome
                    async with (
                        await client.connect(*address, "dee-50", "d") as dee,
                        trio.open_nursery() as reading,
                    ):
                        reading.start_soon(_read, dee)
                        await _until(lambda: dee.world_state == counted)
                        reading.cancel_scope.cancel()
                    await trio.sleep(0.3)  # nothing else arrives
                    nursery.cancel_scope.cancel()
                return {name: [m.data for m in p.messages] for name, p in players.items()}

        got = trio.run(main)
    finally:
        daemon.kill()
        daemon.wait(timeout=10)
    said, shouted = {"from": "ann", "said": "hi"}, {"from": "cy", "shouted": "HEY"}
    assert got["ann"] == [said, shouted]
    assert got["bob"] == [said, shouted]
    assert got["cy"] == [{"from": "bob", "whispered": "psst"}, shouted]


async def _read(player: client.Player) -> None:
    async for _view in player.views():
        pass


def test_a_message_is_bounded_and_withdrawn_with_its_failed_input() -> None:
    world = World(["chat"], dirs=[CHAT], size=200.0)
    ann, bob = world.add_player("ann-10"), world.add_player("bob-15")
    world.step()
    world.send(bob, "whisper", {"to": ann, "text": "x" * 4990})
    world.send(ann, "say", {"text": "hello", "earshot": 3.0})
    world.step()
    (failure,) = world.failures
    assert failure.entity == bob and "a message is at most 4096 bytes" in failure.error
    (message,) = world.messages
    assert (message.sender, message.player, message.radius) == (ann, None, 3.0)
    assert (message.x, message.y, message.data) == (10.0, 10.0, {"from": "ann", "said": "hello"})
    world.send(ann, "whisper", {"to": 0, "text": "to nobody"})  # not everyone
    world.step()
    assert "player must be a player's entity id, got 0" in world.failures[-1].error
    assert len(world.messages) == 1
    with pytest.raises(ValueError, match="argument earshot must be 0 to 100"):
        world.send(ann, "say", {"text": "hi", "earshot": 1000.0})
