"""The package's imports run one way: no cycle among mcllava modules, the core never reaches the proving ground,
the tiny test models, the CLI, the server or the demo, and no import hides inside a function except that of an
optional dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import mcllava

SRC = Path(mcllava.__file__).parent
# imported inside functions on purpose: optional extras (`serve`, `bench`, `test`), so that the rest works without them
OPTIONAL = {"fastapi", "uvicorn", "matplotlib", "playwright", "mcllava.server"}
CORE = (
    "assistant",
    "backbone",
    "bank",
    "bases",
    "captions",
    "checkpoint",
    "concepts",
    "datasets",
    "errors",
    "evaluate",
    "export",
    "generation",
    "kmeans_init",
    "layout",
    "locate",
    "presets",
    "question_forms",
    "report",
    "retrieval",
    "tokens",
    "train",
    "training_data",
    "version",
)
UPPER = (
    "mcllava.proving_base",
    "mcllava.world",
    "mcllava.tiny",
    "mcllava.smollm2",
    "mcllava.cli",
    "mcllava.server",
    "mcllava.demo",
)


def module_name(path: Path) -> str:
    parts = ("mcllava", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def imported(name: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement of module `name` loads (mcllava ones resolved, others by their full name)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level == 0:
        base = node.module or ""
    else:
        package = name if MODULES[name].name == "__init__.py" else name.rsplit(".", 1)[0]
        package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        base = f"{package}.{node.module}" if node.module else package
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def imports(name: str) -> tuple[set[str], list[tuple[int, str]]]:
    """(mcllava modules imported at module level, (line, module) of every import inside a function)."""
    tree = ast.parse(MODULES[name].read_text())
    inner = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
        if isinstance(n, (ast.Import, ast.ImportFrom))
    }
    top, deferred = set(), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for mod in imported(name, node):
                if id(node) in inner:
                    deferred.append((node.lineno, mod))
                elif mod in MODULES:
                    top.add(mod)
    return top, deferred


GRAPH = {name: imports(name)[0] for name in MODULES}


def reach(start: str) -> set[str]:
    """Every module that importing `start` loads through module-level imports (the package root aside)."""
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()] - {"mcllava"}:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_graph_is_read():
    """The parser sees the imports it must (a guard against a test that passes by reading nothing)."""
    assert "mcllava.backbone" in GRAPH["mcllava.train"]
    assert "mcllava.proving_base.loader" in GRAPH["mcllava.proving_base"]
    assert "mcllava.errors" in reach("mcllava.cli") and "mcllava.proving_base.build.lm" in reach("mcllava.cli")


def test_no_import_cycle():
    cycles = sorted(name for name in MODULES if name in reach(name))
    assert not cycles, f"modules that import themselves through others: {cycles}"


def test_core_never_imports_the_layers_above():
    for short in CORE:
        for name in [m for m in MODULES if m == f"mcllava.{short}" or m.startswith(f"mcllava.{short}.")]:
            upper = sorted(m for m in reach(name) if m.startswith(UPPER))
            assert not upper, f"{name} (core) imports {upper}"


def test_no_import_inside_a_function_but_optional_dependencies():
    found = [
        f"{MODULES[name].relative_to(SRC)}:{line} imports {mod}"
        for name in sorted(MODULES)
        for line, mod in imports(name)[1]
        if not mod.startswith(tuple(OPTIONAL))
    ]
    assert not found, "imports inside functions (move them to the top of the module):\n" + "\n".join(found)


def test_no_source_file_over_500_lines():
    # the server module is split into a package separately
    long = {
        str(p.relative_to(SRC)): n
        for p in SRC.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 500 and p.name != "server.py"
    }
    assert not long, long
