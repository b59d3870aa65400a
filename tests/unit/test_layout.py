"""The import graph keeps every concern on its floor.

`mesh/` is the shared floor both proxies stand on; the proxies are siblings that must not lean on
each other; tools (meshctl, cni, controller, benchmarks) sit on top and nothing in the product may
reach up to them. An arrow in the wrong direction is how a tool's dependency (or a sibling's)
ends up inside the node proxy, so the graph is checked from source with `ast`, including imports
placed inside functions, which is where cycles like to hide.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (
    "mesh",
    "certs",
    "bpf",
    "ztunnel",
    "waypoint",
    "cni",
    "controller",
    "meshctl",
    "benchmarks",
)
TOOLS = {"meshctl", "benchmarks"}


def _imported_modules(tree: ast.AST) -> set[str]:
    """Every absolute module name `tree` imports, wherever the import statement sits."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def package_graph() -> dict[str, set[str]]:
    """Top-level package -> the other top-level packages of ours it imports."""
    graph: dict[str, set[str]] = {pkg: set() for pkg in PACKAGES if (ROOT / pkg).is_dir()}
    for pkg in graph:
        for path in (ROOT / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text(), filename=str(path))
            for module in _imported_modules(tree):
                top = module.split(".")[0]
                if top in graph and top != pkg:
                    graph[pkg].add(top)
    return graph


def module_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (`from a import b` counts `a.b` when that is a
    module). An import of one's own enclosing package (its `__init__` re-exports) is left out:
    that is how a package exposes its parts, not a dependency between two concerns."""
    files: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py") if (ROOT / pkg).is_dir() else ():
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            files[name] = path
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for target in targets:
                if target in files and target != name and not name.startswith(f"{target}."):
                    graph[name].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle in `graph` as a path, or None; depth-first search with a colour per node."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_imports_inside_functions() -> None:
    tree = ast.parse("def f():\n    from meshctl.lab import waypoints\n    import ztunnel.main\n")
    assert _imported_modules(tree) == {"meshctl.lab", "ztunnel.main"}


def test_mesh_is_the_floor_and_imports_nothing_of_ours_above_it() -> None:
    assert package_graph()["mesh"] == set()


def test_certs_and_bpf_stand_only_on_mesh() -> None:
    graph = package_graph()
    assert graph["certs"] <= {"mesh"}
    assert graph["bpf"] <= {"mesh"}


def test_the_proxies_never_import_each_other() -> None:
    graph = package_graph()
    assert "waypoint" not in graph["ztunnel"]
    assert "ztunnel" not in graph["waypoint"]


def test_the_proxies_stand_only_on_the_floors_below() -> None:
    graph = package_graph()
    assert graph["ztunnel"] <= {"mesh", "certs", "bpf"}
    assert graph["waypoint"] <= {"mesh", "certs"}


def test_nothing_but_the_tools_imports_meshctl() -> None:
    importers = {pkg for pkg, deps in package_graph().items() if "meshctl" in deps}
    assert importers <= TOOLS


def test_no_cycle_between_top_level_packages() -> None:
    assert _cycle(package_graph()) is None


def test_no_cycle_between_modules() -> None:
    """Catches what the package graph cannot: two modules of one package that import each
    other (as `waypoint.cli` and `meshctl.lab.waypoints` did, through an import in a function)."""
    assert _cycle(module_graph()) is None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
