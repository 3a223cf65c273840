"""No loops between layers: the import graph of backend/ and projections/ (every module parsed, every
import counted, those inside functions too) has none of the edges the layering forbids.

- backend/streaming imports no command and no HTTP module (nor the wiring that reaches them);
- the read models, runners and process managers under projections/ reach nothing of backend/http,
  backend/app.py, backend/__main__.py or backend/embedded_pg.py, directly or through other modules
  (entry points, projections/__main__.py and projections/cli.py, are wiring and exempt);
- the domain imports nothing but itself, the standard library and eventsourcing (no aiohttp, no asyncpg);
- the store imports only the domain (and the foundation modules every layer may use);
- commands reach neither streaming nor projections, and neither they nor the store import aiohttp;
- the audit layer reaches nothing of backend/http nor the wiring (its app context is backend/audit_runtime.py);
- backend/http imports nothing of backend/server (the typed keys of backend/appkeys.py aside, which
  name every layer's types): serving sits above the handlers.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("backend", "projections")
FOUNDATION = frozenset({"backend.db", "backend.config", "backend.supervisor", "backend.clock"})
"""Leaf modules below every layer (connections, settings, task supervision, time)."""
WIRING = frozenset({"backend.app", "backend.appkeys", "backend.bootstrap", "backend.__main__"})


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def _resolve(name: str) -> str | None:
    """The project module an import names (its longest known prefix), or None outside the project."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules():
            return candidate
    return None


def _package_of(module: str) -> str:
    path = modules()[module]
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


@cache
def imports(module: str) -> frozenset[str]:
    """The project modules `module` imports directly (a package's __init__ counts as imported with it)."""
    tree = ast.parse(modules()[module].read_text(), str(modules()[module]))
    named: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            named.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(module).split(".")
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            named.append(base)
            named.extend(f"{base}.{alias.name}" for alias in node.names)
    found = set()
    for name in named:
        target = _resolve(name)
        while target is not None and target != module:
            found.add(target)  # importing a.b.c runs a/__init__.py and a/b/__init__.py too
            parent = target.rpartition(".")[0]
            target = parent if parent in modules() else None
    found.discard(module)
    return frozenset(found)


def reach(module: str) -> dict[str, list[str]]:
    """Every module reachable from `module`, each with one import path to it."""
    paths: dict[str, list[str]] = {module: [module]}
    todo = [module]
    while todo:
        current = todo.pop()
        for target in sorted(imports(current)):
            if target not in paths:
                paths[target] = [*paths[current], target]
                todo.append(target)
    del paths[module]
    return paths


def under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def in_layer(prefix: str, exempt: Iterable[str] = ()) -> list[str]:
    skip = set(exempt)
    return [m for m in modules() if under(m, prefix) and m not in skip]


def violations(sources: list[str], forbidden: tuple[str, ...], transitive: bool) -> list[str]:
    found = []
    for source in sources:
        if transitive:
            for target, path in reach(source).items():
                if under(target, *forbidden):
                    found.append(" -> ".join(path))
        else:
            found.extend(f"{source} -> {t}" for t in sorted(imports(source)) if under(t, *forbidden))
    return found


def test_the_graph_is_read() -> None:
    assert len(modules()) > 100
    assert "backend.store.events" in imports("backend.store.encoding")
    assert "backend.domain.wallet" in imports("backend.domain.registry")  # relative import
    assert "backend.domain" in imports("backend.domain.registry")  # its package's __init__ runs first
    assert "backend.store.repository" in reach("backend.commands.wallets")


def test_violations_are_found_and_printed_with_their_path() -> None:
    found = violations(["backend.app"], ("backend.http",), transitive=True)
    assert any(v.startswith("backend.app -> backend.http.") for v in found)


def test_streaming_imports_no_command_and_no_http_module() -> None:
    bad = violations(in_layer("backend.streaming"), ("backend.commands", "backend.http", *WIRING), transitive=True)
    assert not bad, "streaming reaches upward:\n" + "\n".join(bad)


PROJECTION_ENTRY_POINTS = ("projections.__main__", "projections.cli")


def test_projections_reach_no_http_module_and_no_entry_point() -> None:
    forbidden = ("backend.http", "backend.app", "backend.__main__", "backend.embedded_pg")
    bad = violations(in_layer("projections", PROJECTION_ENTRY_POINTS), forbidden, transitive=True)
    assert not bad, "projections reach the HTTP layer or the wiring:\n" + "\n".join(bad)


def test_the_store_imports_only_the_domain() -> None:
    bad = [f"{source} -> {target}" for source in in_layer("backend.store") for target in sorted(imports(source))
           if not under(target, "backend.store", "backend.domain") and target not in FOUNDATION
           and target != "backend"]
    assert not bad, "the store imports beyond the domain:\n" + "\n".join(bad)


@pytest.mark.parametrize("forbidden", ["backend.streaming", "projections"])
def test_commands_reach_neither_streaming_nor_projections(forbidden: str) -> None:
    bad = violations(in_layer("backend.commands"), (forbidden,), transitive=True)
    assert not bad, "commands reach " + forbidden + ":\n" + "\n".join(bad)


def test_audit_reaches_no_http_module_and_no_wiring() -> None:
    bad = violations(in_layer("backend.audit"), ("backend.http", *WIRING), transitive=True)
    assert not bad, "audit reaches the HTTP layer or the wiring:\n" + "\n".join(bad)


def _third_party(module: str) -> set[str]:
    """The top-level packages outside the project and the standard library that `module` imports."""
    tree = ast.parse(modules()[module].read_text(), str(modules()[module]))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - set(PACKAGES)


def test_the_domain_imports_only_the_domain_and_eventsourcing() -> None:
    domain = in_layer("backend.domain")
    bad = [f"{source} -> {target}" for source in domain for target in sorted(imports(source))
           if not under(target, "backend.domain") and target != "backend"]
    bad += [f"{source} -> {package}" for source in domain for package in sorted(_third_party(source))
            if package != "eventsourcing"]
    assert not bad, "the domain imports beyond itself:\n" + "\n".join(bad)


def test_commands_and_the_store_import_no_http_library() -> None:
    bad = [f"{source} -> {package}" for source in [*in_layer("backend.commands"), *in_layer("backend.store")]
           for package in sorted(_third_party(source)) if package in ("aiohttp", "aiohttp_sse")]
    assert not bad, "statuses and content types belong to backend/http:\n" + "\n".join(bad)


def test_http_imports_nothing_of_the_server() -> None:
    bad = violations(in_layer("backend.http"), ("backend.server",), transitive=False)
    assert not bad, "backend/http reaches backend/server:\n" + "\n".join(bad)


def _handler_modules() -> list[str]:
    """The modules of backend/http that hold endpoints (a module-level `routes = web.RouteTableDef()`)."""
    found = []
    for module in in_layer("backend.http"):
        tree = ast.parse(modules()[module].read_text(), str(modules()[module]))
        if any(isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "routes" for t in node.targets)
               for node in tree.body):
            found.append(module)
    return found


def test_no_handler_module_imports_another() -> None:
    """What endpoints share (read-your-writes and paging, the audit parameters) lives in modules of its
    own: a handler module that served another as a library tied the two together."""
    handlers = _handler_modules()
    assert {"backend.http.queries", "backend.http.audit", "backend.http.api_keys"} <= set(handlers)
    bad = [f"{source} -> {target}" for source in handlers for target in sorted(imports(source))
           if target in handlers]
    assert not bad, "a handler module imports another:\n" + "\n".join(bad)
