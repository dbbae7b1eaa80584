"""No import circle among our modules (flows, tasks, blocks): a lower layer never imports an
upper one, not even inside a function (an import put there to dodge a circle still ties the
layers). Only imports under `if TYPE_CHECKING:` are left out, which never run, and those under
`if __name__ == "__main__":`, which run only in the program `python -m flows.ray_cluster`: a
module named __main__, not the module others import (flows.ray_cluster hands its command line
to flows.cli, which imports flows.ray_cluster, once, by its name)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGES = ("flows", "tasks", "blocks")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules() -> dict[str, Path]:
    # rglob does not follow links: tasks/scripts and tasks/examples (shipped files, not our
    # modules) are links to the top-level dirs
    return {module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_main_program(test: ast.expr) -> bool:
    """`__name__ == "__main__"`, either way round."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, *test.comparators]
    return (any(isinstance(side, ast.Name) and side.id == "__name__" for side in sides)
            and any(isinstance(side, ast.Constant) and side.value == "__main__" for side in sides))


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module name an import of this tree names (absolute; `from a import b` names a.b
    too, which is kept only when it is a module), anywhere but under `if TYPE_CHECKING:` and
    `if __name__ == "__main__":`."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and (_is_type_checking(node.test) or _is_main_program(node.test)):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours its import runs. Importing a.b.c runs a.b's __init__ as
    well, except from inside a.b (which is then already being imported)."""
    modules = our_modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for name in imported_names(ast.parse(path.read_text(), str(path)), module, is_package):
            if name not in modules:
                continue
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):
                ancestor = ".".join(parts[:depth])
                inside = module == ancestor or module.startswith(ancestor + ".")
                if ancestor in modules and not inside:
                    edges.add(ancestor)
        edges.discard(module)
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per circle (Tarjan's strongly connected components, each shown as a loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for after in sorted(graph.get(node, ())):
            if after not in index:
                connect(after)
                low[node] = min(low[node], low[after])
            elif after in on_stack:
                low[node] = min(low[node], index[after])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_loop(graph, component) for component in components]


def _loop(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest way around the circle from its first module, for the message."""
    members, start = set(component), component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for after in sorted(graph[node] & members):
                if after == start:
                    return paths[node] + [start]
                if after not in paths:
                    paths[after] = paths[node] + [after]
                    following.append(after)
        frontier = following
    return component


def test_our_modules_import_no_circle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles (a lower layer imports an upper one):\n" + "\n".join(
        "  " + " -> ".join(loop) for loop in cycles)


def test_the_walk_sees_what_runs():
    """Imports inside functions count, TYPE_CHECKING and __main__ ones do not, and a.b.c runs a.b."""
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "from tasks.schedulers.pbs import PbsOptions\n"
        "if TYPE_CHECKING:\n    from tasks.cluster import ClusterPlan\n"
        "def f():\n    from tasks.readiness import alive_nodes\n"
        "from . import logs\n"
        "if __name__ == '__main__':\n    from flows.cli import main\nelse:\n    from tasks import events\n")
    names = imported_names(tree, "tasks.scaling", is_package=False)
    assert {"tasks.schedulers.pbs", "tasks.readiness", "tasks.logs", "tasks.events"} <= names
    assert "tasks.cluster" not in names and "flows.cli" not in names
    graph = import_graph()
    assert "tasks.schedulers" in graph["tasks.settings"]  # settings imports tasks.schedulers.pbs
    assert "tasks.schedulers" not in graph["tasks.schedulers.pbs"]  # a sibling's import: the package is loading
    # the command line is above the flows; the flows' module hands it the program only
    assert "flows.ray_cluster" in graph["flows.cli"] and "flows.cli" not in graph["flows.ray_cluster"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
