"""The layout's rules, checked on the source: the shared package imports no role package, no
module imports itself through others (every import counted, the ones inside functions too), and
no module of the packages grows past 500 lines."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vlrm", "actors", "learner", "rewards", "shapes_world")
ROLES = ("actors", "learner", "rewards", "shapes_world")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            parts = p.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    out["launch"] = ROOT / "launch.py"
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n:
                found.add(n)
    return found


def test_the_shared_package_imports_no_role_package():
    modules = _modules()
    bad = {m: sorted(i for i in _imports(p, modules) if i.split(".")[0] in ROLES)
           for m, p in modules.items() if m.split(".")[0] == "vlrm"}
    assert not {m: v for m, v in bad.items() if v}


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    graph = {m: {i for i in deps if not (i.startswith(m + ".") and modules[m].name == "__init__.py")}
             for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_of_the_packages_is_over_500_lines():
    long = {m: n for m, p in _modules().items() if m.split(".")[0] in ("vlrm", "actors", "learner", "rewards")
            and (n := len(p.read_text().splitlines())) > 500}
    assert not long
