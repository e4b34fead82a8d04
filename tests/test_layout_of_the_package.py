"""The package's shape: rooms by role, no import cycles, the public API pinned."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import meshd
import meshd.plugin as plugin_api

PACKAGE = Path(meshd.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _exists(module: str) -> bool:
    path = PACKAGE.parent / module.replace(".", "/")
    return path.with_suffix(".py").exists() or path.is_dir()


def imports_of(path: Path) -> set[str]:
    """The meshd modules a module imports when it runs (at any depth; not TYPE_CHECKING's)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("meshd"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("meshd"):
            for alias in node.names:  # "from meshd.ops import bench" imports a module
                module = f"{node.module}.{alias.name}"
                found.add(module if _exists(module) else str(node.module))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {
        name: {other for other in imports_of(path) if other in modules and other != name}
        for name, path in modules.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def strong(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                strong(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            strong(node)
    return found


def test_no_module_imports_itself_round_about() -> None:
    assert cycles(graph()) == []


FLOORS = {
    "common": 0,
    "plugin": 1,
    "store": 1,
    "mesh": 2,
    "players": 3,
    "client": 4,
    "ops": 5,
    "testing": 6,
}
"""Each room imports only from rooms on lower floors (``docs/architecture.md``)."""


def test_rooms_import_downwards_only() -> None:
    floor = FLOORS
    edges: dict[str, set[str]] = defaultdict(set)
    for module, imported in graph().items():
        room = module.split(".")[1] if "." in module else "meshd"
        for other in imported:
            other_room = other.split(".")[1] if "." in other else "meshd"
            if room != other_room:
                edges[room].add(other_room)
    upwards = [
        (room, other)
        for room, others in edges.items()
        for other in others
        if room in floor and other in floor and floor[other] > floor[room]
    ]
    assert upwards == [], upwards


def test_the_public_plugin_api_is_pinned() -> None:
    assert meshd.__all__ == [
        "FORGET",
        "GATEWAY",
        "JOIN",
        "LEAVE",
        "Arg",
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
        "choice",
        "first_hit",
        "flag",
        "integer",
        "list_of",
        "number",
        "takes",
        "text",
    ]
    assert plugin_api.__all__ == meshd.__all__
    assert all(getattr(meshd, name) is getattr(plugin_api, name) for name in meshd.__all__)


def test_long_modules_say_why_at_their_top() -> None:
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > 400:
            docstring = ast.get_docstring(ast.parse(text)) or ""
            assert "long" in docstring.lower(), f"{path.relative_to(PACKAGE)} has no reason"
