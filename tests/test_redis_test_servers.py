"""The test suite's own Redis servers survive a port taken between its check and the bind."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.redis_server import HOST, RedisServer, redis_binary


def test_a_server_whose_port_was_taken_meanwhile_starts_on_another(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind((HOST, 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        server = RedisServer(redis_binary(), tmp_path / "redis")
        server.port = taken  # as if another process bound it after free_port()
        server.start()
        try:
            assert server.port != taken
            with server.client() as client:
                assert client.ping()
        finally:
            server.stop()


def test_a_server_given_a_taken_port_fails_to_start(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind((HOST, 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        server = RedisServer(redis_binary(), tmp_path / "redis", taken)
        with pytest.raises(RuntimeError, match="Address already in use"):
            server.start()  # a port it was told to use: no other one will do
