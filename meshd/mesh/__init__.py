"""The simulation mesh: replication, planner, tick pipeline, worker processes.

Pure state machines (``layout``, ``messages``, ``plugins``, ``step``,
``replication``, ``planner``, ``tick``, ``usage``) and the shells around them
(``core``, ``failover``, ``supervisor``: trio; ``worker``: blocking sockets).
"""
