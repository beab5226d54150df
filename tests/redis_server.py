"""A real ``redis-server`` on a free loopback port, for the Redis tier's tests.

:class:`RedisServer` runs the binary in a temporary directory with no
persistence (``--save '' --appendonly no``), bound to 127.0.0.1 only, and
waits for its "Ready to accept connections" log line, then for PING. Tests
can kill it, restart it (empty) on the same port, and talk to it with a plain
synchronous client. Without the binary the fixtures skip with the reason.
tests/redis_cluster.py and tests/redis_tls.py build a Cluster and a TLS
server from it.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

__all__ = ["RedisServer", "redis_binary", "redis_server", "shared_redis"]

HOST = "127.0.0.1"
_READY = b"Ready to accept connections"
_START_SECONDS = 20.0


def redis_binary() -> str:
    """The ``redis-server`` (or ``valkey-server``) path; skips the test without one."""
    for name in ("redis-server", "valkey-server"):
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.skip(
        "redis-server is not installed (apt-get install redis-server); the Redis tier "
        "tests need a real server on loopback"
    )


ADDRESS_IN_USE = "Address already in use"
"""What redis-server logs when its port was taken meanwhile."""
_PORT_TRIES = 3


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port``.

    Args:
        binary: The server binary.
        directory: Its working directory.
        port: The port (a free one when None).
        extra: More command-line options (``["--cluster-enabled", "yes"]``…).
        tls: ``port`` is a TLS port (``--tls-port``; the plain port is off), and
            ``extra`` names the certificates.
        admin: Options of :meth:`client` (for a TLS server: ``ssl=True``…).
    """

    def __init__(
        self,
        binary: str,
        directory: Path,
        port: int | None = None,
        extra: list[str] | None = None,
        *,
        tls: bool = False,
        admin: dict[str, object] | None = None,
    ) -> None:
        self.binary = binary
        self.directory = directory
        self.port = port if port is not None else free_port()
        self._chosen = port is None  # a port of our choosing: another may do on a clash
        self._started = False
        self.extra = list(extra or [])
        self.tls = tls
        self.admin = dict(admin or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.log = b""
        """What the server printed until it was ready (or failed to be)."""

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0`` (``rediss://`` for a TLS server)."""
        return f"{'rediss' if self.tls else 'redis'}://{HOST}:{self.port}/0"

    def client(self, **options: object) -> redis.Redis:
        """A synchronous client for setting up faults (the caller closes it)."""
        options = {"socket_timeout": 10, **self.admin, **options}
        return redis.Redis(host=HOST, port=self.port, **options)  # type: ignore[arg-type]

    def start(self) -> None:
        """Start the server and wait until it answers PING.

        A first start on a port this class chose tries another one if the
        port was taken between the check and the bind (another test run's
        server, say); a restart keeps its port.
        """
        for attempt in range(_PORT_TRIES):
            try:
                self._start_once()
                break
            except RuntimeError as exc:
                clash = ADDRESS_IN_USE in str(exc) and self._chosen and not self._started
                if not clash or attempt == _PORT_TRIES - 1:
                    raise
                self.port = free_port()
        self._started = True

    def _start_once(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            self.binary,
            "--bind",
            HOST,
            *(["--port", "0", "--tls-port"] if self.tls else ["--port"]),
            str(self.port),
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
            "--loglevel",
            "notice",
            *self.extra,
        ]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.process = process
        if process.stdout is None:
            raise RuntimeError("redis-server has no stdout pipe")
        log = b""
        deadline = time.monotonic() + _START_SECONDS
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while _READY not in log:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    self.stop()
                    raise RuntimeError(f"redis-server did not start: {log.decode()[-2000:]}")
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    self.stop()
                    raise RuntimeError(f"redis-server exited: {log.decode()[-2000:]}")
                log += chunk
                self.log = log
        # Nobody reads the log any more: close the pipe (redis ignores SIGPIPE)
        # and keep it quiet.
        process.stdout.close()
        with self.client() as admin:
            admin.config_set("loglevel", "warning")
            if not admin.ping():
                raise RuntimeError("redis-server does not answer PING")

    def kill(self) -> None:
        """SIGKILL the server (what a crash looks like) and reap it."""
        process, self.process = self.process, None
        if process is None:
            return
        process.send_signal(signal.SIGKILL)
        process.wait()
        if process.stdout is not None and not process.stdout.closed:
            process.stdout.close()

    def stop(self) -> None:
        """Stop the server (killing it; nothing is persisted anyway)."""
        self.kill()

    def restart(self) -> None:
        """Kill the server and start an empty one on the same port."""
        self.kill()
        self.start()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh server for one test (for tests that kill or reconfigure it)."""
    server = RedisServer(redis_binary(), tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server for a whole session (tests separate themselves by key prefix)."""
    server = RedisServer(redis_binary(), tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
