"""The layout of `src`, read from the source with `ast` (nothing imported): no import cycles, a
layering no module imports upwards in, a served model that does not pull the data pipeline,
docstring-only package `__init__.py` files, and each literal constant defined in one place.

Imports count wherever they appear, also inside functions, as `src.outputs.codedeps` reads them.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

from src.outputs.codedeps import PACKAGE_DIR, _imported

# The layers, lowest first: a module may import modules of its own layer and of lower ones only.
# A module belongs to the layer of the longest prefix naming it.
LAYERS: list[tuple[str, ...]] = [
    ("src.errors", "src.config.paths"),  # the error types and the repository's paths
    ("src.config.schema",),  # every key, its type, default and allowed values
    ("src.outputs",),  # atomic writes, output folders and markers, hashes, progress lines, code deps
    ("src.config",),  # composing and checking the config (checks output folders' markers)
    ("src.images",),
    ("src.data",),
    ("src.models",),
    ("src.fitting",),
    ("src.evaluation",),
    ("src.tracking.store",),  # where runs and models are stored: serving loads models from it
    ("src.serving",),
    ("src.exporting",),  # the device model, its conversion and runtimes (src.predict runs them)
    ("src.tracking",),  # logging a pipeline run registers a served (pyfunc) model
    ("src.stages",),
    (
        "src.train",
        "src.params",
        "src.predict",
        "src.compare",
        "src.experiments",
        "src.offline_plots",
        "src.export",
    ),
]

# The flat layout before the role packages had 103 module-to-module import edges between 32
# modules (3.2 per module); the role packages split prepare, config, stage and evaluate into 50
# smaller modules with 171 edges (3.4 per module). A ratchet: the count may not grow, so an
# import added somewhere means one cut elsewhere (or a deliberate raise of this ceiling).
MAX_EDGES = 212  # +41: running-stage marks, URI checks, console, export stage and package, plots, mixing,
# the Optuna trial key owned by the schema, test-time augmentation views (evaluate, predict)

CONSTANT = re.compile(r"^[A-Z][A-Z0-9_]*$")


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)


def _tree(module: str) -> ast.Module:
    path = PACKAGE_DIR.parent.joinpath(*module.split(".")).with_suffix(".py")
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@cache
def graph() -> dict[str, frozenset[str]]:
    """Each module of `src` (packages' `__init__` left out) -> the `src` modules it imports."""
    modules = [_module_name(p) for p in sorted(PACKAGE_DIR.rglob("*.py")) if p.name != "__init__.py"]
    return {m: frozenset(_imported(_tree(m), m, PACKAGE_DIR) - {m}) for m in modules}


def edges() -> set[tuple[str, str]]:
    return {(a, b) for a, deps in graph().items() for b in deps}


def layer(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > best[0]
            ):
                best = (len(prefix), index)
    return None if best is None else best[1]


def cycles(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def closure(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(graph().get(current, ()))
    return seen


def imports_package(module: str, package: str) -> bool:
    """Whether `module`'s source imports the third-party `package` anywhere."""
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == package for a in node.names):
            return True
        if (
            isinstance(node, ast.ImportFrom)
            and not node.level
            and (node.module or "").split(".")[0] == package
        ):
            return True
    return False


def test_the_cycle_finder_and_the_resolver_see_what_they_must():
    assert cycles(
        {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"}), "d": frozenset()}
    ) == [["a", "b", "c"]]
    source = "def f():\n    from src.data import arrays\n    import src.images.decode\n"
    assert _imported(ast.parse(source), "src.stages.x", PACKAGE_DIR) == {
        "src.data.arrays",
        "src.images.decode",
    }
    assert _imported(ast.parse("from ..data import splits\n"), "src.stages.x", PACKAGE_DIR) == {
        "src.data.splits"
    }


def test_no_import_cycle_between_modules():
    found = cycles(graph())
    count = len(edges())
    summary = f"{count} import edges between {len(graph())} modules of src"
    assert not found, f"import cycles: {found} ({summary})"
    assert count <= MAX_EDGES, f"{summary}: at most {MAX_EDGES} allowed"


def test_every_module_has_a_layer_and_imports_no_higher_one():
    unplaced = sorted(m for m in graph() if layer(m) is None)
    assert not unplaced, f"modules in no layer of LAYERS: {unplaced}"
    upward = sorted(
        f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})" for a, b in edges() if layer(b) > layer(a)
    )
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_serving_pulls_neither_the_stages_nor_the_data_pipeline_nor_tqdm():
    serving = [m for m in graph() if m.startswith("src.serving.")]
    assert serving
    for module in serving:
        pulled = closure(module)
        banned = sorted(m for m in pulled if m.startswith(("src.stages.", "src.data.")))
        assert not banned, f"{module} imports, directly or through others: {banned}"
        with_tqdm = sorted(m for m in pulled if imports_package(m, "tqdm"))
        assert not with_tqdm, f"{module} imports tqdm through {with_tqdm}"


def _docstring(body: list[ast.stmt]) -> list[ast.stmt]:
    first = body[0] if body else None
    return [first] if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) else []


def _sets_environment_default(node: ast.stmt) -> bool:
    """`import os` or `os.environ.setdefault(...)`."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names] == ["os"]
    call = node.value if isinstance(node, ast.Expr) else None
    return isinstance(call, ast.Call) and ast.unparse(call.func) == "os.environ.setdefault"


def test_package_inits_hold_a_docstring_only():
    inits = sorted(PACKAGE_DIR.glob("*/**/__init__.py"))
    assert len(inits) >= 10
    for path in inits:
        body = ast.parse(path.read_text(encoding="utf-8")).body
        assert body == _docstring(body), f"{path.relative_to(PACKAGE_DIR.parent)} holds more than a docstring"
    # src/__init__.py runs before anything imports TensorFlow: it may set environment defaults
    # (TF_CPP_MIN_LOG_LEVEL) besides its docstring, nothing else.
    body = ast.parse((PACKAGE_DIR / "__init__.py").read_text(encoding="utf-8")).body
    rest = body[len(_docstring(body)) :]
    assert all(_sets_environment_default(node) for node in rest), (
        "src/__init__.py does more than set env defaults"
    )


def literal_constants(tree: ast.Module) -> list[str]:
    """Names of the module-level UPPER_CASE constants assigned a string or number literal."""
    names = []
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if isinstance(value, ast.UnaryOp) and isinstance(value.op, ast.USub):
            value = value.operand
        if not (isinstance(value, ast.Constant) and isinstance(value.value, (str, int, float))):
            continue
        names += [t.id for t in targets if isinstance(t, ast.Name) and CONSTANT.match(t.id)]
    return names


def test_each_literal_constant_is_defined_in_one_module():
    assert literal_constants(ast.parse('A = "x"\nB: int = -3\nc = 1\nD = (1, 2)\n')) == ["A", "B"]
    defined: dict[str, list[str]] = {}
    for module in graph():
        for name in literal_constants(_tree(module)):
            defined.setdefault(name, []).append(module)
    twice = {name: modules for name, modules in defined.items() if len(modules) > 1}
    assert not twice, f"constants defined in more than one module (define once, import it): {twice}"


def test_the_served_model_imports_without_hydra_omegaconf_or_the_data_pipeline():
    """Imported for real in a fresh interpreter that refuses those packages: what MLflow loads
    when it serves the model (`src.serving.pyfunc_model`) needs none of them, so the model's
    requirements (`MODEL_PACKAGES`) leave them out."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        top = name.split('.')[0]\n"
        "        if top in ('hydra', 'omegaconf', 'tqdm') or name.startswith(('src.data', 'src.stages')):\n"
        "            raise ImportError('refused: ' + name)\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "import src.serving.pyfunc_model\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=PACKAGE_DIR.parent
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    from src.tracking.pipeline_run import MODEL_PACKAGES

    assert not {"hydra-core", "omegaconf", "tqdm"} & set(MODEL_PACKAGES)
