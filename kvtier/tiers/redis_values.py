"""The values a :class:`~kvtier.tiers.redis.RedisTier` stores and reads back.

:func:`take_value` turns one reply to a read into a verified payload or a
miss. The rest of this module is about stores:

A value is ``header | key | payload`` (:mod:`kvtier.tiers.redis_format`), so
storing a block copies its payload once into a value. Fresh memory for every
value is expensive for large blocks: the kernel faults in and zeroes each page
(measured on a 2-core VM: about 1 ms per 2 MiB value, against 0.25 ms to copy
into a buffer already mapped). :class:`ValueBuffers` keeps the buffers of
finished stores for the next ones, up to a byte budget; a store that needs
more than the budget holds gets fresh buffers for the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.exceptions

from kvtier.errors import ConfigError, TierIOError
from kvtier.tiers.base import BlockKey
from kvtier.tiers.redis_format import encode_header, verify_value
from kvtier.tiers.redis_framing import FramedValue

__all__ = ["ValueBuffers", "take_value"]

Value = bytes | memoryview | FramedValue


class ValueBuffers:
    """A free list of value buffers, by size, holding at most ``max_bytes``.

    Only whole, successful stores give their buffers back: after a failed or
    cancelled round trip the client may still refer to them, so they are
    dropped.

    Args:
        max_bytes: Most bytes of buffers kept (0: keep none).

    Raises:
        ConfigError: ``max_bytes`` is not an integer >= 0.
    """

    def __init__(self, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ConfigError(f"value pool bytes must be an integer >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._free: dict[int, list[bytearray]] = {}
        self._kept = 0

    @property
    def kept_bytes(self) -> int:
        """Bytes of buffers waiting for reuse."""
        return self._kept

    def encode(self, key: BlockKey, fingerprint: bytes, payload: memoryview) -> bytearray:
        """``key``'s value for ``payload``, in a reused buffer when one of its size is free."""
        header = encode_header(key, fingerprint, payload)
        size = len(header) + len(payload)
        free = self._free.get(size)
        if free:
            value = free.pop()
            self._kept -= size
        else:
            value = bytearray(size)
        with memoryview(value) as view:  # 2x faster than bytearray slice assignment
            view[: len(header)] = header
            view[len(header) :] = payload
        return value

    def frame(
        self,
        blocks: Sequence[tuple[BlockKey, memoryview]],
        fingerprint: bytes,
        *,
        packed: bool,
    ) -> tuple[list[Value], list[bytearray]]:
        """The values to send for ``(key, payload)`` blocks, and the buffers they took.

        ``packed``: the client packs header and payload apart
        (:mod:`~kvtier.tiers.redis_framing`), so no value is copied.
        """
        values: list[Value] = []
        pooled: list[bytearray] = []
        for key, payload in blocks:
            if packed:
                values.append(FramedValue(encode_header(key, fingerprint, payload), payload))
            else:
                pooled.append(self.encode(key, fingerprint, payload))
                values.append(memoryview(pooled[-1]))
        return values, pooled

    def give_back(self, values: list[bytearray]) -> None:
        """Keep ``values`` for reuse, as far as the budget allows."""
        for value in values:
            size = len(value)
            if self._kept + size > self.max_bytes:
                return
            self._free.setdefault(size, []).append(value)
            self._kept += size


def take_value(
    value: object, key: BlockKey, fingerprint: bytes, block_bytes: int, tier: str
) -> memoryview | None:
    """The verified payload of one reply to a read, or None for a miss.

    A miss: no value, a value that fails verification, or one of another
    type (``WRONGTYPE``: another client's data under the name).

    Raises:
        TierIOError: The reply is another error (a node down, CLUSTERDOWN…),
            which says nothing of the block.
    """
    if isinstance(value, Exception):
        if isinstance(value, redis.exceptions.ResponseError) and str(value).startswith("WRONGTYPE"):
            return None
        raise TierIOError(f"tier {tier}: read failed: {value}", tier=tier) from value
    if isinstance(value, bytes):
        return verify_value(value, key, fingerprint, block_bytes)
    return None
