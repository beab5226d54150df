"""A real TLS ``redis-server`` on loopback and certificates made with the ``openssl`` CLI.

:func:`make_certificates` writes, into a fresh directory (files 0600): a CA,
a server certificate for ``127.0.0.1`` (``subjectAltName = IP:127.0.0.1``)
and a client certificate, both signed by that CA, and a second, unrelated CA
(what a client with the wrong CA bundle trusts). The ``tls_redis`` fixture
runs a server with the plain port off (``--port 0 --tls-port P``) that asks
for client certificates but does not require them (``--tls-auth-clients
optional``). Without ``openssl``, or with a ``redis-server`` built without
TLS, the fixtures skip with the reason.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import redis

from tests.redis_server import RedisServer, redis_binary

__all__ = ["Certificates", "make_certificates", "tls_certificates", "tls_redis"]

_DAYS = "2"
_NO_TLS = ("Bad directive", "connection type tls", "TLS is not supported")
"""What a redis-server built without TLS says when given ``--tls-port``: an
unknown directive (Redis 6.x, 7.0) or no ``tls`` connection type (7.2 and later)."""
_CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@attrs.frozen
class Certificates:
    """Paths of the PEM files :func:`make_certificates` wrote."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def openssl_binary() -> str:
    """The ``openssl`` path; skips the test without one."""
    path = shutil.which("openssl")
    if path is None:
        pytest.skip(
            "openssl is not installed (apt-get install openssl); the Redis TLS tests "
            "make their certificates with it"
        )
    return path


def _run(openssl: str, *args: str | Path) -> None:
    done = subprocess.run(
        [openssl, *map(str, args)], capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr[-2000:]}")


def _ca(openssl: str, directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _run(
        openssl, "req", "-x509", *_CURVE, "-keyout", key, "-out", cert, "-days", _DAYS,
        "-subj", f"/CN=kvtier test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
    )  # fmt: skip
    return cert, key


def _leaf(
    openssl: str, directory: Path, name: str, ca: tuple[Path, Path], extensions: str
) -> tuple[Path, Path]:
    cert, key, request = (directory / f"{name}{ext}" for ext in (".crt", ".key", ".csr"))
    config = directory / f"{name}.ext"
    config.write_text(
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid, issuer\n" + extensions
    )
    _run(openssl, "req", "-new", *_CURVE, "-keyout", key, "-out", request, "-subj", f"/CN={name}")
    _run(
        openssl, "x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1],
        "-CAcreateserial", "-out", cert, "-days", _DAYS, "-extfile", config,
    )  # fmt: skip
    return cert, key


def make_certificates(directory: Path) -> Certificates:
    """Write a CA, server and client certificates and a second CA into ``directory``.

    Raises:
        RuntimeError: openssl failed (the message has its stderr).
    """
    openssl = openssl_binary()
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(openssl, directory, "ca")
    other_ca, _ = _ca(openssl, directory, "other-ca")
    server = _leaf(
        openssl,
        directory,
        "server",
        ca,
        "subjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth\n",
    )
    client = _leaf(openssl, directory, "client", ca, "extendedKeyUsage = clientAuth\n")
    for path in directory.iterdir():
        path.chmod(0o600)
    return Certificates(ca[0], *server, *client, other_ca)


@pytest.fixture(scope="session")
def tls_certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """One set of certificates for the session."""
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_redis(tmp_path: Path, tls_certificates: Certificates) -> Iterator[RedisServer]:
    """A TLS-only server (client certificates optional) for one test."""
    certs = tls_certificates
    server = RedisServer(
        redis_binary(),
        tmp_path / "redis-tls",
        extra=[
            "--tls-cert-file",
            str(certs.server_cert),
            "--tls-key-file",
            str(certs.server_key),
            "--tls-ca-cert-file",
            str(certs.ca),
            "--tls-auth-clients",
            "optional",
        ],
        tls=True,
        admin={
            "ssl": True,
            "ssl_ca_certs": str(certs.ca),
            "ssl_certfile": str(certs.client_cert),
            "ssl_keyfile": str(certs.client_key),
        },
    )
    try:
        server.start()
    except (RuntimeError, redis.exceptions.ConnectionError) as exc:
        server.stop()
        log = server.log.decode(errors="replace")
        if any(sign in log for sign in _NO_TLS):
            pytest.skip(f"{server.binary} was built without TLS support: {log[-300:]}")
        raise RuntimeError(f"the TLS redis-server did not start: {exc}\n{log[-2000:]}") from exc
    try:
        yield server
    finally:
        server.stop()
