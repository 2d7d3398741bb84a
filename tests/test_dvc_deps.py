"""dvc.yaml's code deps cannot drift: each stage lists exactly the `src/*.py` files its module
imports, directly or not (`src.outputs.codedeps`), so editing any code a stage runs reruns it."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
import yaml

from src.config.paths import REPO_ROOT
from src.outputs.codedeps import code_deps
from src.stages import reuse

STAGES: dict[str, dict] = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def stage_module(stage: dict) -> str:
    match = re.fullmatch(r"python -m (src\.[\w.]+)", stage["cmd"].strip())
    assert match, f"not `python -m src.stages.<stage>`: {stage['cmd']!r}"
    return match.group(1)


def drift(name: str, stage: dict) -> str | None:
    """What is wrong with the `src/` deps of stage `name`, or None when they are exact."""
    listed = {d for d in stage.get("deps", []) if isinstance(d, str) and d.startswith("src/")}
    wanted = set(code_deps(stage_module(stage)))
    return difference(f"dvc.yaml stage {name!r}:", listed, wanted, f"`python -m src.outputs.codedeps {name}`")


def difference(what: str, listed: set[str], wanted: set[str], source: str) -> str | None:
    """None when `listed` is `wanted`, else what is missing and extra, and where to look."""
    if listed == wanted:
        return None
    return (
        f"{what} missing {sorted(wanted - listed) or 'nothing'}, "
        f"extra {sorted(listed - wanted) or 'nothing'} ({source} lists what is wanted)"
    )


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_code_deps_are_exactly_what_its_module_imports(name):
    problem = drift(name, STAGES[name])
    assert problem is None, problem


def test_a_missing_or_extra_code_dep_is_reported_by_stage_and_file():
    stage = STAGES["extract"]
    assert "src/fitting/precision.py" in stage["deps"]
    missing = {**stage, "deps": [d for d in stage["deps"] if d != "src/fitting/precision.py"]}
    problem = drift("extract", missing)
    assert (
        problem is not None and "'extract'" in problem and "missing ['src/fitting/precision.py']" in problem
    )
    extra = {**stage, "deps": [*stage["deps"], "src/tracking/sweep.py"]}
    problem = drift("extract", extra)
    assert problem is not None and "extra ['src/tracking/sweep.py']" in problem


def test_cached_stages_hash_the_same_code_that_dvc_tracks():
    for name in reuse.CACHED_STAGES:
        assert sorted(reuse._code(name)) == code_deps(f"src.stages.{name}")


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_code_deps_follows_every_import_form_of_the_package_only(tmp_path):
    pkg = tmp_path / "src"
    write(pkg / "__init__.py", "from src import unused\n")
    write(pkg / "stages" / "__init__.py", "")
    write(pkg / "stages" / "stage.py", "import os\nimport src.plain\nfrom src.sub import listed, NAME\n")
    write(pkg / "plain.py", "from src.named import thing\n")
    write(pkg / "sub" / "listed.py", "def later():\n    from . import relative\n")
    write(pkg / "named.py", "thing = 1\nimport src.stages.stage  # a cycle\n")
    write(pkg / "sub" / "relative.py", "from .deep import x\nfrom ..other import y\nimport srcx.z\n")
    write(pkg / "sub" / "deep.py", "x = 1\n")
    write(pkg / "unused.py", "")
    write(pkg / "other.py", "")
    assert code_deps("src.stages.stage", pkg) == [
        "src/named.py",
        "src/other.py",
        "src/plain.py",
        "src/stages/stage.py",
        "src/sub/deep.py",
        "src/sub/listed.py",
        "src/sub/relative.py",
    ]
    with pytest.raises(FileNotFoundError):
        code_deps("src.nowhere", pkg)


def _names(entries: list) -> set[str]:
    """The file names of a dvc.yaml list of outs/plots/metrics (plain or with options)."""
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries}


def test_each_plot_file_is_declared_once_and_timings_are_no_metric():
    """A file declared both as a stage's plot and in the top-level `plots` renders twice (once
    with every column, `seconds` included); wall times belong in their own out."""
    document = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    stage_plots = set().union(*(_names(s.get("plots", [])) for s in STAGES.values()))
    top_level = {f for plot in document.get("plots", []) for spec in plot.values() for f in spec["y"]}
    assert top_level and not (stage_plots & top_level), f"declared twice: {sorted(stage_plots & top_level)}"
    metrics = set().union(*(_names(s.get("metrics", [])) for s in STAGES.values()))
    assert metrics == {"${paths.reports}/metrics.json", "${paths.reports}/export.json"}
    assert "${paths.reports}/timings.json" in _names(STAGES["evaluate"]["outs"])


# --- params: what each stage reads is in its `params:` list --------------------------------

# `paths.*` keys name the deps and outs themselves (a changed path changes the stage), so a
# stage's params list may leave them out; every other key a stage reads must be listed.


def declared(name: str) -> tuple[set[str], set[str]]:
    """(keys the stage's `run` reads, keys it reads only to log) from its `@stage.reads`."""
    module = importlib.import_module(stage_module(STAGES[name]))
    return set(module.run.reads), set(module.run.logged)


def params_drift(name: str, stage: dict) -> str | None:
    listed = {p for p in stage.get("params", []) if isinstance(p, str) and not p.startswith("paths")}
    reads, logged = declared(name)
    wanted = {k for k in reads - logged if k != "paths" and not k.startswith("paths.")}
    return difference(f"dvc.yaml stage {name!r} params:", listed, wanted, "its @stage.reads")


@pytest.mark.parametrize("name", sorted(STAGES))
def test_params_lists_are_exactly_what_each_stage_reads(name):
    problem = params_drift(name, STAGES[name])
    assert problem is None, problem


def test_a_key_read_but_not_listed_is_reported():
    stage = {
        **STAGES["train_head"],
        "params": [p for p in STAGES["train_head"]["params"] if p != "train.strategy"],
    }
    problem = params_drift("train_head", stage)
    assert problem is not None and "missing ['train.strategy']" in problem


def config_reads(source: str) -> set[str]:
    """The dotted config keys a module reads from a variable named `cfg`: `cfg.a.b` chains, and
    chains through local names bound to a part of it (`ds = cfg.dataset; ds.path`)."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            chain = _chain(node.value)
            if chain and chain[0] == "cfg" and len(chain) > 1:
                aliases[node.targets[0].id] = ".".join(chain[1:])
    reads: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain = _chain(node)
        if not chain or chain[-1] in ("get", "items", "keys", "values"):
            continue
        if chain[0] == "cfg" and len(chain) > 1:
            reads.add(".".join(chain[1:]))
        elif chain[0] in aliases and len(chain) > 1:
            reads.add(".".join([aliases[chain[0]], *chain[1:]]))
    return {r for r in reads if not any(o != r and o.startswith(f"{r}.") for o in reads)}


def _chain(node: ast.AST) -> list[str] | None:
    """`a.b.c` as ["a", "b", "c"], or None for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_each_stage_module_reads_only_what_it_declares(name):
    """Static cross-check of the declaration (the view enforces it when the stage runs)."""
    reads, _ = declared(name)
    module = REPO_ROOT / (stage_module(STAGES[name]).replace(".", "/") + ".py")
    undeclared = sorted(
        key
        for key in config_reads(module.read_text())
        if not any(key == r or key.startswith(f"{r}.") for r in reads)
    )
    assert not undeclared, f"{name} reads {undeclared} without declaring them in @stage.reads"


def test_config_reads_follow_aliases_and_whole_sections():
    source = "def run(cfg):\n    ds = cfg.dataset\n    x = ds.split.seed + cfg.train.batch_size\n"
    source += "    f(cfg.model)\n"
    assert config_reads(source) == {"dataset.split.seed", "train.batch_size", "model"}


def test_a_stage_view_refuses_keys_it_did_not_declare():
    from omegaconf.errors import ConfigAttributeError

    from src.config.compose import compose
    from src.stages.stage import view

    sliced = view(compose(["experiment=ci"]), ("head", "train.strategy"))
    assert sliced.head.dropout == 0.5 and sliced.train.strategy == "auto"
    with pytest.raises(ConfigAttributeError):
        sliced.train.logical_cpus  # noqa: B018 - reading it is the test
    with pytest.raises(ConfigAttributeError):
        sliced.finetune  # noqa: B018
