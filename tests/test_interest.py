"""Interest: who sees what, against a brute-force scan."""

from __future__ import annotations

import itertools
import math

from hypothesis import given
from hypothesis import strategies as st

from meshd.players.interest import Viewer, nearest, update_view, watch_cells

coordinate = st.floats(0.0, 100.0)
entities = st.lists(st.tuples(coordinate, coordinate), min_size=1, max_size=60)


@given(entities, st.integers(1, 20), st.floats(1.0, 60.0))
def test_nearest_matches_a_brute_force_scan(points, cap, radius) -> None:
    records = [[i + 1, "k", x, y, 0.0, ()] for i, (x, y) in enumerate(points)]
    views = nearest(records, records, radius, cap)
    for me, view in zip(records, views, strict=True):
        assert view[0] == me[0]  # yourself first
        distance_to = {r[0]: math.dist(me[2:4], r[2:4]) for r in records}
        inside = sorted(d for d in distance_to.values() if d < radius - 1e-9)
        edge = sorted(d for d in distance_to.values() if d <= radius + 1e-9)
        assert min(cap, len(inside)) <= len(view) <= min(cap, len(edge))
        distances = [distance_to[i] for i in view[1:]]
        assert all(a <= b + 1e-9 for a, b in itertools.pairwise(distances))
        if len(inside) > cap:  # the cap keeps the nearest
            assert max(distances, default=0.0) <= inside[cap - 1] + 1e-9


def test_nearest_with_nobody_looking() -> None:
    assert nearest([], [[1, "k", 0.0, 0.0, 0.0, ()]], 10.0, 4) == []


def test_watched_cells_cover_the_view_and_a_ring() -> None:
    cells = watch_cells([(45.0, 45.0)], 30.0, 30.0)
    assert [1, 1] in cells and [-1, -1] in cells and [3, 3] in cells and len(cells) == 25


def test_views_send_only_what_changed() -> None:
    viewer = Viewer(1)

    def view(ids, changed):
        enter, update, leave = update_view(
            viewer, ids, {i: ("changed", i) for i in changed}, lambda i: ("full", i)
        )
        return enter, sorted(update), sorted(leave)

    assert view([1, 2], set()) == ([("full", 1), ("full", 2)], [], [])
    assert view([1, 2], {2}) == ([], [("changed", 2)], [])
    # 3 enters whole although it changed too; 4 changed but is not in view
    assert view([3, 1, 2], {1, 3, 4}) == ([("full", 3)], [("changed", 1)], [])
    assert view([1], {1, 2}) == ([], [("changed", 1)], [2, 3])
