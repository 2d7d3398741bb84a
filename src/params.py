"""Regenerate `params.yaml` from `conf/`: `python -m src.params [hydra overrides...]`.

    python -m src.params                       # the default pipeline
    python -m src.params experiment=ci         # a preset
    python -m src.params head.dropout=0.3      # any override
    python -m src.params --check               # is params.yaml what its recorded command composes?

The first line of the written `params.yaml` records the command that composed it (a YAML
comment, which DVC and the stages ignore), so that `--check` and tests/test_config.py can compose
`conf/` again with the same overrides: a `params.yaml` edited by hand, or composed from a `conf/`
that has changed since, differs from that composition. A `params.yaml` without the line (DVC's
`dvc exp run -S` writes none) is checked against the defaults.

`dvc exp run -S key=value` composes `conf/` the same way (Hydra composition is enabled in
`.dvc/config`), so both routes give the stages the same parameters.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from src.config.checks import validate
from src.config.compose import compose, to_yaml
from src.config.paths import PARAMS_FILE
from src.errors import ConfigError
from src.outputs.atomic import atomic_file

COMMAND = "python -m src.params"  # how params.yaml's first line starts: the command that wrote it
RECORD_PREFIX = f"# {COMMAND}"


def record_line(overrides: Sequence[str]) -> str:
    """The first line of a written params.yaml: the command, overrides quoted for a shell."""
    if any("\n" in o or "\r" in o for o in overrides):
        raise ConfigError("an override may not span lines: params.yaml records them on one")
    return f"{RECORD_PREFIX} {shlex.join(overrides)}".rstrip() + "\n"


def params_text(overrides: Sequence[str]) -> str:
    """The whole text `python -m src.params <overrides>` writes: the record line, then the YAML
    of `conf/` composed with `overrides` (validated; a refused value is a ConfigError)."""
    record = record_line(overrides)
    cfg = compose(overrides)  # validated while resolving, and again below
    validate(cfg)
    return record + to_yaml(cfg)


def recorded_overrides(text: str) -> list[str] | None:
    """The overrides that params.yaml's record line names, or None when it has none (written
    by DVC's `dvc exp run -S`, or before the line was recorded)."""
    first = text.split("\n", 1)[0]
    if first != RECORD_PREFIX and not first.startswith(RECORD_PREFIX + " "):
        return None
    try:
        return shlex.split(first[len(RECORD_PREFIX) :])
    except ValueError as err:  # an unbalanced quote: the line was edited
        raise ConfigError(f"params.yaml's first line is not a command `{COMMAND}` wrote ({err})") from None


def drift(path: Path = PARAMS_FILE) -> str | None:
    """What differs between `path` and what `conf/` composes with the overrides its first line
    records (the defaults when it records none), as one message saying how to regenerate it;
    None when they agree to the character."""
    path = Path(path)
    if not path.is_file():
        return f"{path} not found: create it with `{COMMAND}`"
    text = path.read_text(encoding="utf-8")
    overrides = recorded_overrides(text)
    command = f"{COMMAND} {shlex.join(overrides or [])}".rstrip()
    try:
        expected = params_text(overrides or [])
    except ConfigError as err:
        return f"{path.name}: its recorded overrides no longer compose: {err}"
    if overrides is None:
        # written without the record line: compare the YAML alone, against the defaults
        expected = expected.split("\n", 1)[1]
        source = "the defaults (it records no overrides; `dvc exp run -S` writes none)"
    else:
        source = f"`{command}`"
    if text == expected:
        return None
    found, composed = OmegaConf.create(text), OmegaConf.create(expected)
    changed = sorted(_differing_keys(OmegaConf.to_container(found), OmegaConf.to_container(composed)))
    what = f"values differ at {', '.join(changed)}" if changed else "same values, different text"
    return (
        f"{path.name} drifted from what conf/ composes with {source}: {what}. It is never edited by "
        f"hand: regenerate it with `{command}` (adding any overrides it needs)"
    )


_ABSENT = object()  # a key one of two configs lacks


def _differing_keys(found: object, composed: object, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two plain configs (a missing key counts)."""
    if isinstance(found, dict) and isinstance(composed, dict):
        keys = [*found, *(k for k in composed if k not in found)]
        return [
            key
            for name in keys
            for key in _differing_keys(
                found.get(name, _ABSENT), composed.get(name, _ABSENT), f"{prefix}{name}."
            )
        ]
    return [] if found == composed else [prefix.rstrip(".")]


def write_text(text: str, path: Path = PARAMS_FILE) -> Path:
    """Write `text` to `path` atomically (`src.outputs.atomic.atomic_file`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(f"usage: {COMMAND} [--check] [group=option ...] [key=value ...]\n\n{(__doc__ or '').strip()}")
        return 0
    if "--check" in args:
        if args != ["--check"]:
            print(f"error: `{COMMAND} --check` takes no overrides", file=sys.stderr)
            return 2
        problem = drift()
        print(problem or f"{PARAMS_FILE.name} is what conf/ composes with its recorded overrides")
        return 1 if problem else 0
    try:
        text = params_text(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_text(text)
    print(f"wrote {PARAMS_FILE.name} ({' '.join(args) or 'defaults'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
