"""Partition layout: which square of the world each partition covers and who owns it (pure).

Pure data and arithmetic, shared by the core and the workers so that both
classify positions identically. Partitions are quadtree leaves named
``"level/ix/iy"``; a static grid is the special case where every leaf sits at
the same level. Positions are always clamped into ``[0, size)`` first, so every
point of the world lies in exactly one partition.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import attrs


@attrs.frozen
class Rect:
    """Half-open axis-aligned square ``[x0, x1) x [y0, y1)``."""

    x0: float
    y0: float
    x1: float
    y1: float

    def contains(self, x: float, y: float) -> bool:
        return self.x0 <= x < self.x1 and self.y0 <= y < self.y1

    def distance(self, x: float, y: float) -> float:
        """Euclidean distance from a point to the rectangle (0 inside)."""
        dx = max(self.x0 - x, 0.0, x - self.x1)
        dy = max(self.y0 - y, 0.0, y - self.y1)
        return math.hypot(dx, dy)

    def intersects(self, other: Rect) -> bool:
        return (
            self.x0 <= other.x1
            and other.x0 <= self.x1
            and self.y0 <= other.y1
            and other.y0 <= self.y1
        )

    def as_list(self) -> list[float]:
        return [self.x0, self.y0, self.x1, self.y1]


def leaf_name(level: int, ix: int, iy: int) -> str:
    """The name of the quadtree leaf at ``level`` (side ``size / 2**level``), column ``ix``,
    row ``iy``: ``"level/ix/iy"``, as operators see it in ``inspect partitions``."""
    return f"{level}/{ix}/{iy}"


def parse_leaf(leaf: str) -> tuple[int, int, int]:
    """``(level, ix, iy)`` of a leaf name."""
    level, ix, iy = (int(part) for part in leaf.split("/"))
    return level, ix, iy


def children(leaf: str) -> list[str]:
    """The four leaves a leaf splits into."""
    level, ix, iy = parse_leaf(leaf)
    return [leaf_name(level + 1, 2 * ix + dx, 2 * iy + dy) for dx in (0, 1) for dy in (0, 1)]


def parent(leaf: str) -> str | None:
    """The leaf four siblings merge into (None for the whole world)."""
    level, ix, iy = parse_leaf(leaf)
    return None if level == 0 else leaf_name(level - 1, ix // 2, iy // 2)


def cell_of(x: float, y: float, size: float) -> tuple[int, int]:
    """The interest cell (side ``size``) holding a point: the key the core indexes
    records by, and the cells players watch (``Step.watch``)."""
    return int(x // size), int(y // size)


def leaf_rect(size: float, leaf: str) -> Rect:
    """The square covered by the quadtree leaf named ``"level/ix/iy"``."""
    level, ix, iy = parse_leaf(leaf)
    side = size / (1 << level)
    return Rect(ix * side, iy * side, (ix + 1) * side, (iy + 1) * side)


@attrs.define(eq=False)
class Layout:
    """Leaves of the world square and the worker that owns each.

    ``owners`` maps leaf name to worker id. ``halo`` is the ghost radius: an
    entity is a ghost for every other worker owning a leaf within ``halo`` of
    it. Lookups go through a table at the finest leaf level, so a point is
    classified in O(1) whatever the tree looks like.
    """

    size: float
    halo: float
    owners: dict[str, int]
    rects: dict[str, Rect] = attrs.field(init=False)
    _depth: int = attrs.field(init=False)
    _cell: float = attrs.field(init=False)
    _table: list[list[str]] = attrs.field(init=False)
    _safe: dict[str, Rect] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        if not self.owners:
            raise ValueError("a layout needs at least one partition")
        self.rects = {leaf: leaf_rect(self.size, leaf) for leaf in self.owners}
        self._depth = max(parse_leaf(leaf)[0] for leaf in self.owners)
        cells = 1 << self._depth
        self._cell = self.size / cells
        table: list[list[str | None]] = [[None] * cells for _ in range(cells)]
        for leaf in self.owners:
            level, ix, iy = parse_leaf(leaf)
            span = 1 << (self._depth - level)
            for cx in range(ix * span, (ix + 1) * span):
                for cy in range(iy * span, (iy + 1) * span):
                    if table[cx][cy] is not None:
                        raise ValueError(f"partitions {table[cx][cy]} and {leaf} overlap")
                    table[cx][cy] = leaf
        for column in table:
            if None in column:
                raise ValueError("partitions do not cover the whole world")
        self._table = table  # type: ignore[assignment]
        self._safe = {leaf: self._safe_rect(leaf) for leaf in self.owners}

    @classmethod
    def grid(cls, size: float, halo: float, grid: int, workers: int) -> Layout:
        """A ``grid x grid`` static layout spread over ``workers`` in vertical strips.

        Strips keep neighbouring partitions on the same worker, so only the
        strip edges carry ghosts.
        """
        level = grid.bit_length() - 1
        if grid < 1 or 1 << level != grid:
            raise ValueError(f"grid must be a power of two, got {grid}")
        owners = {
            leaf_name(level, ix, iy): ix * workers // grid
            for ix in range(grid)
            for iy in range(grid)
        }
        return cls(size, halo, owners)

    @property
    def workers(self) -> list[int]:
        return sorted(set(self.owners.values()))

    def partition_of(self, x: float, y: float) -> str:
        """The leaf containing an (already clamped) point."""
        last = len(self._table) - 1
        return self._table[min(int(x / self._cell), last)][min(int(y / self._cell), last)]

    def owner_of(self, x: float, y: float) -> int:
        return self.owners[self.partition_of(x, y)]

    def leaves_near(self, x: float, y: float, radius: float) -> set[str]:
        """Leaves with any point within ``radius`` of (x, y), by exact distance."""
        last = len(self._table) - 1
        cx0 = max(int((x - radius) / self._cell), 0)
        cx1 = min(int((x + radius) / self._cell), last)
        cy0 = max(int((y - radius) / self._cell), 0)
        cy1 = min(int((y + radius) / self._cell), last)
        found = {self._table[cx][cy] for cx in range(cx0, cx1 + 1) for cy in range(cy0, cy1 + 1)}
        return {leaf for leaf in found if self.rects[leaf].distance(x, y) <= radius}

    def ghost_targets(self, x: float, y: float, owner: int) -> tuple[int, ...]:
        """Workers other than ``owner`` that must hold a ghost of an entity at (x, y)."""
        targets = {self.owners[leaf] for leaf in self.leaves_near(x, y, self.halo)}
        targets.discard(owner)
        return tuple(sorted(targets))

    def safe_rect(self, leaf: str) -> Rect:
        """Inner part of ``leaf`` whose points need no ghost anywhere (conservative)."""
        return self._safe[leaf]

    def _safe_rect(self, leaf: str) -> Rect:
        rect, owner, h = self.rects[leaf], self.owners[leaf], self.halo
        strips = {
            "left": Rect(rect.x0 - h, rect.y0 - h, rect.x0, rect.y1 + h),
            "right": Rect(rect.x1, rect.y0 - h, rect.x1 + h, rect.y1 + h),
            "bottom": Rect(rect.x0 - h, rect.y0 - h, rect.x1 + h, rect.y0),
            "top": Rect(rect.x0 - h, rect.y1, rect.x1 + h, rect.y1 + h),
        }
        foreign = [r for other, r in self.rects.items() if self.owners[other] != owner]
        exposed = {
            side for side, strip in strips.items() if any(strip.intersects(r) for r in foreign)
        }
        return Rect(
            rect.x0 + h if "left" in exposed else rect.x0,
            rect.y0 + h if "bottom" in exposed else rect.y0,
            rect.x1 - h if "right" in exposed else rect.x1,
            rect.y1 - h if "top" in exposed else rect.y1,
        )

    def to_wire(self) -> dict[str, int]:
        return dict(self.owners)

    def leaves_of(self, worker: int) -> list[str]:
        return sorted(leaf for leaf, owner in self.owners.items() if owner == worker)


def sorted_leaves(leaves: Iterable[str]) -> list[str]:
    """Leaves in a stable, human-friendly order (level, then x, then y)."""
    return sorted(leaves, key=parse_leaf)
