"""The example plugins for in-process tests (the mesh itself is :mod:`meshd.mesh.inprocess`)."""

from __future__ import annotations

from pathlib import Path

from meshd.common.wire import CONVERTER
from meshd.mesh.inprocess import NEVER, InProcessMesh, new_world
from meshd.mesh.plugins import PluginSet, load_plugins

__all__ = ["NEVER", "PLUGIN_DIR", "InProcessMesh", "new_world", "plugins_for"]

PLUGIN_DIR = Path(__file__).resolve().parent.parent / "plugins"


def plugins_for(name: str, **settings) -> PluginSet:
    return load_plugins([name], [PLUGIN_DIR], {name: settings}, CONVERTER)
