"""The code's own rules, checked: where SQL lives, who may know the composition root, how timeouts
are written, and that the code stands on its own (no pointers to documents outside the repository)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "kontext_gateway"
SOURCES = sorted(PACKAGE.rglob("*.py"))
# Entry points and the composition root: the only modules that may know `Gateway`.
ENTRY_POINTS = {PACKAGE / "gateway.py", PACKAGE / "cli.py", *(PACKAGE / "api").glob("*.py")}


def _imports(path: Path) -> set[str]:
    """Every module (and `module.name`) a file imports, relative imports resolved."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT / "src").with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_only_the_entry_points_know_the_composition_root(path: Path) -> None:
    if path in ENTRY_POINTS:
        return
    assert "kontext_gateway.gateway" not in _imports(path), (
        f"{_rel(path)} imports the Gateway: take the collaborators it uses in its constructor instead"
    )


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_sql_lives_in_the_store(path: Path) -> None:
    if path.is_relative_to(PACKAGE / "store"):
        return
    text = path.read_text()
    assert not any(m.split(".")[0] == "sqlalchemy" for m in _imports(path)), (
        f"{_rel(path)} uses SQLAlchemy: add a method to the store package instead"
    )
    assert not re.search(r"\.(_)?session\(\)", text), f"{_rel(path)} opens a database session outside the store"


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_timeouts_use_asyncio_timeout(path: Path) -> None:
    # Python 3.11's wait_for can swallow a cancel that arrives as the awaited thing finishes, and the
    # task then never stops; asyncio.timeout cannot.
    assert "wait_for(" not in path.read_text(), f"{_rel(path)} uses asyncio.wait_for: use asyncio.timeout"


CODE = [*SOURCES, *sorted((ROOT / "tests").rglob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py"))]
OUTSIDE = re.compile(r"shared/(reference|specs|seeds)|\bissues? \d+\b|\(issue \d+\)", re.IGNORECASE)


@pytest.mark.parametrize("path", [p for p in CODE if "node_modules" not in p.parts and p != Path(__file__)], ids=_rel)
def test_code_stands_on_its_own(path: Path) -> None:
    """Comments and docstrings say what they mean here, never 'see that document' or 'issue 7'."""
    hits = [f"{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1) if OUTSIDE.search(line)]
    assert hits == [], f"{_rel(path)} points outside the repository:\n" + "\n".join(hits)


def test_no_import_cycles() -> None:
    """Modules import downward only (TYPE_CHECKING imports count too): a cycle means two concepts that
    should be one, or a collaborator that should be passed in."""
    names = {".".join(p.relative_to(ROOT / "src").with_suffix("").parts).removesuffix(".__init__"): p for p in SOURCES}
    graph = {name: {m for m in _imports(path) if m in names and m != name} for name, path in names.items()}
    cycles: list[list[str]] = []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                cycles.append(sorted([v, *component]))

    for name in graph:
        if name not in index:
            visit(name)
    assert cycles == []
