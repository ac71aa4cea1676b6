"""The import graph in figures: `python -m devtools.imports [FOLDER]`.

Counts the modules of berth, tasks, guest and workflows, the imports between them (those inside
functions too), the imports made inside functions, and every import cycle (a strongly connected
group of modules). FOLDER is a checkout to measure (default: this one), so that two versions can
be compared side by side. `make lint` enforces the layers themselves (lint-imports).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

import grimp

PACKAGES = ("berth", "tasks", "guest", "workflows")


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or not."""
    seen: set[str] = set()
    todo = list(graph.get(start, ()))
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph.get(module, ()))
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of more than one module that all import each other, directly or not."""
    reach = {module: reachable(graph, module) for module in graph}
    groups = {frozenset({m, *(o for o in reach[m] if m in reach[o])}) for m in graph if m in reach[m]}
    return sorted(sorted(g) for g in groups if len(g) > 1)


def function_level_imports(files: Iterable[Path]) -> int:
    """Import statements inside a function or method body."""
    count = 0
    for path in files:
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                count += sum(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(func))
    return count


def main(folder: Path) -> None:
    sys.path.insert(0, str(folder))
    built = grimp.build_graph(*PACKAGES, include_external_packages=False)
    graph = {m: set(built.find_modules_directly_imported_by(m)) for m in built.modules}
    files = [p for package in PACKAGES for p in (folder / package).rglob("*.py")]
    groups = cycles(graph)
    print(f"modules: {len(graph)}")
    print(f"imports between them: {sum(len(targets) for targets in graph.values())}")
    print(f"imports inside functions: {function_level_imports(files)}")
    print(f"import cycles: {len(groups)}" + "".join(f"\n  {len(g)} modules: {', '.join(g)}" for g in groups))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve())
