"""`dvc plots show` pages that render offline: `python -m src.offline_plots`, once per checkout.

DVC's page loads Vega, Vega-Lite and Vega-Embed from a CDN, so it is blank without network. This
fetches the versions that page loads from the npm registry (`npm pack`, each tarball checked
against the sha512 digest pinned in `PACKAGES`; npm's cache serves them again offline), writes an
HTML template with the three libraries inlined to `.pipeline/plots/plots_offline.html` (ignored by
git: the libraries' code is never committed) and sets it as this checkout's
`plots.html_template` in `.dvc/config.local`. From then on `dvc plots show` and `dvc plots diff`
write a self-contained `dvc_plots/index.html`.

    python -m src.offline_plots             # fetch, write the template, set it for this checkout
    python -m src.offline_plots --no-config # write the template only
    dvc config --local --unset plots.html_template   # back to DVC's page

Needs Node.js's `npm` the first time (or a copy of `.pipeline/plots/` from a checkout that has run it).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from src.config.paths import REPO_ROOT
from src.outputs.atomic import atomic_file

# What DVC's page loads from its CDN (dvc_render's VegaRenderer.SCRIPTS): name, version and the
# npm registry's sha512 digest of the tarball.
PACKAGES = (
    (
        "vega",
        "5.20.2",
        "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw==",
    ),
    (
        "vega-lite",
        "5.2.0",
        "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw==",
    ),
    (
        "vega-embed",
        "6.18.2",
        "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg==",
    ),
)
BUILD_DIR = REPO_ROOT / ".pipeline" / "plots"  # ignored by git
TEMPLATE_NAME = "plots_offline.html"
# what DVC fills in a template; `{scripts}`, the CDN script tags, is left out on purpose
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
{libraries}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


class OfflinePlotsError(RuntimeError):
    """A library could not be fetched or checked, or the template could not be set."""


@dataclass(frozen=True)
class Library:
    """One JavaScript library as the page inlines it."""

    name: str
    version: str
    license: str
    code: str


def integrity(path: Path) -> str:
    """The npm-style `sha512-<base64>` digest of a file."""
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def fetch(name: str, version: str, digest: str, cache: Path) -> Path:
    """The npm tarball of `name@version` in `cache`, fetched with `npm pack` unless already there,
    and checked against `digest`."""
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"{name}-{version}.tgz"
    if not tarball.is_file() or integrity(tarball) != digest:
        npm = shutil.which("npm")
        if npm is None:
            raise OfflinePlotsError(
                "npm not found: install Node.js (with npm) once to fetch the Vega libraries, "
                "or copy .pipeline/plots/ from a checkout that has run `python -m src.offline_plots`"
            )
        proc = subprocess.run(
            [npm, "pack", f"{name}@{version}", "--prefer-offline", "--silent"],
            cwd=cache,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not tarball.is_file():
            raise OfflinePlotsError(f"`npm pack {name}@{version}` failed: {proc.stderr.strip()[-2000:]}")
    found = integrity(tarball)
    if found != digest:
        tarball.unlink()
        raise OfflinePlotsError(f"{name}@{version}: the tarball's digest is {found}, expected {digest}")
    return tarball


def library(tarball: Path) -> Library:
    """The browser build of the package in `tarball` (the file its `jsdelivr` or `unpkg` field
    names: what the CDN serves for `<name>@<version>`)."""
    with tarfile.open(tarball) as tar:
        meta = json.load(_member(tar, "package/package.json"))
        entry = meta.get("jsdelivr") or meta.get("unpkg")
        if not entry:
            raise OfflinePlotsError(f"{tarball.name} names no browser build (jsdelivr or unpkg)")
        code = _member(tar, f"package/{os.path.normpath(entry)}").read().decode("utf-8")
    return Library(meta["name"], meta["version"], str(meta.get("license", "see its package")), code)


def _member(tar: tarfile.TarFile, name: str) -> IO[bytes]:
    """The file `name` of `tar`, open for reading."""
    file = tar.extractfile(name) if name in tar.getnames() else None
    if file is None:
        raise OfflinePlotsError(f"{name} is not in {tar.name}")
    return file


def template(libraries: list[Library]) -> str:
    """The HTML template for `dvc plots show` with `libraries` inlined, in order."""
    scripts = []
    for lib in libraries:
        found = [p for p in PLACEHOLDERS if p in lib.code]
        if found:  # DVC would fill them in inside the library's code
            raise OfflinePlotsError(f"{lib.name}@{lib.version} contains {', '.join(found)}")
        code = lib.code.replace("</script", "<\\/script")  # cannot end the script element early
        scripts.append(
            f"    <!-- {html.escape(lib.name)}@{html.escape(lib.version)}, "
            f"license {html.escape(lib.license)} -->\n    <script>{code}</script>"
        )
    return PAGE.format(libraries="\n".join(scripts), refresh_tag="{refresh_tag}", plot_divs="{plot_divs}")


def write(text: str, path: Path) -> Path:
    """Write `text` to `path` atomically (`src.outputs.atomic.atomic_file`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def set_template(path: Path, repo: Path = REPO_ROOT) -> None:
    """Make `path` this checkout's `plots.html_template` (`.dvc/config.local`, not committed;
    relative to `.dvc/`, as DVC reads it)."""
    value = os.path.relpath(path.resolve(), (repo / ".dvc").resolve())
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", value],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        command = f"dvc config --local plots.html_template {value}"
        raise OfflinePlotsError(f"`{command}` failed: {proc.stderr.strip()}")


def build(build_dir: Path = BUILD_DIR) -> Path:
    """Fetch and check the libraries, write the template into `build_dir`; its path."""
    cache = build_dir / "npm"
    libraries = [library(fetch(name, version, digest, cache)) for name, version, digest in PACKAGES]
    return write(template(libraries), build_dir / TEMPLATE_NAME)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--no-config"]):
        asked = bool({"-h", "--help"} & set(args))
        print(__doc__, file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    try:
        path = build()
        if not args:
            set_template(path)
    except OfflinePlotsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    shown = path.relative_to(REPO_ROOT)
    if args:
        print(f"wrote {shown}: `dvc plots show --html-template {shown}` writes a page that renders offline")
    else:
        print(f"wrote {shown}, this checkout's plots.html_template: `dvc plots show` pages render offline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
