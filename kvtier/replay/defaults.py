"""The stack ``kvtier replay`` runs when no configuration file is given."""

from __future__ import annotations

import tomllib
from pathlib import Path

from kvtier.config import KvtierConfig, parse_config

__all__ = ["default_config", "default_config_path"]


def default_config_path() -> Path:
    """``kvtier/replay/default.toml``: device + CPU + disk (in a temporary directory)."""
    return Path(__file__).resolve().parent / "default.toml"


def default_config() -> KvtierConfig:
    """The default stack, parsed and validated like any configuration file."""
    return parse_config(tomllib.loads(default_config_path().read_text(encoding="utf-8")))
