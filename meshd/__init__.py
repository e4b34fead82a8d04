"""meshd: dynamic server meshing on one host.

The public plugin API lives here; everything else is in private modules
(see ``docs/architecture.md``).
"""

from meshd.mesh.geometry import first_hit
from meshd.mesh.plugins import EventHandler, Kind, Plugin, PluginError, System, WorldHook
from meshd.mesh.step import Context, Entity, Event, ReachError, TickRng, View, WorldBuilder

__all__ = [
    "Context",
    "Entity",
    "Event",
    "EventHandler",
    "Kind",
    "Plugin",
    "PluginError",
    "ReachError",
    "System",
    "TickRng",
    "View",
    "WorldBuilder",
    "WorldHook",
    "first_hit",
]

__version__ = "0.1.0"
