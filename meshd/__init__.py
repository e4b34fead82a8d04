"""meshd: dynamic server meshing on one host.

``meshd`` itself is the plugin API (:mod:`meshd.plugin`, re-exported here);
``meshd.client`` is the player client library. Everything else lives in
rooms by role: ``mesh`` (the simulation mesh), ``players`` (the gateway and
its protocol), ``store`` (the world on disk), ``ops`` (the command line,
admin socket and benchmarks) and ``common`` (what they all share); see
``docs/architecture.md``.
"""

from meshd.plugin import *  # noqa: F403 (the plugin API is meshd's own namespace)
from meshd.plugin import __all__ as __all__

__version__ = "0.1.0"
