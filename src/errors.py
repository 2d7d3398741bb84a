"""Errors meant for the user: a refused configuration value, a stage that cannot go on."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that the pipeline refuses, with the key and what is allowed."""


class StageError(RuntimeError):
    """A failure with a message meant for the user (bad input, missing file, offline)."""
