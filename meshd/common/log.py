"""structlog setup: a human console on a TTY, JSON lines otherwise (pure helpers).

Log calls bind context (``worker=``, ``tick=``) rather than formatting
strings; under trio only the synchronous log methods are used.
"""

from __future__ import annotations

import logging
import re
import sys

import structlog


def configure(*, json: bool | None = None, level: str = "info") -> None:
    """Route structlog to stderr; ``json=None`` picks JSON unless stderr is a TTY."""
    use_json = not sys.stderr.isatty() if json is None else json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(**context: object) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger("meshd").bind(**context)


class OncePer:
    """Which keys were seen, so that a recurring error is logged once, not every tick.

    Holds at most ``limit`` keys; past that every key counts as seen, so a
    flood of distinct errors cannot grow memory (or the log) without bound.
    """

    def __init__(self, limit: int = 1000) -> None:
        self.limit = limit
        self._seen: set[tuple[str, ...]] = set()

    def first(self, key: tuple[str, ...]) -> bool:
        """True the first time ``key`` is given."""
        if key in self._seen or len(self._seen) >= self.limit:
            return False
        self._seen.add(key)
        return True


_NUMBERS = re.compile(r"-?\d+(\.\d+)?(e-?\d+)?")


def error_site(where: str, error: str) -> tuple[str, str]:
    """What makes a plugin error the same error again: its place and exception type,
    or, for meshd's own checks (no place), its message with the numbers left out."""
    if where:
        return where, error.partition(":")[0]
    return "", _NUMBERS.sub("#", error)
