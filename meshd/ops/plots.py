"""PNG pictures for operators: the world map and the rush benchmark timeline (writes files).

matplotlib is imported here only, and only by the commands that draw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no screen needed
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle


class MapError(Exception):
    """The map cannot be drawn as asked (a plugin named a colour matplotlib does not know)."""


def draw_map(view: Mapping[str, Any], path: Path) -> None:
    """Write :func:`map_figure` of ``view`` to ``path``. Raises :class:`MapError`."""
    figure = map_figure(view)
    figure.savefig(path, bbox_inches="tight")
    plt.close(figure)


def map_figure(view: Mapping[str, Any]) -> Figure:
    """Partitions as squares coloured by worker; entities as dots, a colour per kind (the
    plugin's ``Kind.colour``, else the next of a palette). Raises :class:`MapError`."""
    size = view["size"]
    palette = plt.get_cmap("tab10")
    figure, axes = plt.subplots(figsize=(8, 8), dpi=100)
    workers = sorted({p["worker"] for p in view["partitions"]})
    for partition in view["partitions"]:
        x0, y0, x1, y1 = partition["bounds"]
        colour = palette(workers.index(partition["worker"]) % 10)
        axes.add_patch(
            Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor=colour, alpha=0.35, edgecolor="0.3")
        )
    by_kind: dict[str, list[tuple[float, float]]] = {}
    for x, y, kind in view["entities"]:
        by_kind.setdefault(kind, []).append((x, y))
    kinds_palette = plt.get_cmap("Dark2")
    named = view.get("colours", {})
    for kind, colour in sorted(named.items()):
        if not matplotlib.colors.is_color_like(colour):
            plt.close(figure)
            raise MapError(f"kind {kind!r}: colour {colour!r} is not a colour matplotlib knows")
    dots = []
    for index, (kind, points) in enumerate(sorted(by_kind.items())):
        xs, ys = zip(*points, strict=True)
        colour = named.get(kind) or kinds_palette(index % 8)
        dots.append(axes.scatter(xs, ys, s=3, color=colour, linewidths=0, label=kind))
    workers_legend = axes.legend(
        [Rectangle((0, 0), 1, 1, color=palette(i % 10), alpha=0.5) for i in range(len(workers))],
        [f"worker {w}" for w in workers],
        loc="upper right",
        fontsize="small",
    )
    if dots:
        axes.add_artist(workers_legend)  # a second legend replaces the first unless kept
        axes.legend(handles=dots, loc="upper left", fontsize="small", markerscale=3)
    axes.set_xlim(0, size)
    axes.set_ylim(0, size)
    axes.set_aspect("equal")
    axes.set_title(
        f"tick {view['tick']}: {len(view['entities'])} entities, "
        f"{len(view['partitions'])} partitions, {len(workers)} workers"
    )
    return figure


def draw_timeline(
    runs: Mapping[str, Sequence[tuple[float, int, float]]], budget_ms: float, path: Path
) -> None:
    """Workers and tick time over time, one line per run (name -> (seconds, workers, tick ms))."""
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, dpi=100)
    for name, samples in runs.items():
        seconds = [s[0] for s in samples]
        top.step(seconds, [s[1] for s in samples], where="post", label=name)
        bottom.plot(seconds, [s[2] for s in samples], linewidth=0.6, label=name)
    bottom.axhline(budget_ms, color="red", linestyle="--", linewidth=0.8, label="tick interval")
    top.set_ylabel("workers")
    bottom.set_ylabel("tick ms")
    bottom.set_xlabel("seconds")
    top.legend(loc="upper left", fontsize="small")
    bottom.legend(loc="upper left", fontsize="small")
    figure.savefig(path, bbox_inches="tight")
    plt.close(figure)
