"""Regenerate `params.yaml` from `conf/`: `python -m src.params [hydra overrides...]`.

    python -m src.params                       # the default pipeline
    python -m src.params experiment=ci         # a preset
    python -m src.params head.dropout=0.3      # any override

`dvc exp run -S key=value` composes `conf/` the same way (Hydra composition is enabled in
`.dvc/config`), so both routes give the stages the same parameters.
"""

from __future__ import annotations

import sys

from src.config.checks import validate
from src.config.compose import compose, write_params
from src.config.paths import PARAMS_FILE
from src.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    overrides = sys.argv[1:] if argv is None else argv
    try:
        cfg = compose(overrides)  # validated while resolving, and again below
        validate(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_params(cfg)
    print(f"wrote {PARAMS_FILE.name} ({' '.join(overrides) or 'defaults'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
