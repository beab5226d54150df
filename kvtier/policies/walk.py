"""The walk most policies' ``victims`` share: the first evictable keys of ordered queues."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from kvtier.tiers.base import BlockKey

__all__ = ["first_evictable"]


def first_evictable(
    queues: Iterable[Iterable[BlockKey]], count: int, evictable: Callable[[BlockKey], bool]
) -> list[BlockKey]:
    """Up to ``count`` keys that ``evictable`` accepts, walking ``queues`` in order.

    Costs O(count + keys walked past); fewer than ``count`` come back only
    when the queues hold fewer evictable keys.
    """
    out: list[BlockKey] = []
    if count <= 0:
        return out
    for queue in queues:
        for key in queue:
            if evictable(key):
                out.append(key)
                if len(out) == count:
                    return out
    return out
