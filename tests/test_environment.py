"""The environment is the locked one: every package `constraints.txt` pins that is installed here
has the pinned version (in the Ray launcher's environment, `constraints-ray.txt`'s pins come
first), and the locks pin every dependency pyproject.toml declares, within its declared range.
After changing a dependency, regenerate both with `python3 .ci/lock.py`."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from src.config.paths import REPO_ROOT

MAIN_LOCK = REPO_ROOT / "constraints.txt"
RAY_LOCK = REPO_ROOT / "constraints-ray.txt"
RAY_EXTRA = "ray"
REINSTALL = 'pip install -c constraints.txt -e ".[dev]"'
REINSTALL_RAY = (
    'pip install -c constraints-ray.txt -e ".[ray]" pytest (the Ray launcher\'s own environment; '
    "the tests' environment has no Ray launcher: pip uninstall hydra-ray-launcher, then " + REINSTALL + ")"
)


def read_lock(path: Path) -> dict[str, str]:
    """Name -> pinned version of a constraints file: `name==version` lines and `#` comments,
    anything else (a range, a URL) refused, since the lock pins exact versions only."""
    pins: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        requirement = Requirement(text)
        specifiers = list(requirement.specifier)
        if len(specifiers) != 1 or specifiers[0].operator != "==" or requirement.url or requirement.marker:
            raise ValueError(f"{path.name}:{number} is not an exact pin: {line!r}")
        pins[canonicalize_name(requirement.name)] = specifiers[0].version
    return pins


def installed() -> dict[str, str]:
    """Name -> version of every distribution installed here (the one Python imports first)."""
    versions: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        versions.setdefault(canonicalize_name(dist.metadata["Name"]), dist.version)
    return versions


def ray_launcher_installed() -> bool:
    """Whether this is an environment with the Ray launcher (`.[ray]`, installed from its own lock)."""
    return importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is not None


def applicable_pins() -> dict[str, tuple[str, str]]:
    """Name -> (pinned version, lock file) for this environment: constraints.txt, and in the Ray
    launcher's environment constraints-ray.txt over it."""
    pins = {name: (version, MAIN_LOCK.name) for name, version in read_lock(MAIN_LOCK).items()}
    if ray_launcher_installed():
        pins.update({name: (version, RAY_LOCK.name) for name, version in read_lock(RAY_LOCK).items()})
    return pins


def drift(pins: dict[str, tuple[str, str]], versions: dict[str, str]) -> list[str]:
    """One line for each pinned package installed at another version than its pin."""
    return [
        f"{name} {versions[name]} is installed, {lock} pins {pin}"
        for name, (pin, lock) in sorted(pins.items())
        if name in versions and Version(versions[name]) != Version(pin)
    ]


def declared() -> dict[str, list[Requirement]]:
    """pyproject.toml's requirements: `dependencies` under "", then each extra under its name."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    groups = {"": project["dependencies"], **project.get("optional-dependencies", {})}
    return {group: [Requirement(spec) for spec in specs] for group, specs in groups.items()}


def test_installed_versions_are_the_locked_ones():
    pins = applicable_pins()
    versions = installed()
    direct = {canonicalize_name(r.name) for r in declared()[""]}
    assert direct <= set(pins) & set(versions)  # the project's own dependencies were all compared
    found = drift(pins, versions)
    remedy = REINSTALL_RAY if ray_launcher_installed() else REINSTALL
    assert not found, "this environment is not the locked one: " + "; ".join(found) + ". Reinstall: " + remedy


def test_drift_names_each_package_installed_at_another_version():
    versions = installed()
    pytest_version = versions["pytest"]
    assert drift({"pytest": (pytest_version, "constraints.txt")}, versions) == []
    assert drift({"pytest": ("1.0", "constraints.txt"), "not-installed-here": ("1.0", "x")}, versions) == [
        f"pytest {pytest_version} is installed, constraints.txt pins 1.0"
    ]
    assert drift({"pytest": (pytest_version + ".0", "constraints.txt")}, versions) == []  # 9.2 == 9.2.0


def test_read_lock_refuses_anything_but_exact_pins(tmp_path):
    lock = tmp_path / "constraints.txt"
    lock.write_text("# header\n\nNumPy==2.1.0  # why\nscikit_learn==1.5.2\n")
    assert read_lock(lock) == {"numpy": "2.1.0", "scikit-learn": "1.5.2"}
    for line in ("numpy>=2", "numpy==2.1.0 ; python_version < '3.12'", "numpy==2.1.0,<3"):
        lock.write_text(f"# header\n{line}\n")
        with pytest.raises(ValueError, match="constraints.txt:2 is not an exact pin"):
            read_lock(lock)


def test_the_locks_pin_every_declared_dependency_within_its_range():
    main, ray = read_lock(MAIN_LOCK), read_lock(RAY_LOCK)
    problems = []
    for group, requirements in declared().items():
        if group != RAY_EXTRA:  # the pipeline, the tests, s3, server, slurm: one environment
            problems += out_of_range(requirements, main, MAIN_LOCK.name)
        if group in ("", RAY_EXTRA):  # the Ray launcher's environment
            problems += out_of_range(requirements, ray, RAY_LOCK.name)
    assert not problems, "; ".join(problems) + ": run python3 .ci/lock.py"


def out_of_range(requirements: list[Requirement], pins: dict[str, str], lock: str) -> list[str]:
    """One line for each requirement the lock does not pin, or pins outside its range."""
    problems = []
    for requirement in requirements:
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None:
            problems.append(f"{lock} does not pin {requirement.name}")
        elif not requirement.specifier.contains(pin, prereleases=True):
            problems.append(f"{lock} pins {requirement.name}=={pin}, outside {requirement}")
    return problems


def test_the_ray_environment_shares_every_version_but_those_the_launcher_holds_back():
    """The Ray lock is resolved within the main one: the same versions but for joblib and
    cloudpickle (hydra-ray-launcher pins cloudpickle<3, joblib 1.6 needs 3) and Ray's own packages."""
    main, ray = read_lock(MAIN_LOCK), read_lock(RAY_LOCK)
    differ = sorted(name for name in set(main) & set(ray) if Version(main[name]) != Version(ray[name]))
    assert set(differ) <= {"cloudpickle", "joblib"}, differ
    assert "hydra-ray-launcher" in ray and "hydra-ray-launcher" not in main and "ray" not in main
