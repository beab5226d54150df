"""kvtier logs key-value events and never prints on its own."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog
from structlog.testing import capture_logs

from tests.factories import make_manager, make_request, schedule


@pytest.fixture
def unconfigured_structlog() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def refuse_a_reset() -> None:
    manager = make_manager(11)
    schedule(manager, make_request("0", list(range(20))))
    assert not manager.reset_prefix_cache()


@pytest.mark.usefixtures("unconfigured_structlog")
def test_without_structlog_config_events_go_to_stdlib_logging(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="kvtier"):
        refuse_a_reset()
    assert capsys.readouterr().out == ""
    (record,) = [r for r in caplog.records if r.name == "kvtier.pool"]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "event='reset_prefix_cache_refused' blocks_in_use=2"


@pytest.mark.usefixtures("unconfigured_structlog")
def test_stdlib_level_filters_events(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="kvtier"):
        refuse_a_reset()
    assert not [r for r in caplog.records if r.name == "kvtier.pool"]


def test_with_structlog_configured_events_go_through_structlog() -> None:
    with capture_logs() as logs:
        refuse_a_reset()
    assert logs == [
        {"event": "reset_prefix_cache_refused", "blocks_in_use": 2, "log_level": "warning"}
    ]
