"""The pure pipeline in-process: Replication driving WorkerSim objects."""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import pytest
from inprocess import InProcessMesh, new_world, plugins_for

from meshd.common.wire import CONVERTER
from meshd.mesh.layout import Layout
from meshd.mesh.messages import WorldParams
from meshd.mesh.plugins import load_plugins
from meshd.plugin import PluginError, TickRng, seed_for

TAVERN_WORLD = WorldParams(size=160.0, seed=3, dt=0.05, halo=5.0)
SPACE_WORLD = WorldParams(size=2000.0, seed=3, dt=0.05, halo=320.0)


def run(plugins, world, grid, workers, ticks=60, **kwargs):
    mesh = InProcessMesh(
        plugins,
        world,
        Layout.grid(world.size, world.halo, grid, workers),
        new_world(plugins, world),
        **kwargs,
    )
    reports = mesh.run(ticks)
    return mesh, reports


def assert_one_owner_each(mesh: InProcessMesh) -> None:
    """Each entity is held by exactly its owner, or on its way there in the next step."""
    owned: dict[int, int] = {}
    for worker, sim in mesh.sims.items():
        box = mesh.replication.outboxes[worker]
        in_transit = [record[0] for record, _targets in box.acquire]
        leaving = set(box.release)
        for entity_id in [*(i for i in sim.entities if i not in leaving), *in_transit]:
            assert entity_id not in owned, f"entity {entity_id} owned twice"
            owned[entity_id] = worker
    assert owned == mesh.replication.owner


@pytest.mark.parametrize(
    ("name", "settings", "world"),
    [
        ("tavern", {"npcs": 300, "throw_chance": 0.05, "drop_chance": 0.01}, TAVERN_WORLD),
        ("space", {"ships": 80, "fire_chance": 0.05}, SPACE_WORLD),
    ],
)
def test_world_hash_is_independent_of_the_layout(name, settings, world) -> None:
    plugins = plugins_for(name, **settings)
    hashes = set()
    for grid, workers in [(1, 1), (2, 2), (4, 3), (8, 4), (8, 8)]:
        mesh, reports = run(plugins, world, grid, workers)
        assert_one_owner_each(mesh)
        assert not [e for r in reports for e in r.errors]
        hashes.add(mesh.replication.hash())
    assert len(hashes) == 1
    assert sum(r.handoffs for r in reports) > 0  # the last layout really moved entities


def test_entities_are_owned_exactly_once_after_every_tick() -> None:
    plugins = plugins_for("tavern", npcs=300, throw_chance=0.1)
    world = TAVERN_WORLD
    mesh = InProcessMesh(
        plugins, world, Layout.grid(world.size, world.halo, 8, 4), new_world(plugins, world)
    )
    for _ in range(40):
        mesh.tick()
        assert_one_owner_each(mesh)


FAULTY = textwrap.dedent(
    """
    import attrs
    from meshd import Kind, Plugin

    @attrs.frozen
    class Walker:
        steps: int = 0

    def walk(me, ctx):
        me.x += 0.5
        me.state = Walker(me.state.steps + 1)
        if me.id == 2:
            ctx.send(1, "poke")
            raise RuntimeError("boom")
        if me.id == 3:
            me.x += 100.0  # faster than max_speed allows

    def on_poke(me, event, ctx):
        pass

    def create_world(world):
        for i in range(3):
            world.spawn("walker", 10.0 + i, 10.0)

    plugin = Plugin(
        name="faulty",
        kinds={"walker": Kind(Walker, systems=(walk,), max_speed=20.0, radius=1.0)},
        events={"poke": on_poke},
        create_world=create_world,
    )
    """
)


def test_a_failing_entity_keeps_its_state_and_the_world_goes_on(tmp_path: Path) -> None:
    (tmp_path / "faulty.py").write_text(FAULTY)
    plugins = load_plugins(["faulty"], [tmp_path], {}, CONVERTER)
    world = WorldParams(size=100.0, seed=1, dt=0.05, halo=5.0)
    mesh = InProcessMesh(plugins, world, Layout.grid(100.0, 5.0, 2, 2), new_world(plugins, world))
    reports = mesh.run(5)
    records = mesh.replication.records
    assert records[1][2] == pytest.approx(12.5) and list(records[1][5]) == [5]
    assert records[2][2] == 11.0 and list(records[2][5]) == [0]  # previous state kept
    assert records[3][2] == 12.0 and list(records[3][5]) == [0]  # too fast: refused
    errors = [(entity, where, text) for r in reports for _w, entity, where, text in r.errors]
    assert sorted({entity for entity, _, _ in errors}) == [2, 3]
    boom = FAULTY.splitlines().index('        raise RuntimeError("boom")') + 1
    assert (2, f"walk ({tmp_path / 'faulty.py'}:{boom})", "RuntimeError: boom") in errors
    too_fast = [(where, text) for entity, where, text in errors if entity == 3]
    assert too_fast and all(not where and "max_speed" in text for where, text in too_fast)
    assert sum(r.dropped_events for r in reports) == 0


UNSENDABLE = textwrap.dedent(
    """
    import attrs
    from meshd import Kind, Plugin

    @attrs.frozen
    class Counter:
        value: int = 0

    def grow(me, ctx):
        me.x += 0.5
        if me.id == 2 and ctx.tick >= 3:
            me.state = Counter(2**70)  # needs a CBOR bignum: cannot cross the wire
        elif me.id == 3 and ctx.tick >= 3:
            ctx.send(1, "poke", {"ids": {1, 2}})  # a set cannot either
        else:
            me.state = Counter(me.state.value + 1)

    def on_poke(me, event, ctx):
        pass

    def create_world(world):
        for i in range(3):
            world.spawn("counter", 10.0 + 40.0 * i, 10.0)

    plugin = Plugin(
        name="unsendable",
        kinds={"counter": Kind(Counter, systems=(grow,), max_speed=20.0, radius=1.0)},
        events={"poke": on_poke},
        create_world=create_world,
    )
    """
)


def test_state_that_cannot_cross_the_wire_fails_only_its_entity(tmp_path: Path) -> None:
    (tmp_path / "unsendable.py").write_text(UNSENDABLE)
    plugins = load_plugins(["unsendable"], [tmp_path], {}, CONVERTER)
    world = WorldParams(size=100.0, seed=1, dt=0.05, halo=5.0)
    mesh = InProcessMesh(plugins, world, Layout.grid(100.0, 5.0, 4, 4), new_world(plugins, world))
    reports = mesh.run(6)  # every message really goes through the codec
    records = mesh.replication.records
    assert records[1][2] == pytest.approx(13.0) and list(records[1][5]) == [6]
    assert records[2][2] == pytest.approx(51.0) and list(records[2][5]) == [2]  # kept tick 2's
    assert records[3][2] == pytest.approx(91.0) and list(records[3][5]) == [2]
    errors = {entity: text for r in reports for _w, entity, _where, text in r.errors}
    assert "64 bits" in errors[2] and "set value cannot travel" in errors[3]


def test_mutable_state_classes_are_refused(tmp_path: Path) -> None:
    (tmp_path / "mutable.py").write_text(
        FAULTY.replace("@attrs.frozen", "@attrs.define").replace('"faulty"', '"mutable"')
    )
    with pytest.raises(PluginError, match="frozen"):
        load_plugins(["mutable"], [tmp_path], {}, CONVERTER)


def test_unknown_plugin_and_bad_settings_are_clear(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match="not found"):
        load_plugins(["nope"], [tmp_path], {}, CONVERTER)
    with pytest.raises(PluginError, match=r"plugins\.tavern\.npcs"):
        plugins_for("tavern", npcs="many")


def test_looking_beyond_the_declared_reach_is_an_entity_error(tmp_path: Path) -> None:
    (tmp_path / "nosy.py").write_text(
        FAULTY.replace('"faulty"', '"nosy"').replace("me.x += 0.5", "ctx.nearby(50.0); me.x += 0.5")
    )
    plugins = load_plugins(["nosy"], [tmp_path], {}, CONVERTER)
    world = WorldParams(size=100.0, seed=1, dt=0.05, halo=5.0)
    mesh = InProcessMesh(plugins, world, Layout.grid(100.0, 5.0, 1, 1), new_world(plugins, world))
    report = mesh.tick()
    assert {entity for _w, entity, _where, _t in report.errors} == {1, 2, 3}
    assert all("reach" in text for _w, _e, _where, text in report.errors)


def test_rng_depends_only_on_seed_tick_and_id() -> None:
    draws = [TickRng(seed_for(7, 10, 42)).random() for _ in range(2)]
    assert draws[0] == draws[1]
    assert TickRng(seed_for(7, 11, 42)).random() != draws[0]
    assert TickRng(seed_for(7, 10, 43)).random() != draws[0]
    rng = TickRng(seed_for(1, 1, 1))
    values = [rng.random() for _ in range(1000)]
    assert 0.45 < sum(values) / len(values) < 0.55
    assert rng.choice([1, 2, 3]) in (1, 2, 3)
    assert 0 <= rng.randrange(10) < 10


def test_plugins_are_found_through_the_entry_point_group(tmp_path: Path, monkeypatch) -> None:
    """An installed package advertising a plugin under ``meshd.plugins``."""
    (tmp_path / "walkers_pkg.py").write_text(FAULTY.replace('"faulty"', '"walkers"'))
    dist = tmp_path / "walkers_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: walkers-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[meshd.plugins]\nwalkers = walkers_pkg\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = load_plugins(["walkers"], [tmp_path / "no-such-folder"], {}, CONVERTER)
    assert list(plugins.kinds) == ["walker"]


KEYPAD = textwrap.dedent(
    """
    import sys
    import attrs
    from meshd import Kind, Plugin

    CALLS = []

    @attrs.frozen
    class Pad:
        presses: int = 0
        last: float = 0.0
        noise: float = 0.0

    @attrs.frozen
    class Crumb:
        pass

    def wobble(me, ctx):
        me.x = (me.x + 0.25) % 90.0
        me.state = attrs.evolve(me.state, noise=ctx.rng.random())

    def press(me, event, ctx):
        CALLS.append(ctx.tick)
        value = event.data["value"]
        ctx.rng.random()  # randomness drawn, an event and a spawn emitted, then it fails
        ctx.send(me.id, "echo", {"value": value})
        ctx.spawn("crumb", me.x, me.y)
        me.state = attrs.evolve(me.state, presses=me.state.presses + 1, last=float(value))
        if value < 0:
            raise ValueError(f"value must be >= 0, got {value}")

    def leave(me, event, ctx):
        sys.exit(3)

    def vanish(me, event, ctx):
        me.x = float("nan")

    def speed(me, event, ctx):
        me.state = attrs.evolve(me.state, last=float("inf"))

    def echo(me, event, ctx):
        pass

    def create_world(world):
        for i in range(4):
            world.spawn("pad", 10.0 + 20.0 * i, 10.0 + 20.0 * i)

    plugin = Plugin(
        name="keypad",
        kinds={
            "pad": Kind(Pad, systems=(wobble,), max_speed=10.0, radius=1.0),
            "crumb": Kind(Crumb),
        },
        events={"echo": echo},
        inputs={"press": press, "leave": leave, "vanish": vanish, "speed": speed},
        create_world=create_world,
    )
    """
)


def _keypad(tmp_path: Path):
    (tmp_path / "keypad.py").write_text(KEYPAD)
    plugins = load_plugins(["keypad"], [tmp_path], {}, CONVERTER)
    return plugins, WorldParams(size=100.0, seed=1, dt=0.05, halo=5.0)


def _press(mesh: InProcessMesh, entity: int, action: str, **args) -> None:
    """A player input, as the gateway injects it before a tick."""
    mesh.replication.inject([[entity, 0, 0, f"input:{action}", args]])


def test_a_failing_input_is_undone_alone_and_never_counts_toward_quarantine(tmp_path) -> None:
    plugins, world = _keypad(tmp_path)
    layout = Layout.grid(100.0, 5.0, 2, 2)
    mesh = InProcessMesh(plugins, world, layout, new_world(plugins, world), quarantine_after=3)
    failures = []
    for tick in range(1, 13):
        _press(mesh, 1, "press", value=-1.0)  # every tick, far beyond quarantine_after
        report = mesh.tick(checkpoint=tick % 4 == 0)
        assert report.errors == [] and report.quarantined == []
        failures += report.input_errors
    assert len(failures) == 12
    entity, seq, where, text = failures[0]
    assert (entity, seq) == (1, 0) and text == "ValueError: value must be >= 0, got -1.0"
    assert where.startswith("press (") and "keypad.py:" in where
    record = mesh.replication.records[1]
    assert record[2] == pytest.approx(13.0)  # its systems ran every tick: it kept moving
    assert list(record[5])[:2] == [0, 0.0]  # nothing the failed presses did was kept
    assert 1 not in mesh.replication.quarantined


def test_an_undone_input_leaves_the_world_as_if_it_never_came(tmp_path) -> None:
    """Its randomness, events and spawns are withdrawn too; a replay skips it."""
    plugins, world = _keypad(tmp_path)
    layout = Layout.grid(100.0, 5.0, 2, 2)
    calls = sys.modules["meshd_plugin_keypad"].CALLS

    def run(fail: bool, kill_at: int | None = None) -> str:
        mesh = InProcessMesh(plugins, world, layout, new_world(plugins, world))
        for tick in range(1, 11):
            if fail and tick == 3:
                _press(mesh, 2, "press", value=-5.0)
            if tick == 6:
                _press(mesh, 2, "press", value=4.0)
            mesh.tick(checkpoint=tick in (2, 10), kill=frozenset({0, 1}) if tick == kill_at else ())
        return mesh.replication.hash()

    clean = run(fail=False)
    calls.clear()
    assert run(fail=True) == clean
    assert calls == [3, 6]
    calls.clear()
    assert run(fail=True, kill_at=5) == clean  # replays ticks 3-4 from tick 2's checkpoint...
    assert calls == [3, 6]  # ...without the press that failed at tick 3


def test_exit_and_non_finite_values_from_a_plugin_fail_only_that_input(tmp_path) -> None:
    plugins, world = _keypad(tmp_path)
    mesh = InProcessMesh(plugins, world, Layout.grid(100.0, 5.0, 1, 1), new_world(plugins, world))
    mesh.tick(checkpoint=True)
    before = dict(mesh.replication.records)
    for entity, action in [(1, "leave"), (2, "vanish"), (3, "speed")]:
        _press(mesh, entity, action)
    report = mesh.tick(checkpoint=True)
    failed = {entity: text for entity, _seq, _where, text in report.input_errors}
    assert failed[1] == "SystemExit: 3"
    assert failed[2].startswith("ValueError: position (nan,") and "not finite" in failed[2]
    assert failed[3] == "ValueError: inf is not a finite number"
    for entity in (1, 2, 3):
        assert math.isfinite(mesh.replication.records[entity][2])
        assert mesh.replication.records[entity][2] == pytest.approx(before[entity][2] + 0.25)
