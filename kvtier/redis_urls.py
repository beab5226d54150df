"""What a redis tier's URL may say, and how it is shown without its secrets.

kvtier refuses what redis-py would take silently: a query that overrides
the options kvtier sets, a path that is not a database number (redis-py
uses database 0 for ``/name``), a password that ends the host early, a
Cluster URL naming a database other than 0. :func:`redact_url` is the only
way a URL reaches a message or a log.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import parse_qsl, urlsplit

__all__ = ["URL_QUERY_KEYS", "URL_SCHEMES", "redact_url", "url_problem"]

_QUERY: Final = re.compile(r"[?#].*", flags=re.DOTALL)
_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:(//)?")
_SHOWN_NAMES: Final = frozenset(
    {
        "cache_factory", "client_name", "command_packer", "connection_class",
        "connection_kwargs", "credential_provider", "decode_responses", "driver_info",
        "encoder_class", "encoding", "encoding_errors", "event_dispatcher",
        "health_check_interval", "host", "legacy_responses", "lib_name", "lib_version",
        "max_connections", "parser_class", "path", "port", "protocol",
        "redis_connect_func", "retry", "retry_on_error", "retry_on_timeout",
        "socket_connect_timeout", "socket_keepalive", "socket_keepalive_options",
        "socket_read_size", "socket_timeout", "socket_type", "ssl_ca_certs", "ssl_ca_data",
        "ssl_ca_path", "ssl_cert_reqs", "ssl_certfile", "ssl_check_hostname", "ssl_ciphers",
        "ssl_exclude_verify_flags", "ssl_include_verify_flags", "ssl_keyfile",
        "ssl_min_version", "ssl_ocsp_context", "ssl_ocsp_expected_cert", "ssl_password",
        "ssl_validate_ocsp", "ssl_validate_ocsp_stapled", "timeout",
    }
)  # fmt: skip
"""Query names shown in errors: redis-py's connection and pool options (redis-py 7-8).

Any other name may be a password pasted into the query as a bare word (a
passphrase in snake_case too): it is shown as "a parameter"."""
_DB: Final = re.compile(r"[0-9]{1,9}")
"""A database number (at most 9 digits: Redis's are small, and ``int`` is safe on them)."""

URL_SCHEMES: Final = ("redis://", "rediss://", "unix://")
"""What a redis tier's URL must start with, literally."""

URL_QUERY_KEYS: Final = frozenset({"db", "username", "password"})
"""The query parameters a redis tier's URL may have.

redis-py lets a URL's query win over the options kvtier sets (pool size,
timeouts, retries, TLS verification, reply decoding), so every other
parameter is refused.
"""


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs, reprs and errors).

    Works on malformed URLs too (it does not parse them): everything between
    the first ``:`` of the user part and the last ``@`` goes, and so does the
    whole query string and fragment (redis-py reads a ``password`` parameter
    there, also under a percent-encoded name). Without ``//`` after the
    scheme, or with ``/``, ``?`` or ``#`` in the user part, everything
    between the scheme and the last ``@`` goes; with an ``@`` in the query or
    fragment, everything after the scheme. When in doubt it hides too much,
    never too little.
    """
    scheme = _SCHEME.match(url)
    start = scheme.end() if scheme else 0
    head, rest = url[:start], url[start:]
    at = rest.rfind("@")
    query = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    if at >= query:
        # An '@' in the query or fragment: the text after it may be the rest
        # of a password (?password=p@ss) or the host after a password that
        # ended the user part early (u:12?pw@host): everything goes.
        return f"{head}***"
    if at >= 0:
        user, colon, _ = rest[:at].partition(":")
        if scheme is None or scheme[1] is None or any(c in user for c in "/?#"):
            rest = f"***{rest[at:]}"
        elif colon:
            rest = f"{user}:***{rest[at:]}"
    return head + _QUERY.sub(lambda found: found[0][0] + "***", rest)


def url_problem(
    url: str, *, username: bool = False, password: bool = False, cluster: bool = False
) -> str | None:
    """Why a redis tier refuses ``url``, or None; the reason never quotes the URL.

    Args:
        url: The URL.
        username: A user name is also given apart from the URL.
        password: A password is also given apart from the URL.
        cluster: The URL is a Redis Cluster's (which has database 0 only).
    """
    if not url[:10].lower().startswith(URL_SCHEMES):  # a scheme's case does not matter
        return "is not a redis://, rediss:// or unix:// URL"
    encode = "a password with '/', '?', '#' or '@' must be percent-encoded"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parses the host and port
    except ValueError:
        # Not the parser's text: a password holding '/', '?' or '#' ends up in
        # what it takes for the port, and its message would quote it.
        return f"is not a valid URL ({encode})"
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    names = [name for name, _ in pairs]
    socket_path = parts.scheme == "unix" and ("@" in parts.netloc or not parts.netloc)
    if (
        "@" in parts.fragment
        or any("@" in f"{n}={v}" for n, v in pairs if n not in ("password", "username"))
        or ("@" in parts.path and not socket_path)
    ):
        # A password's '/', '?' or '#' ended the user part early: redis-py
        # would connect to the user name as a host (or take the rest of the
        # password for a socket path) and say so in its errors. ('@' is fine
        # in a password or user parameter, ?password=p@ss, and in a socket's
        # path.)
        return f"has an '@' after its host ({encode})"
    for name in names:
        if name not in URL_QUERY_KEYS:
            shown = repr(name) if name in _SHOWN_NAMES else "a parameter"
            return (
                f"sets {shown} in its query: only {', '.join(sorted(URL_QUERY_KEYS))} may be "
                "given there (kvtier sets the other connection options itself)"
            )
    for given, name, in_url in (
        (username, "username", parts.username),
        (password, "password", parts.password),
    ):
        if given and (in_url or name in names):
            return f"names a {name}, which is given apart from it too (give it once)"
    return _db_problem(
        parts.scheme, parts.path, [value for n, value in pairs if n == "db"], cluster=cluster
    )


def _db_problem(scheme: str, path: str, query: list[str], *, cluster: bool) -> str | None:
    """Why a URL's database number (its path, its ``db`` parameters) is refused, or None.

    redis-py would take a path that is not a number, and a blank ``db``
    parameter, for no database at all (so database 0, silently), and let a
    ``db`` parameter win over the path. A unix:// URL's path is the socket's.
    """
    numbers: set[int] = set()
    for value in query:
        if not _DB.fullmatch(value):
            return "sets db in its query to something that is not a database number (like db=0)"
        numbers.add(int(value))
    if len(numbers) > 1:
        return "sets db in its query more than once, to different numbers (give it once)"
    if scheme == "unix" or path in ("", "/"):
        return _cluster_db_problem(cluster, numbers)
    if not (path.startswith("/") and _DB.fullmatch(path[1:])):
        return (
            "has a path that is not a database number like /0 (up to 9 digits after the "
            "host and port); redis-py would silently use database 0 for a path like /name"
        )
    # A path of /0 is the usual default, which a db parameter may override;
    # any other number that the query contradicts is a mistake in one of them.
    if numbers and int(path[1:]) not in (0, *numbers):
        return "names one database in its path and another in its query (give it once)"
    return _cluster_db_problem(cluster, numbers or {int(path[1:])})


def _cluster_db_problem(cluster: bool, numbers: set[int]) -> str | None:
    """Why a cluster URL's database numbers are refused (a Redis Cluster has only 0), or None."""
    if cluster and numbers - {0}:
        return f"selects database {max(numbers)}, but a Redis Cluster has database 0 only"
    return None
