"""The architecture rules, checked on the import graph of the source tree (every import statement, including those
inside functions and under TYPE_CHECKING):

- everything imports as `edgecv.…`: nothing imports a top-level `agent` or `tools`;
- device code never imports workstation code (`edgecv.agent` → `edgecv.tools` is forbidden);
- no import cycles among the agent's modules (a cycle means an interface is missing);
- every package folder of the source tree is listed in pyproject.toml, so the wheel carries it.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = {"edgecv.agent": REPO / "agent", "edgecv.tools": REPO / "tools"}


def modules() -> dict[str, Path]:
    """Module name → file, for every .py file under agent/ and tools/."""
    out = {}
    for package, root in SOURCES.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def imported_names(path: Path) -> Iterator[tuple[str, int]]:
    """(dotted name, line) of everything a file imports: `import a.b` gives a.b; `from a import b` gives a.b (which
    is a module or a name in a)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                yield f"{node.module}.{alias.name}", node.lineno


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The module of ours that an imported name refers to (the longest known prefix), or None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def test_everything_imports_through_the_edgecv_namespace() -> None:
    bad = []
    for root in ("agent", "tools", "tests", "bench"):
        for path in sorted((REPO / root).rglob("*.py")):
            for name, line in imported_names(path):
                if name.split(".")[0] in ("agent", "tools"):
                    bad.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert bad == []


def test_device_code_never_imports_workstation_code() -> None:
    known = modules()
    bad = [f"{path.relative_to(REPO)}:{line} imports {name}"
           for module, path in known.items() if module.startswith("edgecv.agent")
           for name, line in imported_names(path) if name.startswith("edgecv.tools")]
    assert bad == []


def test_no_import_cycles_in_the_agent() -> None:
    known = modules()
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        if not module.startswith("edgecv.agent"):
            continue
        targets = {resolve(name, known) for name, _ in imported_names(path)}
        graph[module] = {t for t in targets if t and t != module and t.startswith("edgecv.agent")}
    cycles = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" → ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


def test_every_package_folder_ships_in_the_wheel() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    assert {k: str(v) for k, v in config["package-dir"].items()} == {
        "edgecv.agent": "agent", "edgecv.tools": "tools", "edgecv.models": "models", "edgecv.systemd": "systemd"}
    found = {module for module, path in modules().items() if path.name == "__init__.py"}
    assert found - listed == set(), "package folders missing from pyproject.toml [tool.setuptools] packages"
    assert {p for p in listed if p.startswith(("edgecv.agent", "edgecv.tools"))} - found == set()


@pytest.mark.parametrize("name", ["edgecv.agent.app", "edgecv.agent.cli", "edgecv.tools.cli"])
def test_entry_modules_import_without_the_workstation_stack(name: str) -> None:
    """The device install has no torch: importing the agent's entry points must not pull it in."""
    import subprocess
    import sys

    code = f"import sys, {name}; bad = [m for m in ('torch', 'edgecv.tools') if m in sys.modules]; print(bad)"
    if name.startswith("edgecv.tools"):
        code = f"import sys, {name}; print([m for m in ('torch',) if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
