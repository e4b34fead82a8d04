"""The pure pipeline in-process: Replication driving WorkerSim objects."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from inprocess import InProcessMesh, new_world, plugins_for

from meshd._layout import Layout
from meshd._messages import WorldParams
from meshd._plugin import PluginError, load_plugins
from meshd._sim import TickRng, seed_for
from meshd._wire import CONVERTER

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
    errors = [(entity, text) for r in reports for _w, entity, text in r.errors]
    assert sorted({entity for entity, _ in errors}) == [2, 3]
    assert any("boom" in text for _, text in errors)
    assert any("max_speed" in text for _, text in errors)
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
    errors = {entity: text for r in reports for _w, entity, text in r.errors}
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
    assert {entity for _w, entity, _t in report.errors} == {1, 2, 3}
    assert all("reach" in text for _w, _e, text in report.errors)


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
