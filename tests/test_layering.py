"""The package layering, read from the source (AST), including imports inside functions:

* ``mar3d/`` (the library) imports neither ``components/`` nor ``pipelines/``;
* ``components/`` (kfp steps over library commands) does not import ``pipelines/``;
* no import cycle between first-party modules, lazy (function-level) imports included:
  a cycle that only works because one side imports late is still a cycle to a reader.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mar3d", "components", "pipelines")
# package -> first-party packages it may not import
FORBIDDEN = {"mar3d": {"components", "pipelines"}, "components": {"pipelines"}, "pipelines": set()}


def first_party_modules(root: Path = REPO) -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _imported_names(module: str, path: Path) -> list[tuple[str, int]]:
    """Every module name an import statement of ``path`` may load, with its line.
    ``from a import b`` yields ``a.b`` (b may be a submodule) and resolve() falls back
    to ``a`` when it is not."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {first-party module it imports: line}."""
    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        for name, line in _imported_names(module, path):
            target = resolve(name)
            if target and target != module and not module.startswith(target + "."):
                edges.setdefault(target, line)
    return graph


def forbidden_edges(graph: dict[str, dict[str, int]], modules: dict[str, Path],
                    root: Path = REPO) -> list[str]:
    out = []
    for module, edges in graph.items():
        top = module.split(".")[0]
        for target, line in edges.items():
            if target.split(".")[0] in FORBIDDEN[top]:
                out.append(f"{modules[module].relative_to(root)}:{line} imports {target}")
    return sorted(out)


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph.get(child, {}))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


@pytest.fixture(scope="module")
def graph():
    modules = first_party_modules()
    return modules, import_graph(modules)


def test_library_imports_no_deployment_layer(graph):
    modules, edges = graph
    assert forbidden_edges(edges, modules) == []


def test_no_import_cycles(graph):
    _, edges = graph
    assert cycles(edges) == []


def test_the_checks_catch_a_forbidden_edge_and_a_cycle(tmp_path):
    """The scanner itself: a library module importing the pipeline layer lazily, and two
    modules importing each other (one of them inside a function), are both reported."""
    for package, files in {
        "mar3d": {"__init__.py": "", "a.py": "from mar3d import b\n",
                  "b.py": "def f():\n    from . import a\n    from pipelines.run import go\n"},
        "components": {"__init__.py": ""},
        "pipelines": {"__init__.py": "", "run.py": "import mar3d.a\n"},
    }.items():
        (tmp_path / package).mkdir()
        for name, text in files.items():
            (tmp_path / package / name).write_text(text)
    modules = first_party_modules(tmp_path)
    edges = import_graph(modules)
    assert edges["mar3d.b"] == {"mar3d.a": 2, "pipelines.run": 3}
    assert forbidden_edges(edges, modules, tmp_path) == ["mar3d/b.py:3 imports pipelines.run"]
    # a <-> b, and b -> pipelines.run -> a: one strongly connected component
    assert cycles(edges) == [["mar3d.a", "mar3d.b", "pipelines.run"]]

