"""Plugin code caught breaking determinism in the act (used by ``meshd check``).

A world stays the same on any layout only if its plugins read nothing but
their entity, ``ctx`` and their settings. Two mistakes that break this are
caught where they happen rather than guessed from a differing world:

- **ambient sources**: the wall clock (``time.time``, ``time.monotonic``,
  ...), the process-wide ``random`` generator and ``os.urandom``/``uuid4``
  called from plugin code. :func:`watch_ambient` replaces them, process-wide,
  with wrappers that note the plugin file and line that called them (calls
  from meshd itself, the standard library and installed packages pass
  unnoticed). Install it *before* the plugins are imported, so that a
  plugin's ``from random import uniform`` binds the wrapper.
- **state changed in place**: a state is frozen, but a list inside it is
  not; ``me.state.items.append(...)`` changes the previous tick's state,
  which other entities of the same worker are reading this tick.
  :func:`guard_state` wraps every system and handler of a
  :class:`~meshd.mesh.plugins.PluginSet` to compare the entity's previous
  state before and after the call, field by field.

Both cost a few microseconds per call: they run in ``meshd check``, not in
``meshd serve``. Findings are ``(what, where)`` pairs with a count.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import random
import sys
import sysconfig
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2

from meshd.mesh.plugins import PluginSet
from meshd.plugin import Entity

Findings = collections.Counter[tuple[str, str]]
"""(what was done, where in the plugin) -> how many times."""

_CLOCKS = ("time", "time_ns", "monotonic", "monotonic_ns", "perf_counter", "perf_counter_ns")
_RANDOMS = (
    "random",
    "uniform",
    "randint",
    "randrange",
    "choice",
    "choices",
    "shuffle",
    "sample",
    "gauss",
    "normalvariate",
    "getrandbits",
    "triangular",
)
_MESHD = str(Path(__file__).resolve().parent.parent)
_NOT_PLUGINS = tuple(
    os.path.join(folder, "")
    for folder in {
        _MESHD,
        *(sysconfig.get_path(name) for name in ("stdlib", "platstdlib", "purelib", "platlib")),
    }
)
"""Where code is not a plugin's: meshd, the standard library, installed packages."""


def _plugin_caller(depth: int = 2) -> str | None:
    """``file:line in function`` of the caller ``depth`` frames up, if it is plugin code."""
    frame = sys._getframe(depth)
    path = frame.f_code.co_filename
    if path.startswith(_NOT_PLUGINS) or path.startswith("<"):
        return None
    return f"{Path(path).name}:{frame.f_lineno} in {frame.f_code.co_name}"


def _noted(findings: Findings, what: str, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def call(*args: Any, **kwargs: Any) -> Any:
        where = _plugin_caller()
        if where is not None:
            findings[(what, where)] += 1
        return original(*args, **kwargs)

    return call


@contextlib.contextmanager
def watch_ambient(findings: Findings) -> Iterator[None]:
    """Note every call from plugin code to the clock or the global random generator."""
    targets = [(time, name, f"time.{name}()") for name in _CLOCKS]
    targets += [(random, name, f"random.{name}() (the global generator)") for name in _RANDOMS]
    targets += [(os, "urandom", "os.urandom()"), (uuid, "uuid4", "uuid.uuid4()")]
    originals = [(module, name, getattr(module, name)) for module, name, _what in targets]
    try:
        for (module, name, what), (_m, _n, original) in zip(targets, originals, strict=True):
            setattr(module, name, _noted(findings, what, original))
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


def guard_state(plugins: PluginSet, findings: Findings) -> None:
    """Wrap ``plugins``' systems and handlers to note a previous state changed in place."""
    codecs = plugins.codecs

    def guarded(function: Callable[..., Any]) -> Callable[..., Any]:
        code = getattr(function, "__code__", None)
        name = getattr(function, "__qualname__", repr(function))
        where = (
            name
            if code is None
            else f"{Path(code.co_filename).name}:{code.co_firstlineno} in {name}"
        )

        @functools.wraps(function)
        def run(entity: Entity, *args: Any) -> Any:
            state, codec = entity.state, codecs[entity.kind]
            before = cbor2.dumps(codec.to_wire(state))
            try:
                return function(entity, *args)
            finally:
                after = codec.to_wire(state)
                if cbor2.dumps(after) != before:
                    changed = [
                        field
                        for field, old, new in zip(
                            codec.fields, cbor2.loads(before), after, strict=True
                        )
                        if cbor2.dumps(old) != cbor2.dumps(new)
                    ]
                    what = (
                        f"the previous {entity.kind}.{'/'.join(changed)} changed in place "
                        "(give attrs.evolve a new list or dict instead)"
                    )
                    findings[(what, where)] += 1

        return run

    plugins.systems = {
        kind: tuple(guarded(system) for system in systems)
        for kind, systems in plugins.systems.items()
    }
    plugins.handlers = {event: guarded(handler) for event, handler in plugins.handlers.items()}
