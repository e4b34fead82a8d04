"""``meshd.testing``: the example plugins' rules, tested the way a plugin author would."""

from __future__ import annotations

import math
from pathlib import Path

import attrs
import pytest

from meshd import Kind, Plugin, PluginError
from meshd.testing import World, assert_deterministic

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
SLOPPY = Path(__file__).resolve().parent / "fixtures" / "plugins"


def _tavern(**settings) -> World:
    return World(["tavern"], dirs=[PLUGINS], settings={"tavern": {"npcs": 0, **settings}})


def test_a_player_joins_at_the_door_and_walks_where_told() -> None:
    world = _tavern()
    ann = world.add_player("ann")
    world.step()
    start = world.entity(ann)
    assert start is not None and start.kind == "player" and start.state.name == "ann"
    world.send(ann, "move", {"dx": 1.0, "dy": 0.0})
    world.step(10)
    moved = world.entity(ann)
    assert moved.x == pytest.approx(start.x + 10 * 0.05 * math.hypot(moved.state.vx, 0.0))
    assert moved.y == start.y and world.tick == 11 and world.failures == []


def test_a_thrown_bottle_flies_and_a_dropped_mug_stays() -> None:
    world = _tavern()
    ann = world.add_player("ann")
    world.step()
    world.send(ann, "throw", {"angle": 0.0})
    world.send(ann, "drop")
    world.step()
    (bottle,) = world.entities("bottle")
    (mug,) = world.entities("mug")
    assert bottle.state.thrower == ann and bottle.state.vx > 0
    assert not world.entity(ann).state.has_mug
    world.step(20)
    assert world.entities("bottle") == []  # flew out of its time to live
    assert world.entities("mug") == [mug]  # forever


def test_a_bad_input_is_undone_alone_and_reported() -> None:
    world = _tavern()
    ann, bob = world.add_player("ann"), world.add_player("bob")
    world.step()
    world.send(ann, "move", {"dx": "fast"})
    world.send(bob, "move", {"dy": 1.0})
    world.step()
    (failure,) = world.failures
    assert failure.entity == ann and failure.input and failure.tick == 2
    assert "dx must be a number" in failure.error and "tavern.py" in failure.where
    assert world.entity(bob).state.vy > 0


def test_inputs_a_client_could_not_send_are_refused_at_once() -> None:
    world = _tavern()
    ann = world.add_player("ann")
    with pytest.raises(KeyError, match="fly"):
        world.send(ann, "fly")
    with pytest.raises(ValueError, match="finite"):
        world.send(ann, "move", {"dx": math.inf})
    with pytest.raises(PluginError, match="new_player"):
        World(["space"], dirs=[PLUGINS], settings={"space": {"ships": 1}}).add_player("ann")


def test_the_same_world_on_one_worker_and_on_four() -> None:
    worlds = [
        World(["tavern"], dirs=[PLUGINS], settings={"tavern": {"npcs": 150}}, workers=workers)
        for workers in (1, 4)
    ]
    for world in worlds:
        world.step(40)
    assert worlds[0].digest() == worlds[1].digest()
    assert len(worlds[0].entities("patron")) == 150


def test_assert_deterministic_passes_the_tavern_and_names_a_sloppy_plugins_mistake() -> None:
    assert_deterministic(["tavern"], dirs=[PLUGINS], settings={"tavern": {"npcs": 100}}, ticks=20)
    with pytest.raises(AssertionError, match=r"random\.uniform\(\) \(the global generator\)"):
        assert_deterministic(
            ["sloppy"],
            dirs=[SLOPPY],
            settings={"sloppy": {"mistake": "global_random", "walkers": 20}},
            size=60.0,
            ticks=5,
        )


@attrs.frozen
class _Counts:
    mugs: int = 0
    mugs_or_bottles: int = 0


def _look(me, ctx) -> None:
    me.state = attrs.evolve(
        me.state,
        mugs=len(ctx.nearby(20.0, "mug")),
        mugs_or_bottles=len(ctx.nearby(20.0, ("mug", "bottle"))),
    )


def _typo(me, ctx) -> None:
    ctx.nearby(20.0, "mugg")


def _spawn_some(world) -> None:
    world.spawn("looker", 50.0, 50.0)
    for offset in (1.0, 2.0):
        world.spawn("mug", 50.0 + offset, 50.0)
    world.spawn("bottle", 50.0, 53.0)
    world.spawn("bottle", 90.0, 90.0)  # out of reach


def test_nearby_takes_several_kinds_and_names_an_unknown_one() -> None:
    still = _Counts
    plugin = Plugin(
        name="looking",
        kinds={
            "looker": Kind(_Counts, systems=(_look,), radius=20.0),
            "mug": Kind(still),
            "bottle": Kind(still, systems=(_typo,), radius=20.0),
        },
        create_world=_spawn_some,
    )
    world = World([plugin])
    world.step()
    (looker,) = world.entities("looker")
    assert looker.state == _Counts(mugs=2, mugs_or_bottles=3)
    assert {failure.entity for failure in world.failures} == {4, 5}
    assert "no plugin defines entity kind(s) 'mugg'" in world.failures[0].error


@attrs.frozen
class _Bell:
    rung: list[list[int]] = attrs.field(factory=list)
    refused: str = ""


def _ring_later(me, ctx) -> None:
    if ctx.tick == 1:
        ctx.send(me.id, "ring", {"n": 1}, after=5)
        ctx.send(me.id, "ring", {"n": 2}, after=3)
        ctx.send(me.id, "ring", {"n": 3})
        refused = []
        for after in (0, 1.5, True, 1 << 40):
            try:
                ctx.send(me.id, "ring", {"n": 0}, after=after)
            except ValueError:
                refused.append(repr(after))
        me.state = attrs.evolve(me.state, refused=",".join(refused))
    if ctx.tick == 2 and me.id == 2:
        ctx.send(1, "ring", {"n": 9}, after=4)  # arrives though its sender is gone
        ctx.send(2, "ring", {"n": 8}, after=2)  # dropped: its target is gone
        ctx.despawn()


def _ring(me, event, ctx) -> None:
    me.state = attrs.evolve(me.state, rung=[*me.state.rung, [ctx.tick, event.data["n"]]])


def test_a_timer_arrives_after_its_ticks_in_order_and_is_checked() -> None:
    def two_bells(world) -> None:
        world.spawn("bell", 1.0, 1.0)
        world.spawn("bell", 2.0, 1.0)

    plugin = Plugin(
        name="bells",
        kinds={"bell": Kind(_Bell, systems=(_ring_later,))},
        events={"ring": _ring},
        create_world=two_bells,
    )
    world = World([plugin], size=10.0)
    world.step(10)
    first = world.entity(1)
    # by sender at tick 6: bell 1's own timer, then bell 2's
    assert first.state.rung == [[2, 3], [4, 2], [6, 1], [6, 9]]
    assert first.state.refused == f"0,1.5,True,{1 << 40}"
    assert world.entity(2) is None and world.failures == []


def test_world_state_is_reduced_in_order_the_same_on_any_layout() -> None:
    worlds = [World(["teams"], dirs=[SLOPPY], size=60.0, workers=workers) for workers in (1, 4)]
    for world in worlds:
        world.step(40)
    # (each World loads the plugin file afresh: compare values, not instances of two classes)
    one, four = (attrs.astuple(world.world_state("teams")) for world in worlds)
    assert one == four and min(one[:3]) > 0  # red, blue and the last scorer
    assert worlds[0].digest() == worlds[1].digest() and worlds[0].failures == []


def test_a_failing_world_event_is_skipped_and_reported() -> None:
    honest = World(["teams"], dirs=[SLOPPY], size=60.0)
    sloppy = World(["teams"], dirs=[SLOPPY], size=60.0, settings={"teams": {"mistake": "green"}})
    honest.step(1)
    sloppy.step(1)
    failed = [failure for failure in sloppy.failures if "no team 'green'" in failure.error]
    assert failed and all(failure.where.startswith("teams.score: score (") for failure in failed)
    assert all(failure.entity % 3 == 0 for failure in failed)  # only the green ones
    # the tick's other events were applied: only the failed points are missing
    points = [world.world_state("teams") for world in (sloppy, honest)]
    assert points[0].red + points[0].blue < points[1].red + points[1].blue
