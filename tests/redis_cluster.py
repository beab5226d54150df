"""A real 3-master Redis Cluster on free loopback ports, for the Redis tier's tests.

:class:`RedisClusterServers` starts three :class:`~tests.redis_server.RedisServer`
processes with ``--cluster-enabled yes`` (each with its own ``nodes.conf``),
joins them with ``redis-cli --cluster create … --cluster-replicas 0
--cluster-yes`` and waits, under a deadline, until ``CLUSTER INFO`` reports
``cluster_state:ok`` on every node. Without ``redis-server`` or ``redis-cli``
the fixtures skip with the reason.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.redis_server import ADDRESS_IN_USE, HOST, RedisServer, redis_binary

__all__ = ["NODE_TIMEOUT_MS", "RedisClusterServers", "redis_cluster", "shared_redis_cluster"]

NODE_TIMEOUT_MS = 2000
"""``cluster-node-timeout``: how long a silent node takes to be suspected."""

_READY_SECONDS = 30.0


def redis_cli_binary() -> str:
    """The ``redis-cli`` (or ``valkey-cli``) path; skips the test without one."""
    for name in ("redis-cli", "valkey-cli"):
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.skip(
        "redis-cli is not installed (apt-get install redis-tools); the Redis Cluster "
        "tests create a real cluster with redis-cli --cluster create"
    )


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_cluster_port(taken: set[int]) -> int:
    """A free port ``p`` ≤ 55535 whose cluster bus port ``p + 10000`` is free too.

    (A cluster node listens on both; the OS's ephemeral ports are too high.)
    """
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 55536)
        if {port, port + 10000} & taken:
            continue
        if _port_is_free(port) and _port_is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def cluster_state(node: RedisServer) -> str:
    """The node's ``cluster_state`` (``ok``, ``fail``), or ``down`` when it does not answer."""
    try:
        with node.client(socket_timeout=1, socket_connect_timeout=1) as admin:
            info = admin.execute_command("CLUSTER", "INFO")
    except redis.exceptions.RedisError:
        return "down"
    text = info.decode() if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        if line.startswith("cluster_state:"):
            return line.partition(":")[2].strip()
    return "unknown"


def wait_for_state(nodes: list[RedisServer], state: str, seconds: float) -> None:
    """Wait until every node in ``nodes`` reports ``cluster_state:<state>``.

    Raises:
        RuntimeError: Not within ``seconds``.
    """
    deadline = time.monotonic() + seconds
    while True:
        states = [cluster_state(node) for node in nodes]
        if all(s == state for s in states):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"cluster not {state} after {seconds:g} s: {states}")
        time.sleep(0.05)


class RedisClusterServers:
    """Three cluster-enabled masters on ``127.0.0.1`` sharing the 16384 slots.

    Args:
        directory: Holds one working directory (and ``nodes.conf``) per node.
    """

    def __init__(self, directory: Path) -> None:
        self.binary = redis_binary()
        self.cli = redis_cli_binary()
        self.directory = directory
        self._tries = 0
        self.nodes = self._new_nodes()

    def _new_nodes(self) -> list[RedisServer]:
        """Three nodes on new ports, in directories of their own (no old nodes.conf)."""
        self._tries += 1
        directory = self.directory / f"try{self._tries}"
        taken: set[int] = set()
        ports = []
        for _ in range(3):
            ports.append(free_cluster_port(taken))
            taken |= {ports[-1], ports[-1] + 10000}
        return [
            RedisServer(
                self.binary,
                directory / f"node{index}",
                port,
                extra=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(directory / f"node{index}" / "nodes.conf"),
                    "--cluster-node-timeout",
                    str(NODE_TIMEOUT_MS),
                ],
            )
            for index, port in enumerate(ports)
        ]

    @property
    def url(self) -> str:
        """The first node's URL (a cluster client discovers the others)."""
        return self.nodes[0].url

    def start(self) -> None:
        """Start the nodes, create the cluster and wait until every node says ok.

        Ports taken between their check and the nodes' binds (another test
        run's servers) are given up for new ones, a few times.
        """
        for attempt in range(3):
            try:
                self._start_once()
                return
            except RuntimeError as exc:
                if ADDRESS_IN_USE not in str(exc) or attempt == 2:
                    raise
                self.nodes = self._new_nodes()

    def _start_once(self) -> None:
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"{HOST}:{node.port}" for node in self.nodes]
            created = subprocess.run(
                [
                    self.cli,
                    "--cluster",
                    "create",
                    *addresses,
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=_READY_SECONDS,
                check=False,
            )
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-2000:]}")
            wait_for_state(self.nodes, "ok", _READY_SECONDS)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Kill every node."""
        for node in self.nodes:
            node.stop()

    def slot_owners(self) -> list[tuple[int, int, int]]:
        """``(first slot, last slot, node index)`` of every range, from ``CLUSTER SLOTS``."""
        ports = {node.port: index for index, node in enumerate(self.nodes)}
        with self.nodes[0].client() as admin:
            ranges = admin.execute_command("CLUSTER", "SLOTS")
        return [
            (int(begin), int(end), ports[int(primary[1])]) for begin, end, primary, *_ in ranges
        ]

    def dbsizes(self) -> list[int]:
        """``DBSIZE`` of each node, in node order."""
        sizes = []
        for node in self.nodes:
            with node.client() as admin:
                sizes.append(int(admin.dbsize()))
        return sizes

    def flushall(self) -> None:
        """Empty every node."""
        for node in self.nodes:
            with node.client() as admin:
                admin.flushall()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """A fresh cluster for one test (for tests that kill a node)."""
    cluster = RedisClusterServers(tmp_path / "cluster")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def shared_redis_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RedisClusterServers]:
    """One cluster for a whole session (tests separate themselves by key prefix)."""
    cluster = RedisClusterServers(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
