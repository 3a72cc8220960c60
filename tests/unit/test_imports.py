"""No import cycle among policyd's modules (issue #14): every import of
every module, at module level and inside functions, as a graph over the
modules of the package; a cycle fails with its path.  Front-ends sit over
runtime and core; runtime and core never import a front-end."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "policyd"
FRONT_ENDS = ("policyd.policy", "policyd.milter")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(name: str, path: Path, modules: set[str]) -> set[str]:
    """The policyd modules `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from . import x` imports the module x when there is one.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` runs a, a.b and a.b.c: the longest one that is ours.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    paths = {module_name(path, root): path for path in root.rglob("*.py")}
    modules = set(paths)
    return {name: imported(name, path, modules) for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path that starts and ends at the same module, or None."""
    state: dict[str, int] = {}    # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle_in_policyd():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_runtime_and_core_never_import_a_front_end():
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith(FRONT_ENDS) or name in ("policyd.cli", "policyd.__main__"):
            continue
        bad = sorted(t for t in targets if t.startswith(FRONT_ENDS))
        assert not bad, f"{name} imports the front-end {bad}"


def test_the_front_ends_never_import_each_other():
    graph = import_graph()
    for name, targets in graph.items():
        for mine, other in (FRONT_ENDS, FRONT_ENDS[::-1]):
            if name.startswith(mine):
                assert not [t for t in targets if t.startswith(other)], name


@pytest.mark.parametrize("source, cyclic", [
    ({"a.py": "from . import b\n", "b.py": "def f():\n    from .a import x\n"}, True),
    ({"a.py": "import pkg.b\n", "b.py": "import os\n"}, False),
    ({"a.py": "from .sub import c\n", "sub/__init__.py": "", "sub/c.py": "from ..a import x\n"},
     True),
])
def test_the_walk_sees_imports_inside_functions_and_relative_ones(tmp_path, source, cyclic):
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **source}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    assert (find_cycle(import_graph(root)) is not None) == cyclic


def test_the_readme_layout_names_every_module():
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    listed = {line.split()[0] for line in section.split("```")[1].splitlines()[2:] if line}
    actual = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
              if path.name != "__init__.py" or path.parent == PACKAGE}
    assert listed == actual
