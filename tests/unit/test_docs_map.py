"""The code map cannot go stale silently: every path and dotted name docs/ARCHITECTURE.md (and
docs/PERFORMANCE.md, which says where each figure belongs) cites exists."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT

ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
DOCS = (ARCHITECTURE, ROOT / "docs" / "PERFORMANCE.md")

# `backend/store/append.py`, `projections/`, `backend/store/migrations/` (a path, in backticks).
PATH = re.compile(r"`((?:backend|projections|scripts|tests|docs)/[\w./-]*)`")
# `backend.store.append.AppendBatcher.submit` (a module, then attributes), in backticks.
DOTTED = re.compile(r"`((?:backend|projections)(?:\.\w+)+)`")


def cited(pattern: re.Pattern[str], doc: Path = ARCHITECTURE) -> list[str]:
    return sorted(set(pattern.findall(doc.read_text())))


def longest_module(parts: list[str]) -> tuple[ModuleType, list[str]]:
    """The longest importable prefix of parts, and the attribute names after it."""
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        relative = ROOT.joinpath(*parts[:end])
        if relative.with_suffix(".py").is_file() or (relative / "__init__.py").is_file():
            return importlib.import_module(name), parts[end:]
    raise LookupError(".".join(parts))


def test_the_map_cites_many_names() -> None:
    assert len(cited(PATH)) >= 20
    assert len(cited(DOTTED)) >= 40


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.name)
def test_every_cited_path_exists(doc: Path) -> None:
    missing = [path for path in cited(PATH, doc) if not (ROOT / path).exists()]
    assert not missing, f"{doc.name} cites paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.name)
def test_every_cited_dotted_name_resolves(doc: Path) -> None:
    missing = []
    for name in cited(DOTTED, doc):
        try:
            target: object
            target, attributes = longest_module(name.split("."))
        except LookupError:
            missing.append(name)
            continue
        for attribute in attributes:
            if not hasattr(target, attribute):
                missing.append(name)
                break
            target = getattr(target, attribute)
    assert not missing, f"{doc.name} names modules or attributes that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.name)
def test_every_cited_class_and_function_is_named_where_it_is_defined(doc: Path) -> None:
    """A class or function moved to another module is cited there, not where it is merely imported:
    `backend.streaming.hub.Subscriber` would resolve after the move, yet send a reader to the wrong file."""
    elsewhere = []
    for name in cited(DOTTED, doc):
        try:
            module, attributes = longest_module(name.split("."))
        except LookupError:
            continue  # reported by test_every_cited_dotted_name_resolves
        target = getattr(module, attributes[0], None) if attributes else None
        if inspect.isclass(target) or inspect.isfunction(target):
            defined_in = target.__module__
            if defined_in != module.__name__:
                elsewhere.append(f"{name} (defined in {defined_in})")
    assert not elsewhere, f"{doc.name} cites names where they are not defined: {elsewhere}"


def test_a_renamed_function_would_be_caught() -> None:
    module, rest = longest_module(["backend", "store", "append", "AppendBatcher", "no_such_method"])
    assert module.__name__ == "backend.store.append"
    assert rest == ["AppendBatcher", "no_such_method"]
    assert not hasattr(module.AppendBatcher, "no_such_method")


def test_every_package_and_top_level_module_is_on_the_map() -> None:
    """A new package, or a new module beside the packages, gets a place in the map (a package counts as
    placed when the map names it or anything in it)."""
    named = {path.rstrip("/").removesuffix(".py") for path in cited(PATH)}
    named |= {name.replace(".", "/") for name in cited(DOTTED)}
    wanted = [child for top in ("backend", "projections") for child in sorted((ROOT / top).iterdir())
              if (child / "__init__.py").is_file() or (top == "backend" and child.suffix == ".py"
                                                       and child.name != "__init__.py")]
    stems = [str(child.relative_to(ROOT).with_suffix("")) for child in wanted]
    assert len(stems) > 20 and "backend/server" in stems
    missing = [stem for stem in stems if stem not in named and not any(n.startswith(stem + "/") for n in named)]
    assert not missing, f"docs/ARCHITECTURE.md does not name: {missing}"
