"""The code a stage runs: the `src/**.py` files a module imports, directly or through others.

Imports are read from the source with `ast` (never executed): `import src.a.b`, `from src.a
import b, c`, `from src.a.b import name` and the relative forms, wherever they appear (also
inside functions, where the heavy imports live). Only modules of the `src` package count. The
module's own file is included; the packages' `__init__.py` files are not: they hold docstrings
only and determine no output, so keep it that way (tests/test_layout.py checks it).

dvc.yaml lists exactly these files as each stage's code deps (tests/test_dvc_deps.py checks
it) and `src.stages.reuse` hashes them into the key of a cached output. Print them with

    python -m src.outputs.codedeps extract train_head
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def module_file(module: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The file of a dotted module of the package (`src.data.splits` -> src/data/splits.py);
    None when it is a package or no such module exists."""
    parts = module.split(".")
    if parts[0] != package_dir.name or len(parts) < 2:
        return None
    path = package_dir.joinpath(*parts[1:]).with_suffix(".py")
    return path if path.is_file() else None


def _imported(tree: ast.AST, module: str, package_dir: Path) -> set[str]:
    """Dotted names of the package's modules that `tree` (the source of `module`) imports."""
    package = package_dir.name
    here = module.split(".")[:-1]  # the package `module` lies in, for relative imports
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == package)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level > len(here):
                    continue  # above the package
                base = here[: len(here) - node.level + 1]
                origin = ".".join([*base, *(node.module.split(".") if node.module else [])])
            else:
                origin = node.module or ""
            if origin.split(".")[0] != package:
                continue
            found.add(origin)  # from src.a.b import name: src.a.b
            found.update(f"{origin}.{alias.name}" for alias in node.names)  # from src.a import b
    return {name for name in found if module_file(name, package_dir) is not None}


def code_deps(module: str, package_dir: Path = PACKAGE_DIR) -> list[str]:
    """The sorted paths (relative to the repository, e.g. `src/data/splits.py`) of the package's
    modules that `module` (e.g. "src.stages.extract") imports transitively, its own included."""
    if module.split(".")[0] != package_dir.name or "." not in module:
        raise ValueError(f"{module}: not a module of the {package_dir.name} package")
    if module_file(module, package_dir) is None:
        raise FileNotFoundError(f"{module}: no such module under {package_dir}")
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        path = module_file(current, package_dir)
        assert path is not None
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        todo.extend(_imported(tree, current, package_dir) - seen)
    root = package_dir.parent
    return sorted(str(module_file(m, package_dir).relative_to(root)) for m in seen)  # type: ignore[union-attr]


if __name__ == "__main__":
    if not sys.argv[1:] or any(a in ("-h", "--help") for a in sys.argv[1:]):
        print("usage: python -m src.outputs.codedeps STAGE [STAGE ...]\n\n" + (__doc__ or "").strip())
        sys.exit(0 if sys.argv[1:] else 2)
    for stage in sys.argv[1:]:
        print(f"{stage}:")
        for path in code_deps(f"src.stages.{stage}"):
            print(f"  - {path}")
