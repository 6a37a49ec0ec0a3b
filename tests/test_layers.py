"""Folders are layers: imports inside ``clerk_sync`` point down (or sideways), never up, and never
in a cycle. The graph is computed from the source (every import, lazy ones included)."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import clerk_sync

PACKAGE = Path(clerk_sync.__file__).parent

# The longest matching prefix decides a module's layer; a module may import its own layer or lower.
LAYERS: dict[str, int] = {
    "clerk_sync": 0,  # the root package: __version__ and the 0.1.x aliases
    "clerk_sync._compat": 0,
    "clerk_sync._logging": 0,
    "clerk_sync.errors": 0,
    "clerk_sync.config": 0,
    "clerk_sync.events": 0,
    "clerk_sync.engine": 0,
    "clerk_sync.metrics": 0,
    "clerk_sync.changes": 0,
    "clerk_sync.tracing": 0,
    "clerk_sync.tables": 1,  # the database
    "clerk_sync.store": 1,
    "clerk_sync.migrations": 1,
    "clerk_sync.freshness": 1,
    "clerk_sync.outbox": 1,
    "clerk_sync.mapping": 1,
    "clerk_sync.webhooks": 2,  # services that talk to one outside party
    "clerk_sync.clerk_api": 2,
    "clerk_sync.ingest": 3,  # services built on those
    "clerk_sync.auth": 3,
    "clerk_sync.reconcile": 3,
    "clerk_sync.hooks": 3,
    "clerk_sync.retention": 3,
    "clerk_sync.integrations": 4,  # faces
    "clerk_sync.integrations.flask": 5,  # its `flask clerk-sync` group wraps cli/ commands
    "clerk_sync.testing": 4,
    "clerk_sync.cli": 5,
    "clerk_sync.integrations.django.management": 5,  # manage.py commands wrap the CLI's functions
    "clerk_sync.emulator": 0,  # Clerk's stand-in: an island (see ISLANDS)
}
ISLANDS = ("clerk_sync.emulator",)  # may import nothing of clerk_sync outside itself


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "versions" not in p.parts}


def imports_of(name: str, path: Path, known: Iterable[str]) -> set[str]:
    """The clerk_sync modules ``name`` imports (``from pkg import mod`` resolves to ``pkg.mod``)."""
    known = set(known)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer_of(module: str) -> int:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward(graph: Mapping[str, Iterable[str]], layer: Mapping[str, int] | None = None) -> list[tuple[str, str]]:
    """Edges from a lower layer to a higher one, and edges out of an island."""
    rank = (lambda m: layer[m]) if layer is not None else layer_of
    bad = [(a, b) for a, targets in graph.items() for b in targets if rank(a) < rank(b)]
    for island in ISLANDS:
        bad += [(a, b) for a, targets in graph.items() if a.startswith(island)
                for b in targets if not b.startswith(island)]
    return sorted(bad)


def test_the_package_has_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_imports_point_down_only() -> None:
    assert upward(import_graph()) == []


def test_every_module_has_a_layer() -> None:
    for module in import_graph():
        layer_of(module)  # raises ValueError (max of nothing) for a module no prefix covers


def test_the_checks_catch_a_cycle_and_an_upward_edge() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    layer = {"a": 0, "b": 0, "c": 0, "d": 1, "e": 0}
    assert upward(graph, layer) == []  # d (1) -> a (0) points down
    assert upward({**graph, "e": {"d"}}, layer) == [("e", "d")]


def test_the_real_graph_is_read_from_source() -> None:
    graph = import_graph()
    assert "clerk_sync.store" in graph["clerk_sync.ingest"]
    assert "clerk_sync.auth.claims" in graph["clerk_sync.auth.sessions"]
    assert "clerk_sync.migrations" in graph["clerk_sync.cli.main"]  # "from clerk_sync import migrations"
