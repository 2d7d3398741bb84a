"""The code a stage runs: the `src/*.py` files a module imports, directly or through others.

Imports are read from the source with `ast` (never executed): `import src.x`, `from src import
x, y`, `from src.x import name` and the relative forms, wherever they appear (also inside
functions, where the heavy imports live). Only modules of the `src` package count. The module's
own file is included; the package's `__init__.py` is not: it only sets logging defaults and
determines no output, so keep it that way.

dvc.yaml lists exactly these files as each stage's code deps (tests/test_dvc_deps.py checks
it) and `src.cache` hashes them into the key of a cached output. Print them with

    python -m src.codedeps extract train_head
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _imported(tree: ast.AST, package: str, package_dir: Path) -> set[str]:
    """Names of the package's modules that `tree` imports anywhere in its body."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == package and len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1:
                continue  # above the package
            parts = (node.module or "").split(".") if node.module else []
            if node.level == 0:
                if not parts or parts[0] != package:
                    continue
                parts = parts[1:]
            if parts:  # from src.x import name / from .x import name
                found.add(parts[0])
            else:  # from src import x, y / from . import x: the names that are modules
                found.update(alias.name for alias in node.names)
    return {name for name in found if (package_dir / f"{name}.py").is_file()}


def code_deps(module: str, package_dir: Path = PACKAGE_DIR) -> list[str]:
    """The sorted `src/<name>.py` paths (relative to the repository) that `module` (e.g.
    "src.extract") imports transitively, its own file included."""
    package, _, name = module.partition(".")
    if package != package_dir.name or not name or "." in name:
        raise ValueError(f"{module}: not a module of the {package_dir.name} package")
    if not (package_dir / f"{name}.py").is_file():
        raise FileNotFoundError(f"{module}: no {package_dir / name}.py")
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        path = package_dir / f"{current}.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        todo.extend(_imported(tree, package, package_dir) - seen)
    return sorted(f"{package}/{n}.py" for n in seen)


if __name__ == "__main__":
    for stage in sys.argv[1:]:
        print(f"{stage}:")
        for path in code_deps(f"src.{stage}"):
            print(f"  - {path}")
