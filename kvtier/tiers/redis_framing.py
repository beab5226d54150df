"""Stored values sent without copying the payload into them (standalone Redis).

A value is ``header | key | payload`` (:mod:`kvtier.tiers.redis_format`).
redis-py packs each command argument from one buffer, so framing a payload
would copy it into a new value first, and then redis-py's writer joins the
whole pipeline into one buffer: two copies, where a raw ``SET`` of ready-made
bytes makes one. :class:`FramedValue` carries header and payload apart, and
the connection classes made by :func:`install` pack it as one RESP bulk
string from the two pieces, so the payload is copied once, by the join.

Only a standalone client's connection pool is changed (its connection
class, which ``ConnectionPool`` documents as replaceable, gets a subclass
that overrides ``pack_command``); a Cluster client keeps redis-py's classes
and gets ready-made values (:mod:`kvtier.tiers.redis_values`).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from kvtier.tiers.redis_client import RedisClient

__all__ = ["FramedValue", "install"]


class FramedValue:
    """A value sent as ``header`` then ``payload`` in one bulk string.

    Args:
        header: What precedes the payload (header and key).
        payload: The block's bytes; must stay unchanged until the round trip
            that sends it has returned, and its exporter must keep the memory
            alive (:func:`~kvtier.tiers._checks.tensor_bytes`): the socket
            writer may hold a view of it after a cancelled round trip.
    """

    __slots__ = ("header", "payload")

    def __init__(self, header: bytes, payload: memoryview) -> None:
        self.header = header
        self.payload = payload

    def __len__(self) -> int:
        return len(self.header) + self.payload.nbytes

    def __bytes__(self) -> bytes:
        return self.header + bytes(self.payload)


class _FramingMixin:
    """``pack_command`` that packs :class:`FramedValue` arguments without joining them."""

    encoder: Any

    def pack_command(self, *args: Any) -> list[Any]:
        if not any(type(arg) is FramedValue for arg in args):
            return super().pack_command(*args)  # type: ignore[misc, no-any-return]
        # As redis-py does: "SET" may carry words ("CONFIG GET") to split.
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        output: list[Any] = []
        buff = b"*%d\r\n" % len(args)
        for arg in args:
            if type(arg) is FramedValue:
                output.append(buff + b"$%d\r\n" % len(arg))
                output.append(arg.header)
                output.append(arg.payload)
                buff = b"\r\n"
            else:
                data = self.encoder.encode(arg)
                size = data.nbytes if isinstance(data, memoryview) else len(data)
                buff = b"".join((buff, b"$%d\r\n" % size, data, b"\r\n"))
        output.append(buff)
        return output


_CLASSES: dict[type[Any], type[Any]] = {}


def _framing(cls: type[Any]) -> type[Any]:
    made = _CLASSES.get(cls)
    if made is None:
        made = _CLASSES[cls] = type(f"Framing{cls.__name__}", (_FramingMixin, cls), {})
    return made


def install(client: RedisClient) -> bool:
    """Make ``client`` pack :class:`FramedValue` arguments; whether it can.

    Call before the client opens its first connection. True for a standalone
    client (any connection class: TCP, TLS or a unix socket); False for a
    Cluster client, which is left unchanged.
    """
    if not isinstance(client, aioredis.Redis):
        return False
    pool = client.connection_pool
    if not issubclass(pool.connection_class, _FramingMixin):
        pool.connection_class = _framing(pool.connection_class)
    return True
