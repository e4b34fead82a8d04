"""meshd: dynamic server meshing on one host.

``meshd`` itself is the plugin API (:mod:`meshd.plugin`, re-exported here);
``meshd.client`` is the player client library. Everything else lives in
rooms by role: ``mesh`` (the simulation mesh), ``players`` (the gateway and
its protocol), ``store`` (the world on disk), ``ops`` (the command line,
admin socket and benchmarks) and ``common`` (what they all share); see
``docs/architecture.md``.
"""

from meshd.plugin import (
    GATEWAY,
    JOIN,
    LEAVE,
    Context,
    Entity,
    Event,
    EventHandler,
    Kind,
    PlayerHook,
    Plugin,
    PluginError,
    ReachError,
    System,
    TickRng,
    View,
    WorldBuilder,
    WorldHook,
    first_hit,
)

__all__ = [
    "GATEWAY",
    "JOIN",
    "LEAVE",
    "Context",
    "Entity",
    "Event",
    "EventHandler",
    "Kind",
    "PlayerHook",
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
