"""The planner on synthetic loads: split, merge, move, scale up and down, no flapping."""

from __future__ import annotations

import random

import pytest

from meshd.mesh.layout import Layout
from meshd.mesh.planner import Plan, Planner, PlannerSettings

SIZE = 160.0
SETTINGS = PlannerSettings(
    budget_ms=10.0,
    split_ms=2.5,
    merge_ms=0.8,
    imbalance_ms=2.0,
    min_cell=10.0,
    min_workers=1,
    max_workers=4,
    dwell_ticks=20,
    cooldown_ticks=40,
)


def crowd(points: list[tuple[float, float]], ms_each: float):
    """Leaf cost = the cost of the points inside it, as workers would measure it."""

    cache: dict[int, tuple[Layout, dict[str, float]]] = {}

    def costs(layout: Layout) -> dict[str, float]:
        if id(layout) in cache and cache[id(layout)][0] is layout:
            return cache[id(layout)][1]
        found = dict.fromkeys(layout.owners, 0.0)
        for x, y in points:
            found[layout.partition_of(x, y)] += ms_each
        cache[id(layout)] = (layout, found)
        return found

    return costs


def drive(layout, cost_of, ticks, *, every=10, noise=0.0, seed=0, start=0, planner=None, **kw):
    """Run the planner like the core does; return the final layout and every plan applied."""
    rng = random.Random(seed)
    planner = planner or Planner(SETTINGS, layout, start)
    plans: list[tuple[int, Plan]] = []
    for tick in range(start + 1, start + ticks + 1):
        costs = cost_of(layout)
        planner.observe({k: v * (1 + rng.uniform(-noise, noise)) for k, v in costs.items()})
        if tick % every == 0:
            plan = planner.plan(tick, layout, **kw)
            if plan is not None:
                layout = Layout(SIZE, 5.0, plan.owners)
                plans.append((tick, plan))
    return layout, plans, planner


def spread(n: int, seed: int = 1) -> list[tuple[float, float]]:
    rng = random.Random(seed)
    return [(rng.uniform(0, SIZE), rng.uniform(0, SIZE)) for _ in range(n)]


def huddle(n: int, x: float, y: float, r: float, seed: int = 2) -> list[tuple[float, float]]:
    rng = random.Random(seed)
    return [(x + rng.uniform(-r, r), y + rng.uniform(-r, r)) for _ in range(n)]


def test_a_hot_leaf_splits_only_after_its_dwell_time() -> None:
    layout = Layout.grid(SIZE, 5.0, 2, 1)
    hot = crowd(huddle(300, 30.0, 30.0, 8.0), 0.01)  # 3 ms in leaf 1/0/0
    _, plans, _ = drive(layout, hot, 19)
    assert plans == []  # not before the leaf has dwelt 20 ticks
    layout, plans, _ = drive(layout, hot, 20)
    assert plans[0][1].splits == ["1/0/0"]
    assert {"2/0/0", "2/1/1", "1/1/1"} <= set(layout.owners)


def test_splitting_stops_at_the_minimum_cell() -> None:
    layout = Layout.grid(SIZE, 5.0, 2, 1)
    layout, _, _ = drive(layout, crowd(huddle(2000, 30.0, 30.0, 1.0), 0.01), 400)
    smallest = min(r.x1 - r.x0 for r in layout.rects.values())
    assert smallest == 10.0  # 160 / 16; one more split would give 5 m < min_cell


def test_cold_siblings_merge_back() -> None:
    layout = Layout.grid(SIZE, 5.0, 8, 1)
    layout, plans, _ = drive(layout, crowd(spread(40), 0.01), 200)
    assert plans and all(p.merges for _, p in plans)
    assert len(layout.owners) == 1 and "0/0/0" in layout.owners


def test_load_moves_from_the_busiest_to_the_idlest_worker_next_door() -> None:
    owners = {f"2/{ix}/{iy}": 0 if ix < 3 else 1 for ix in range(4) for iy in range(4)}
    layout = Layout(SIZE, 5.0, owners)
    points = spread(1000)  # 10 ms spread evenly: 7.5 ms on worker 0, 2.5 ms on worker 1
    layout, plans, planner = drive(layout, crowd(points, 0.01), 30)
    moves = [move for _, p in plans for move in p.moves]
    assert moves and all(src == 0 and dst == 1 for _, src, dst in moves)
    ones = [rect for leaf, rect in layout.rects.items() if layout.owners[leaf] == 1]
    for leaf, _, _ in moves:  # worker 1 grew next door: few new ghosts
        assert sum(layout.rects[leaf].intersects(rect) for rect in ones) >= 2
    loads = planner.loads(layout.owners)
    comfortable = SETTINGS.scale_down * SETTINGS.budget_ms
    assert loads[0] < comfortable or loads[0] - loads[1] <= SETTINGS.imbalance_ms
    assert loads[1] < loads[0]  # stopped before overshooting


def test_a_worker_starts_when_the_load_exceeds_the_budget_and_stops_after() -> None:
    layout = Layout.grid(SIZE, 5.0, 4, 1)
    busy = crowd(spread(1400), 0.01)  # 14 ms: more than one 10 ms budget
    cannot, plans, _ = drive(layout, busy, 60, can_start=False)
    assert cannot.workers == [0] and not any(p.started for _, p in plans)
    layout, plans, planner = drive(layout, busy, 100)
    assert [w for _, p in plans for w in p.started] == [1]
    assert layout.workers == [0, 1]
    assert max(planner.loads(layout.owners).values()) < SETTINGS.budget_ms
    layout, plans, _ = drive(layout, crowd(spread(300), 0.01), 200, start=100, planner=planner)
    assert [w for _, p in plans for w in p.stopped] == [1]
    assert layout.workers == [0]


def test_never_more_workers_than_max_workers() -> None:
    layout = Layout.grid(SIZE, 5.0, 4, 1)
    layout, _, _ = drive(layout, crowd(spread(10_000), 0.01), 600)
    assert len(layout.workers) == SETTINGS.max_workers


def test_a_frozen_workers_leaves_are_left_alone() -> None:
    owners = {f"1/{ix}/{iy}": ix for ix in range(2) for iy in range(2)}
    layout = Layout(SIZE, 5.0, owners)
    points = huddle(1400, 40.0, 40.0, 30.0) + huddle(1400, 120.0, 120.0, 30.0)
    after, plans, _ = drive(layout, crowd(points, 0.01), 200, frozen_workers={0})
    assert plans
    assert {leaf: w for leaf, w in after.owners.items() if w == 0} == {"1/0/0": 0, "1/0/1": 0}


@pytest.mark.parametrize("noise", [0.3, 0.6])
def test_noisy_costs_do_not_make_it_flap(noise: float) -> None:
    layout = Layout.grid(SIZE, 5.0, 4, 1)
    points = spread(700) + huddle(500, 40.0, 120.0, 10.0)  # 12 ms: two workers' worth
    layout, plans, _ = drive(layout, crowd(points, 0.01), 3000, noise=noise, seed=3)
    settled = [(tick, p) for tick, p in plans if tick > 1000]
    assert len(settled) <= 3, [(t, p.splits, p.merges, p.moves) for t, p in settled]
    assert not any(p.started or p.stopped for _, p in settled)
    assert layout.workers == [0, 1]
