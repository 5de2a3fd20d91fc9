"""List the import circles of a package: modules that import each other, directly or not.

Reads the source (no import is run). An import counts wherever it is written, inside a function
too; one under `if TYPE_CHECKING:` counts only in the second list. A package's imports of its own
submodules, and a submodule's imports of its parent package, are left out (they are how a
package re-exports, not a dependency between concerns).

    python scripts/import_cycles.py [halrp_adapt] [--edges]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_files(root: Path) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(run-time imports, type-only imports) of one module, as module names of the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    runtime: set[str] = set()
    typed: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found = [target] if target in modules else []
            found += [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
        elif isinstance(node, ast.Import):
            found = [a.name for a in node.names if a.name in modules]
        else:
            continue
        for target in found:
            if target != name and not target.startswith(name + ".") and not name.startswith(
                target + "."
            ):
                (typed if id(node) in type_only else runtime).add(target)
    return runtime, typed


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main(argv: list[str]) -> int:
    root = Path(next((a for a in argv if not a.startswith("--")), "halrp_adapt"))
    modules = module_files(root)
    runtime, typed = {}, {}
    for name, path in modules.items():
        runtime[name], typed[name] = imports_of(name, path, modules)
    both = {m: runtime[m] | typed[m] for m in modules}
    print("run-time import circles:", circles(runtime) or "none")
    print("circles counting type-only imports:", circles(both) or "none")
    if "--edges" in argv:
        for m in sorted(modules):
            extra = f"   (type only: {', '.join(sorted(typed[m]))})" if typed[m] else ""
            print(f"{m}: {', '.join(sorted(runtime[m]))}{extra}")
    return 1 if circles(runtime) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
