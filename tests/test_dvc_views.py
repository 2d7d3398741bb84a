"""Views of DVC's results: the readable `dvc exp show` (`python -m src.experiments`) and the
`dvc plots show` page that renders offline (`python -m src.offline_plots`).

The fast tests check the column choice and the template on small inputs; the slow ones run a
real three-experiment sweep of the `ci` preset in a fresh copy of the repository (DVC's queue,
as a user would), then look at its table and its plots page."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from src.experiments import SHOWN_METRICS, drop_pattern
from src.offline_plots import PACKAGES, Library, OfflinePlotsError, fetch, integrity, library, template
from tests.conftest import require_shared
from tests.test_dvc_pipeline import copy_repo, run_queue, set_ci, sh

WIDTH = 160  # the terminal the experiments table must fit
DROPOUTS = ("0.2", "0.3", "0.4")


def _state(rev: str, params: dict, metrics: dict | None = None, deps: dict | None = None) -> dict:
    """One row of `dvc exp show --json`."""
    return {
        "rev": rev,
        "data": {
            "params": {"params.yaml": {"data": params}},
            "metrics": {"reports/metrics.json": {"data": metrics or {}}},
            "deps": deps or {},
        },
        "experiments": None,
    }


def _sweep_json(dropouts: tuple[float, ...]) -> list[dict]:
    """`dvc exp show --json` of a workspace, a baseline of the default preset with no results, and
    one experiment of the ci preset per dropout."""
    deps = {"src/stages/train_head.py": {"hash": "1" * 32}, "../shared/weights/vgg16.h5": {"hash": "2" * 32}}
    default = {"preset": "default", "head": {"dropout": 0.5, "units": [256]}, "seed": 42}
    metrics = {"test": {"accuracy": 0.7, "loss": 1.2}, "macro_f1": 0.6, "head_test": {"loss": 2.0}}
    baseline = _state("a" * 40, default)
    baseline["experiments"] = [
        {
            "name": f"exp-{i}",
            "revs": [
                _state(
                    f"{i}" * 40,
                    {"preset": "ci", "head": {"dropout": dropout, "units": [64]}, "seed": 42},
                    metrics,
                    deps,
                )
            ],
        }
        for i, dropout in enumerate(dropouts)
    ]
    return [_state("workspace", default, deps=deps), baseline]


def _dropped(pattern: str | None, columns: list[str]) -> set[str]:
    """The columns `dvc exp show --drop pattern` leaves out (DVC matches from the start)."""
    return {c for c in columns if pattern and re.match(pattern, c)}


def test_the_view_drops_deps_constant_params_and_minor_metrics_and_keeps_what_a_sweep_changed():
    pattern = drop_pattern(_sweep_json((0.2, 0.3, 0.4)))
    columns = [
        "Experiment", "Created", "State", "Executor", "test.accuracy", "test.loss", "macro_f1",
        "head_test.loss", "preset", "head.dropout", "head.units", "seed",
        "src/stages/train_head.py", "../shared/weights/vgg16.h5",
    ]  # fmt: skip
    assert _dropped(pattern, columns) == {
        "Executor",
        "macro_f1",
        "head_test.loss",
        "preset",  # ci in every experiment, though not in the baseline
        "head.units",
        "seed",
        "src/stages/train_head.py",
        "../shared/weights/vgg16.h5",
    }
    assert {"test.accuracy", "test.loss"} <= set(SHOWN_METRICS)


def test_with_one_experiment_the_view_shows_what_differs_from_its_baseline():
    pattern = drop_pattern(_sweep_json((0.3,)))
    kept = {"preset", "head.dropout", "head.units", "seed"} - _dropped(
        pattern, ["preset", "head.dropout", "head.units", "seed"]
    )
    assert kept == {"preset", "head.dropout", "head.units"}


def test_a_param_named_like_a_metric_is_dropped_under_the_name_dvc_gives_it():
    states = _sweep_json((0.2, 0.3))
    for state in [states[1], *(e["revs"][0] for e in states[1]["experiments"])]:
        state["data"]["params"]["params.yaml"]["data"]["test"] = {"accuracy": 1}  # same in all: dropped
    pattern = drop_pattern(states)
    dropped = _dropped(pattern, ["params.yaml:test.accuracy", "reports/metrics.json:test.accuracy"])
    assert dropped == {"params.yaml:test.accuracy"}


def test_the_pinned_vega_libraries_are_those_dvcs_page_loads_from_its_cdn():
    from dvc_render.vega import VegaRenderer

    loaded = dict(re.findall(r"cdn\.jsdelivr\.net/npm/([a-z-]+)@([0-9.]+)", VegaRenderer.SCRIPTS))
    assert loaded == {name: version for name, version, _ in PACKAGES}


def _tarball(path: Path, name: str, code: str) -> Path:
    """An npm-style tarball of a package whose browser build is `code`."""
    with tarfile.open(path, "w:gz") as tar:
        for member, text in (
            (
                "package/package.json",
                json.dumps({"name": name, "version": "1.0.0", "jsdelivr": "build/x.min.js"}),
            ),
            ("package/build/x.min.js", code),
        ):
            data = text.encode()
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_cached_tarball_is_used_when_its_digest_matches_and_its_browser_build_is_read(tmp_path):
    tarball = _tarball(tmp_path / "vega-1.0.0.tgz", "vega", "var vega = 1;")
    assert fetch("vega", "1.0.0", integrity(tarball), tmp_path) == tarball  # no npm involved
    lib = library(tarball)
    assert (lib.name, lib.version, lib.code) == ("vega", "1.0.0", "var vega = 1;")


def test_without_npm_and_without_a_cached_tarball_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    name, version, digest = PACKAGES[0]
    with pytest.raises(OfflinePlotsError, match="npm not found: install Node.js"):
        fetch(name, version, digest, tmp_path / "cache")


def test_the_template_drops_dvcs_cdn_scripts_and_keeps_the_plot_and_its_data(tmp_path):
    from dvc_render import render_html
    from dvc_render.vega import VegaRenderer

    libraries = [Library("vega", "5.20.2", "BSD-3-Clause", 'var vega = {}; var s = "</script>";')]
    page_template = template(libraries)
    assert "{plot_divs}" in page_template and "{scripts}" not in page_template
    assert "<\\/script>" in page_template  # the library cannot end its script element early
    (tmp_path / "t.html").write_text(page_template)
    points = [{"epoch": 1, "val_loss": 0.4321}, {"epoch": 2, "val_loss": 0.3579}]
    renderer = VegaRenderer(points, "history.csv", x="epoch", y="val_loss")
    render_html([renderer], tmp_path / "out" / "index.html", html_template=tmp_path / "t.html")
    page = (tmp_path / "out" / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and not re.search(r"<script[^>]+src=", page)
    assert "var vega = {}" in page and "0.4321" in page and "0.3579" in page and "vegaEmbed(" in page


def test_a_library_holding_a_dvc_placeholder_is_refused():
    with pytest.raises(OfflinePlotsError, match=r"\{plot_divs\}"):
        template([Library("vega", "5.20.2", "BSD-3-Clause", "var a = '{plot_divs}';")])


# --- a real sweep -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A fresh copy of the repository (params.yaml of the default preset, no dvc.lock committed)
    with three queued experiments of the ci preset run (exporting off), one per head dropout."""
    require_shared()
    repo = copy_repo(tmp_path_factory.mktemp("views"))
    for dropout in DROPOUTS:
        sh(repo, "dvc", "exp", "run", "--queue", *set_ci(), "-S", f"head.dropout={dropout}")
    status = run_queue(repo)
    assert status.count("Success") == len(DROPOUTS), status
    return repo


def _table(text: str) -> list[dict[str, str]]:
    """The rows of a `dvc exp show` table, as {column: cell} (cells hold no double space)."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not set(line.strip()) <= {"─"}]
    header = re.split(r"\s{2,}", lines[0])
    return [dict(zip(header, re.split(r"\s{2,}", line))) for line in lines[1:]]


@pytest.mark.slow
def test_the_experiments_view_of_a_three_experiment_sweep_fits_160_columns(sweep):
    plain = sh(sweep, "dvc", "exp", "show")
    view = sh(sweep, "python", "-m", "src.experiments")
    widest, plain_widest = (max(len(line) for line in text.splitlines()) for text in (view, plain))
    print(f"src.experiments: {widest} characters wide; plain `dvc exp show`: {plain_widest}\n{view}")
    assert widest <= WIDTH, f"{widest} characters wide:\n{view}"
    assert plain_widest > WIDTH  # what the view is for

    states = json.loads(sh(sweep, "dvc", "exp", "show", "--json"))
    experiments = {e["name"]: e["revs"][0]["data"] for s in states for e in s.get("experiments") or []}
    assert len(experiments) == len(DROPOUTS)
    rows = {
        re.search(r"\[(.+)\]", r["Experiment"]).group(1): r for r in _table(view) if "[" in r["Experiment"]
    }
    assert set(rows) == set(experiments)
    shown = set()
    for name, data in experiments.items():
        row = rows[name]
        accuracy = data["metrics"]["reports/metrics.json"]["data"]["test"]["accuracy"]
        assert math.isclose(float(row["test.accuracy"]), accuracy, rel_tol=1e-4), (name, row)
        assert row["head.dropout"] == str(data["params"]["params.yaml"]["data"]["head"]["dropout"])
        shown.add(row["head.dropout"])
    assert shown == set(DROPOUTS)
    assert "src/" not in view and ".h5" not in view and "preset" not in view  # deps, unswept params


def _rendered_plots(page: Path) -> int:
    """How many Vega views headless Chromium draws for `page` with every host name unresolvable."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip(
            "Chromium not found (apt-get install chromium): the page's text was checked, not its drawing"
        )
    proc = subprocess.run(
        [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={page.parent / '.chromium'}", "--host-resolver-rules=MAP * ~NOTFOUND",
            "--virtual-time-budget=10000", "--dump-dom", page.as_uri(),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.count('class="marks"')


@pytest.mark.slow
def test_the_plots_page_of_the_sweep_renders_offline(sweep):
    names = sh(sweep, "dvc", "exp", "list", "--name-only").split()
    sh(sweep, "dvc", "plots", "diff", *names, "-o", "cdn_page")  # DVC's own page, before the setup
    print(sh(sweep, "python", "-m", "src.offline_plots"))
    assert (
        sh(sweep, "dvc", "config", "--local", "plots.html_template").strip()
        == "../.pipeline/plots/plots_offline.html"
    )
    sh(sweep, "dvc", "plots", "diff", *names)  # into dvc_plots/, with the configured template
    offline, cdn = sweep / "dvc_plots" / "index.html", sweep / "cdn_page" / "index.html"
    page = offline.read_text()
    assert "cdn.jsdelivr" not in page and not re.search(r"<script[^>]+src=", page)
    assert "https://cdn.jsdelivr.net/npm/vega@" in cdn.read_text()
    plots = re.findall(r'<div id = "[^"]+">.*?</div>', cdn.read_text(), flags=re.S)
    assert len(plots) == 4 and all(plot in page for plot in plots)  # each plot, with all its data
    assert all(name in page for name in names) and '"val_loss"' in page
    assert "dvc_plots/" in (sweep / ".gitignore").read_text()
    assert sh(sweep, "git", "status", "--porcelain", "--", "dvc_plots", ".pipeline") == ""
    assert _rendered_plots(offline) == 4
    assert _rendered_plots(cdn) == 0  # DVC's page draws nothing offline
