"""Partition layout properties (pure, hypothesis)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.mesh.layout import Layout, leaf_rect
from meshd.plugin import clamp

SIZE = 400.0

coordinate = st.floats(min_value=-50.0, max_value=SIZE + 50.0) | st.just(math.nan)


@st.composite
def layouts(draw: st.DrawFn) -> Layout:
    """Random quadtrees: start from the root and split random leaves."""
    leaves = {"0/0/0"}
    for _ in range(draw(st.integers(0, 12))):
        leaf = draw(st.sampled_from(sorted(leaves)))
        level, ix, iy = (int(p) for p in leaf.split("/"))
        if level >= 5:
            continue
        leaves.remove(leaf)
        leaves |= {f"{level + 1}/{2 * ix + dx}/{2 * iy + dy}" for dx in (0, 1) for dy in (0, 1)}
    workers = draw(st.integers(1, 4))
    owners = {leaf: draw(st.integers(0, workers - 1)) for leaf in sorted(leaves)}
    halo = draw(st.floats(min_value=0.5, max_value=120.0))
    return Layout(SIZE, halo, owners)


@given(layouts(), coordinate, coordinate)
def test_every_point_lies_in_exactly_one_partition(layout: Layout, x: float, y: float) -> None:
    x, y = clamp(x, SIZE), clamp(y, SIZE)
    containing = [leaf for leaf, rect in layout.rects.items() if rect.contains(x, y)]
    assert containing == [layout.partition_of(x, y)]


@given(layouts(), coordinate, coordinate)
def test_ghost_targets_match_brute_force(layout: Layout, x: float, y: float) -> None:
    x, y = clamp(x, SIZE), clamp(y, SIZE)
    owner = layout.owner_of(x, y)
    expected = {
        layout.owners[leaf]
        for leaf, rect in layout.rects.items()
        if rect.distance(x, y) <= layout.halo
    } - {owner}
    assert layout.ghost_targets(x, y, owner) == tuple(sorted(expected))


@settings(max_examples=200)
@given(layouts(), coordinate, coordinate)
def test_safe_rect_never_hides_a_ghost(layout: Layout, x: float, y: float) -> None:
    x, y = clamp(x, SIZE), clamp(y, SIZE)
    leaf = layout.partition_of(x, y)
    if layout.safe_rect(leaf).contains(x, y):
        assert layout.ghost_targets(x, y, layout.owners[leaf]) == ()


def test_grid_spreads_vertical_strips_over_workers() -> None:
    layout = Layout.grid(SIZE, 5.0, 4, 2)
    assert layout.workers == [0, 1]
    assert {layout.owners[f"2/{ix}/{iy}"] for ix in (0, 1) for iy in range(4)} == {0}
    assert {layout.owners[f"2/{ix}/{iy}"] for ix in (2, 3) for iy in range(4)} == {1}
    assert leaf_rect(SIZE, "2/3/1").as_list() == [300.0, 100.0, 400.0, 200.0]


def test_bad_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="power of two"):
        Layout.grid(SIZE, 5.0, 3, 1)
    with pytest.raises(ValueError, match="overlap"):
        Layout(SIZE, 5.0, {"0/0/0": 0, "1/0/0": 0})
    with pytest.raises(ValueError, match="cover"):
        Layout(SIZE, 5.0, {"1/0/0": 0})


def test_clamp_keeps_points_inside_the_world() -> None:
    assert clamp(-1.0, SIZE) == 0.0
    assert clamp(math.nan, SIZE) == 0.0
    assert clamp(SIZE, SIZE) < SIZE
    assert clamp(12.5, SIZE) == 12.5
