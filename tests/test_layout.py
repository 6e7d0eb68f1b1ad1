"""The package layout's rules, read from the source with `ast` (nothing is imported).

- No import cycles among the modules of harness/, methods/ and tasks/, counting imports
  inside functions too (a deferred import hides a cycle from Python, not from a reader).
- methods/ imports nothing from harness/, tasks/ or ray: a method sees a model and batches.
- tasks/ imports nothing from methods/ or harness/: a task knows nothing of methods.
- No private name (`_x`) is imported or used across modules: `from m import _x`, or
  `m._x` on an imported module `m`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "methods", "tasks")


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclass
class ModuleImports:
    name: str
    is_package: bool
    imported: set[str] = field(default_factory=set)  # every module named by an import
    private_uses: list[str] = field(default_factory=list)  # "line: target._name"


def resolve(current: ModuleImports, module: str | None, level: int) -> str:
    """The absolute module of `from <level dots><module> import ...`."""
    if not level:
        return module or ""
    base = current.name.split(".")
    base = base if current.is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def scan(path: Path, known: set[str], root: Path = REPO) -> ModuleImports:
    info = ModuleImports(module_name(path, root), path.name == "__init__.py")
    aliases: dict[str, str] = {}  # local name -> our module it is bound to
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):  # module level and inside functions alike
        if isinstance(node, ast.Import):
            for alias in node.names:
                info.imported.add(alias.name)
                if alias.name in known:
                    aliases[alias.asname or alias.name.split(".")[0]] = (
                        alias.name if alias.asname else alias.name.split(".")[0]
                    )
        elif isinstance(node, ast.ImportFrom):
            source = resolve(info, node.module, node.level)
            info.imported.add(source)
            for alias in node.names:
                child = f"{source}.{alias.name}"
                if child in known:  # `from harness import trial`: a module, not a name
                    info.imported.add(child)
                    aliases[alias.asname or alias.name] = child
                elif is_private(alias.name) and source in known and source != info.name:
                    info.private_uses.append(f"{node.lineno}: from {source} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            owner = dotted_module(node.value, aliases, known)
            if owner is not None and owner != info.name:
                info.private_uses.append(f"{node.lineno}: {owner}.{node.attr}")
    return info


def dotted_module(node: ast.expr, aliases: dict[str, str], known: set[str]) -> str | None:
    """The module of ours an expression names (`alias`, `pkg.mod` after `import pkg.mod`)."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        parent = dotted_module(node.value, aliases, known)
        if parent is not None and f"{parent}.{node.attr}" in known:
            return f"{parent}.{node.attr}"
    return None


def import_graph() -> dict[str, ModuleImports]:
    paths = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    known = {module_name(p) for p in paths}
    return {info.name: info for info in (scan(p, known) for p in paths)}


def internal_edges(graph: dict[str, ModuleImports]) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports. Importing `a.b` runs `a/__init__` too, but
    a package's __init__ importing its own children (re-exports, registration) is layout,
    not a cycle with them: an edge goes to the named module only, and none from a package
    to its children."""
    return {
        name: {
            m for m in info.imported if m in graph and m != name and not m.startswith(name + ".")
        }
        for name, info in graph.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    assert cycles(internal_edges(import_graph())) == []


def test_methods_and_tasks_stay_below_the_harness():
    forbidden = {"methods": ("harness", "tasks", "ray"), "tasks": ("methods", "harness")}
    wrong = [
        f"{name} imports {imported}"
        for name, info in import_graph().items()
        for imported in sorted(info.imported)
        if (banned := forbidden.get(name.split(".")[0])) and imported.split(".")[0] in banned
    ]
    assert wrong == []


def test_no_private_name_crosses_a_module():
    uses = [f"{name}:{use}" for name, info in import_graph().items() for use in info.private_uses]
    assert uses == []


def test_the_scanner_sees_function_level_imports_and_private_uses(tmp_path):
    # The rules above pass only if the scanner can see what they forbid: a cycle closed by a
    # function-level import, and a private name reached through a module alias.
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import thing\n\n\ndef _helper():\n    pass\n")
    (package / "b.py").write_text(
        "import pkg.a\n\n\n"
        "def thing():\n"
        "    from pkg import a\n\n"
        "    return a._helper(), pkg.a._helper\n"
    )
    paths = sorted(package.rglob("*.py"))
    known = {module_name(p, tmp_path) for p in paths}
    graph = {info.name: info for info in (scan(p, known, tmp_path) for p in paths)}
    assert cycles(internal_edges(graph)) == [["pkg.a", "pkg.b"]]
    assert sorted(graph["pkg.b"].private_uses) == ["7: pkg.a._helper", "7: pkg.a._helper"]


def test_no_test_module_imports_from_another_test_module():
    # What two test modules share lives in tests/builders.py or tests/conftest.py: importing
    # a test module runs (and couples to) all of its module-level setup.
    def is_test_module(name: str) -> bool:
        parts = name.split(".")
        return len(parts) > 1 and parts[0] == "tests" and parts[1].startswith("test_")

    def test_module_imports(source: str, filename: str) -> list[str]:
        found = set()
        for node in ast.walk(ast.parse(source, filename=filename)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                # Relative imports start from the tests package, where every file here lives.
                base = ".".join(filter(None, ["tests" if node.level else "", node.module]))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            found |= {f"{filename}:{node.lineno}: {n}" for n in names if is_test_module(n)}
        return sorted(found)

    # The check sees every spelling of such an import, at module level and inside functions.
    for caught in (
        "from tests.test_x import a",
        "import tests.test_x",
        "import tests.test_x as y",
        "from tests import test_x",
        "from .test_x import a",
        "from . import test_x",
        "def f():\n    from tests.test_x import a",
    ):
        assert test_module_imports(caught, "probe.py"), caught
    for allowed in (
        "from tests.builders import test_x",
        "from tests import conftest",
        "import tests",
    ):
        assert test_module_imports(allowed, "probe.py") == [], allowed

    wrong = [
        use
        for path in sorted((REPO / "tests").glob("*.py"))
        for use in test_module_imports(path.read_text(), f"tests/{path.name}")
    ]
    assert wrong == []
