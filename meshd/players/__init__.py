"""The players' side: the protocol (pure), interest management (pure) and the gateway (trio)."""
