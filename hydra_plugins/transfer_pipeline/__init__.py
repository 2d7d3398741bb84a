"""Loaded by Hydra's plugin scan, including DVC's Hydra composition (`dvc exp run -S ...`),
which adds the repository root to the import path: registers the OmegaConf resolvers that
`conf/` uses, so DVC composes the same `params.yaml` as `python -m src.params`."""

from src.config.compose import register_resolvers

register_resolvers()
