"""Reshaping the mesh at tick boundaries changes nothing: same world hash, one owner each."""

from __future__ import annotations

import random

import pytest
from inprocess import InProcessMesh, new_world, plugins_for
from test_sim import SPACE_WORLD, TAVERN_WORLD, assert_one_owner_each

from meshd.mesh.layout import Layout, children, parse_leaf
from meshd.mesh.messages import Step
from meshd.mesh.planner import Planner, PlannerSettings
from meshd.mesh.step import WorkerSim


def random_layout(rng: random.Random, size: float, halo: float, max_workers: int) -> Layout:
    """A random quadtree (down to level 4) over 1..max_workers workers."""
    leaves = ["0/0/0"]
    for _ in range(rng.randint(0, 10)):
        leaf = rng.choice(leaves)
        if parse_leaf(leaf)[0] < 4:
            leaves.remove(leaf)
            leaves += children(leaf)
    workers = rng.sample(range(max_workers + 2), rng.randint(1, max_workers))
    return Layout(size, halo, {leaf: rng.choice(workers) for leaf in leaves})


def after_next_inbound(mesh: InProcessMesh, worker: int) -> WorkerSim:
    """A copy of ``worker`` with the inbound part of its next step applied."""
    sim, repl = mesh.sims[worker], mesh.replication
    copy = WorkerSim(worker, sim.epoch, sim.plugins, sim.world)
    copy.layout, copy.entities, copy.ghosts = sim.layout, dict(sim.entities), dict(sim.ghosts)
    copy.members = {leaf: dict(members) for leaf, members in sim.members.items()}
    copy.targets, copy.dirty, copy.frozen = dict(sim.targets), set(sim.dirty), set(sim.frozen)
    box = repl.outboxes[worker]
    copy._apply_inbound(
        Step(
            tick=repl.tick + 1,
            epoch=sim.epoch,
            layout=repl.layout.to_wire() if worker in repl.layout_pending else None,
            release=list(box.release),
            ghost_remove=list(box.ghost_remove),
            ghost_upsert=list(box.ghost_upsert),
            acquire=[[record, list(targets)] for record, targets in box.acquire],
        )
    )
    return copy


def assert_ghosts_where_targeted(mesh: InProcessMesh) -> None:
    """After its next step's inbound part, each worker holds exactly the core's view of it."""
    repl = mesh.replication
    for worker in mesh.sims:
        sim = after_next_inbound(mesh, worker)
        assert set(sim.entities) == {i for i, w in repl.owner.items() if w == worker}
        aimed = {i for i, targets in repl.targets.items() if worker in targets}
        assert set(sim.ghosts) == aimed, f"worker {worker}: {sorted(set(sim.ghosts) ^ aimed)[:10]}"
        for entity_id in sim.entities:
            assert sim.targets.get(entity_id, ()) == repl.targets.get(entity_id, ()), entity_id


def test_handing_over_an_empty_leaf_still_moves_the_ghosts_around_it() -> None:
    """Only ghost targets change (no entity changes owner): both sides must follow."""
    plugins = plugins_for("tavern", npcs=120, throw_chance=0.05, drop_chance=0.02)
    world = TAVERN_WORLD
    mesh = InProcessMesh(
        plugins, world, Layout.grid(world.size, world.halo, 8, 2), new_world(plugins, world)
    )
    one = InProcessMesh(
        plugins, world, Layout.grid(world.size, world.halo, 1, 1), new_world(plugins, world)
    )
    mesh.run(10, 5)
    one.run(40, 5)
    repl = mesh.replication
    occupied = {repl.layout.partition_of(r[2], r[3]) for r in repl.records.values()}
    near = {
        leaf
        for r in repl.records.values()
        for leaf in repl.layout.leaves_near(r[2], r[3], world.halo)
    }
    empty = sorted(
        leaf for leaf, w in repl.layout.owners.items() if w == 0 and leaf in near - occupied
    )
    assert empty, "no empty leaf next to an entity in this world"
    moved = mesh.relayout(Layout(world.size, world.halo, {**repl.layout.owners, empty[0]: 1}))
    assert moved == 0 and repl.outboxes[1].ghost_upsert  # worker 1 gets the ghosts next door
    assert_ghosts_where_targeted(mesh)  # worker 0 now aims its border entities at worker 1 too
    for tick in range(11, 41):
        mesh.tick(tick % 5 == 0)
        assert_ghosts_where_targeted(mesh)
    assert repl.hash() == one.replication.hash()


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize(
    ("name", "settings", "world"),
    [
        ("tavern", {"npcs": 250, "throw_chance": 0.05, "drop_chance": 0.01}, TAVERN_WORLD),
        ("space", {"ships": 60, "fire_chance": 0.05}, SPACE_WORLD),
    ],
)
def test_reshaping_and_crashing_every_few_ticks_changes_nothing(name, settings, world, seed):
    """Random re-layouts at checkpoints, kills right after them and anywhere else."""
    plugins = plugins_for(name, **settings)
    ticks, every = 60, 4
    one = InProcessMesh(
        plugins, world, Layout.grid(world.size, world.halo, 1, 1), new_world(plugins, world)
    )
    one.run(ticks, every)

    rng = random.Random(seed)
    mesh = InProcessMesh(
        plugins, world, Layout.grid(world.size, world.halo, 2, 2), new_world(plugins, world)
    )
    population, relayouts, kills, moved = len(mesh.replication.owner), 0, 0, 0
    just_relaid = False
    for tick in range(1, ticks + 1):
        checkpoint = tick == ticks or tick % every == 0
        workers = mesh.replication.layout.workers
        doomed = {w for w in workers if rng.random() < (0.5 if just_relaid else 0.1)}
        report = mesh.tick(checkpoint, kill=frozenset(doomed))
        kills += len(doomed)
        population += report.spawned - report.despawned
        assert mesh.replication.tick == tick
        assert len(mesh.replication.owner) == population
        assert_one_owner_each(mesh)
        assert_ghosts_where_targeted(mesh)
        just_relaid = False
        if checkpoint and tick < ticks and rng.random() < 0.7:
            moved += mesh.relayout(random_layout(rng, world.size, world.halo, 4))
            relayouts += 1
            just_relaid = True
            assert_one_owner_each(mesh)
            assert_ghosts_where_targeted(mesh)
    assert relayouts >= 5 and kills >= 5 and moved > 0
    assert mesh.replication.hash() == one.replication.hash()


def test_the_planners_own_plans_applied_with_kills_change_nothing() -> None:
    """The daemon's pipeline with its planner, in-process: whatever it measures, same world."""
    plugins = plugins_for("tavern", npcs=300, throw_chance=0.05, drop_chance=0.01)
    world = TAVERN_WORLD
    one = InProcessMesh(
        plugins, world, Layout.grid(world.size, world.halo, 1, 1), new_world(plugins, world)
    )
    one.run(60, 5)
    layout = Layout.grid(world.size, world.halo, 2, 1)
    settings = PlannerSettings(  # a tiny budget: every leaf is "hot", so plans keep coming
        budget_ms=0.01,
        split_ms=0.0025,
        merge_ms=0.0,
        imbalance_ms=0.002,
        min_cell=20.0,
        min_workers=1,
        max_workers=3,
        dwell_ticks=5,
        cooldown_ticks=5,
    )
    mesh = InProcessMesh(
        plugins, world, layout, new_world(plugins, world), planner=Planner(settings, layout, 0)
    )
    plans = 0
    for tick in range(1, 61):
        checkpoint = tick % 5 == 0 or tick == 60
        mesh.tick(checkpoint, kill=frozenset({max(mesh.sims)}) if tick % 7 == 0 else frozenset())
        assert_one_owner_each(mesh)
        if checkpoint and tick < 60:
            plans += mesh.replan()
    assert plans >= 2 and len(mesh.replication.layout.owners) > 4
    assert len(mesh.replication.layout.workers) > 1
    assert mesh.replication.hash() == one.replication.hash()
