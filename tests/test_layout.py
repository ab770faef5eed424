"""The layout stays readable: no import cycle between the project's modules, no oversized source file,
and ``launcher/`` holds only what starts processes.

The import graph is read from the source (``ast``), not by importing: every ``import`` and
``from ... import`` anywhere in a module (inside functions too), absolute or relative, that names a
module of the project. Run as a script it prints the cycles and the largest files.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as (setup.py package_dir)
PACKAGES = {
    "compact_hooks": "compact_hooks",
    "integrations": "compact_hooks.integrations",
    "launcher": "compact_hooks.launcher",
}
MAX_LINES = 500
# what launcher/ must not hold: benchmarks, reports, the job runner, the CLI
NOT_IN_LAUNCHER = ("bench", "report", "run_job", "cli")


def project_modules() -> dict[str, Path]:
    """``{module name: file}`` for every .py file of the project's packages."""
    modules: dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve_relative(module: str, path: Path, level: int, name: Optional[str]) -> str:
    """The absolute name of ``from <level dots><name> import ...`` written in ``module``."""
    base = module.split(".")
    if not _is_package(path):
        base = base[:-1]  # a module's relative imports start from its package
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _project_target(name: str, modules: dict[str, Path]) -> Optional[str]:
    """The project module that importing ``name`` runs last: ``name`` itself or its nearest parent."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``module`` imports (at any depth of its code)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()

    def add(name: str) -> None:
        target = _project_target(name, modules)
        if target is not None and target != module:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(module, path, node.level, node.module) if node.level else (node.module or "")
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                # `from pkg import sub` imports the submodule; `from pkg import name` the package
                add(submodule if submodule in modules else base)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterable[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def _describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return "; ".join(edges)


def test_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    # relative (`from .attention import ...`) and `from . import processors as P`
    assert "compact_hooks.integrations.diffusers.attention" in graph["compact_hooks.integrations.diffusers.sharding"]
    assert "compact_hooks.integrations.diffusers.processors" in graph["compact_hooks.integrations.diffusers.families"]
    # inside a function
    assert "compact_hooks.integrations.diffusers" in graph["compact_hooks.bench.scaling"]


def test_cycles_finds_each_component_once():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set(), "g": {"g"}}
    assert cycles(graph) == [["a", "b", "c"], ["d", "e"]]


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles (a module imports one that imports it back):\n" + "\n".join(
        _describe(c, graph) for c in found)


def test_no_source_file_over_500_lines():
    long = {m: n for m, p in project_modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"


def test_launcher_only_starts_processes():
    launcher = [m for m in project_modules() if m.startswith("compact_hooks.launcher.")]
    wrong = [m for m in launcher if any(word in m.rpartition(".")[2] for word in NOT_IN_LAUNCHER)]
    assert not wrong, f"benchmark, report, job or CLI code in launcher/: {wrong}"
    assert {"compact_hooks.launcher.mpi", "compact_hooks.launcher.launch"} <= set(launcher)


def test_every_source_folder_is_a_package():
    """setup.py ships the folders find_packages sees: each needs an __init__.py."""
    bare = sorted(str(d.relative_to(ROOT)) for folder in PACKAGES for d in (ROOT / folder).rglob("*")
                  if d.is_dir() and any(d.glob("*.py")) and not (d / "__init__.py").exists())
    assert not bare, f"folders with .py files but no __init__.py (setup.py would not ship them): {bare}"


def test_architecture_file_map_lists_every_source_file():
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("## File map", 1)[1].split("```")[1]
    listed = {line.split()[0] for line in block.splitlines() if line.strip()}
    missing = sorted(str(p.relative_to(ROOT)) for p in project_modules().values()
                     if str(p.relative_to(ROOT)) not in listed)
    assert not missing, f"add these files to the file map of docs/architecture.md: {missing}"


def test_integrations_are_packages():
    modules = project_modules()
    for name in ("compact_hooks.integrations.diffusers", "compact_hooks.integrations.deepspeed"):
        assert _is_package(modules[name]), f"{name} should be a package"


if __name__ == "__main__":
    graph = import_graph()
    for component in cycles(graph):
        print("cycle:", _describe(component, graph))
    sizes = sorted(((len(p.read_text().splitlines()), m) for m, p in project_modules().items()), reverse=True)
    for n, m in sizes[:10]:
        print(f"{n:5d} {m}")
    sys.exit(1 if cycles(graph) else 0)
