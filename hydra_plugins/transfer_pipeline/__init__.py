"""Loaded by Hydra's plugin scan, including DVC's Hydra composition (`dvc exp run -S ...`),
which adds the repository root to the import path: registers the configuration schema and the
OmegaConf resolvers that `conf/` uses (one of which validates the whole config), so DVC
composes the same `params.yaml` as `python -m src.params` and refuses the same bad values."""

from src.config.compose import register_resolvers

register_resolvers()
