"""kvtier's loggers: structlog key-value events that never print on their own.

An application that configures structlog gets kvtier's events through its own
structlog pipeline. One that does not gets them through the standard
:mod:`logging` logger of the same name (``kvtier.pool``, …) rendered as
``key=value`` text, where its logging configuration decides what is shown:
unconfigured structlog would print to stdout, which a library must not do.
kvtier never configures structlog or the root logger.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

__all__ = ["KVTierLogger", "get_logger"]

_RENDER = structlog.processors.KeyValueRenderer(key_order=["event"], sort_keys=True)


class KVTierLogger:
    """A logger that defers to structlog's configuration when there is one.

    Args:
        name: The logger's name, also the standard-library logger's name.
    """

    __slots__ = ("_name", "_stdlib")

    def __init__(self, name: str) -> None:
        self._name = name
        self._stdlib = structlog.wrap_logger(
            logging.getLogger(name),
            processors=[structlog.stdlib.filter_by_level, _RENDER],
            wrapper_class=structlog.stdlib.BoundLogger,
        )

    def _target(self) -> Any:
        if structlog.is_configured():
            return structlog.get_logger(self._name)
        return self._stdlib

    def debug(self, event: str, **fields: Any) -> None:
        """Log a debug event with key-value fields."""
        self._target().debug(event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        """Log an info event with key-value fields."""
        self._target().info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        """Log a warning event with key-value fields."""
        self._target().warning(event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        """Log an error event with key-value fields."""
        self._target().error(event, **fields)


def get_logger(name: str) -> KVTierLogger:
    """Return kvtier's logger called ``name`` (for example ``"kvtier.pool"``)."""
    return KVTierLogger(name)
