"""A readable `dvc exp show`: `python -m src.experiments [dvc exp show options]`.

    python -m src.experiments                                       # the experiments of HEAD
    python -m src.experiments --sort-by test.accuracy --sort-order desc
    python -m src.experiments -A --keep macro_f1                    # any `dvc exp show` option

Plain `dvc exp show` has a column for every dependency of every stage (the hash of each `src/`
module, the dataset folder, the weights file, ...) and for every parameter, about a thousand
characters wide here (the most DVC lays out), and DVC has no setting for default options. This
runs `dvc exp show` with a `--drop` pattern that leaves out:

- every dependency column (hashes; plain `dvc exp show` and `dvc status` have them);
- the `Executor` column (the State column says whether a queued experiment ran);
- every parameter that has one value across the experiments shown (all rows but the workspace
  when fewer than two experiments are shown), so a sweep shows the keys it swept;
- every metric but `SHOWN_METRICS`.

Any other option goes to `dvc exp show` as given: `--keep REGEX` brings back a dropped column,
`--drop REGEX` drops more, `--csv`, `--md` and `--json` change the format.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

# the metrics shown, by the names `dvc exp show` gives their columns (reports/metrics.json)
SHOWN_METRICS = ("test.accuracy", "test.loss", "test.ece", "val.accuracy", "head_test.accuracy")
DROPPED_COLUMNS = ("Executor",)
# `dvc exp show`'s own columns: a metric or parameter of the same name is shown as `<file>:<name>`
DVC_COLUMNS = ("Experiment", "rev", "typ", "Created", "parent", "State", "Executor")
DVC = (sys.executable, "-m", "dvc")  # the DVC installed beside this Python


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as `dvc exp show` names their leaves: keys joined by dots, lists kept whole,
    empty mappings left out."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def rows(states: Iterable[Mapping[str, Any]]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(kind, data) of every row of `dvc exp show --json`: kind is `workspace`, `baseline` or
    `experiment`; data is the row's `data` (params, metrics, deps), empty while queued."""
    for state in states:
        kind = "workspace" if state.get("rev") == "workspace" else "baseline"
        yield kind, state.get("data") or {}
        for experiment in state.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                yield "experiment", rev.get("data") or {}


def _files(data: Mapping[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    """A row's params or metrics, flattened, per file (files that failed to load are empty)."""
    files = data.get(kind) or {}
    return {path: flatten(item["data"]) for path, item in files.items() if isinstance(item.get("data"), dict)}


def drop_pattern(states: Sequence[Mapping[str, Any]]) -> str | None:
    """The `--drop` regex that leaves out of `dvc exp show` (given its `--json` output for the
    same selection of rows) what the module docstring lists; None when nothing is to drop."""
    table = list(rows(states))
    names: dict[str, dict[str, dict[str, None]]] = {"metrics": {}, "params": {}}
    deps: set[str] = set()
    for _, data in table:
        for kind, found in names.items():
            for path, flat in _files(data, kind).items():
                found.setdefault(path, {}).update(dict.fromkeys(flat))
        deps.update(data.get("deps") or {})
    count = Counter(name for found in names.values() for flat in found.values() for name in flat)
    count.update(DVC_COLUMNS)

    def header(path: str, name: str) -> str:
        return name if count[name] == 1 else f"{path}:{name}"

    experiments = [data for kind, data in table if kind == "experiment" and data]
    compared = experiments if len(experiments) >= 2 else [data for kind, data in table if kind != "workspace"]
    params = [_files(data, "params") for data in compared]
    dropped = deps | set(DROPPED_COLUMNS)
    for path, found in names["params"].items():
        for name in found:
            values = {json.dumps(row.get(path, {}).get(name), sort_keys=True) for row in params}
            if len(values) <= 1:
                dropped.add(header(path, name))
    for path, metrics in names["metrics"].items():
        dropped.update(header(path, name) for name in metrics if name not in SHOWN_METRICS)
    if not dropped:
        return None
    return "(?:" + "|".join(re.escape(column) for column in sorted(dropped)) + ")$"


def exp_show_json(args: Sequence[str]) -> list[dict[str, Any]]:
    """`dvc exp show --json` for the rows `args` select (the other options do not change it)."""
    proc = subprocess.run([*DVC, "exp", "show", "--json", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`dvc exp show --json` failed:\n{proc.stderr.strip() or proc.stdout.strip()}")
    return json.loads(proc.stdout)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(args):
        print(__doc__)
        return 0
    try:
        pattern = drop_pattern(exp_show_json(args))
    except (RuntimeError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    drop = ["--drop", pattern] if pattern else []
    return subprocess.run([*DVC, "exp", "show", *drop, *args]).returncode


if __name__ == "__main__":
    sys.exit(main())
