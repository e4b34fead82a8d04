"""Interest: who sees what, against a brute-force scan."""

from __future__ import annotations

import itertools
import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from meshd.mesh.layout import cell_of
from meshd.players.interest import nearest_rows, watch_cells

coordinate = st.floats(0.0, 100.0)
entities = st.lists(st.tuples(coordinate, coordinate), min_size=1, max_size=60)


@given(entities, st.integers(1, 20), st.floats(1.0, 60.0))
def test_nearest_matches_a_brute_force_scan(points, cap, radius) -> None:
    positions = np.array(points, dtype=np.float64)
    everyone = np.arange(len(points))
    views = nearest_rows(positions, positions, everyone, radius, cap)
    assert views.shape == (len(points), cap)
    for me, view in enumerate(views.tolist()):
        view = [row for row in view if row != len(points)]
        assert view[0] == me  # yourself first
        distance_to = [math.dist(points[me], other) for other in points]
        inside = sorted(d for d in distance_to if d < radius - 1e-9)
        edge = sorted(d for d in distance_to if d <= radius + 1e-9)
        assert min(cap, len(inside)) <= len(view) <= min(cap, len(edge))
        distances = [distance_to[i] for i in view[1:]]
        assert all(a <= b + 1e-9 for a, b in itertools.pairwise(distances))
        if len(inside) > cap:  # the cap keeps the nearest
            assert max(distances, default=0.0) <= inside[cap - 1] + 1e-9


def test_nearest_with_nobody_looking_or_nothing_to_see() -> None:
    nobody = nearest_rows(np.zeros((1, 2)), np.zeros((0, 2)), np.zeros(0, np.int64), 10.0, 4)
    assert nobody.shape == (0, 4)
    alone = nearest_rows(np.zeros((1, 2)), np.zeros((1, 2)), np.zeros(1, np.int64), 10.0, 4)
    assert alone.tolist() == [[0, 1, 1, 1]]


def test_watched_cells_cover_the_view_and_a_ring() -> None:
    cells = watch_cells(np.array([(45.0, 45.0)]), 30.0, 30.0)
    assert [1, 1] in cells and [-1, -1] in cells and [3, 3] in cells and len(cells) == 25
    assert watch_cells(np.empty((0, 2)), 30.0, 30.0) == []


@given(
    st.lists(st.tuples(st.floats(-2000.0, 2000.0), st.floats(-2000.0, 2000.0)), max_size=40),
    st.floats(1.0, 90.0),
    st.floats(5.0, 60.0),
)
def test_watched_cells_match_a_cell_by_cell_expansion(points, radius, cell) -> None:
    reach = math.ceil(radius / cell) + 1
    expected = sorted(
        {
            (cx + dx, cy + dy)
            for cx, cy in (cell_of(x, y, cell) for x, y in points)
            for dx in range(-reach, reach + 1)
            for dy in range(-reach, reach + 1)
        }
    )
    positions = np.array(points, dtype=np.float64).reshape(-1, 2)
    assert watch_cells(positions, radius, cell) == [list(c) for c in expected]
