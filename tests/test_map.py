"""``meshd inspect map``: what the picture shows, drawn from a view as the admin socket sends it."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.colors import to_rgba
from matplotlib.legend import Legend

from meshd.ops.plots import MapError, draw_map, map_figure


def test_the_map_draws_each_kind_in_its_plugins_colour_with_a_legend(tmp_path: Path) -> None:
    view = {
        "size": 100.0,
        "tick": 7,
        "partitions": [{"bounds": [0.0, 0.0, 100.0, 100.0], "worker": 0}],
        "entities": [[10.0, 10.0, "kid"], [20.0, 30.0, "kid"], [50.0, 50.0, "snowball"]],
        "colours": {"kid": "tab:red"},
    }
    axes = map_figure(view).axes[0]
    dots = {d.get_label(): d for d in axes.collections}
    assert tuple(dots["kid"].get_facecolor()[0]) == to_rgba("tab:red")
    assert tuple(dots["snowball"].get_facecolor()[0]) != to_rgba("tab:red")
    legends = [t.get_text() for legend in axes.findobj(Legend) for t in legend.get_texts()]
    assert {"kid", "snowball", "worker 0"} <= set(legends)
    with pytest.raises(MapError, match="kind 'kid': colour 'blurple' is not a colour"):
        draw_map({**view, "colours": {"kid": "blurple"}}, tmp_path / "map.png")
    draw_map(view, tmp_path / "map.png")
    assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"
