"""Least-recently-used eviction, registered as ``"lru"``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

from kvtier.policies.walk import first_evictable
from kvtier.tiers.base import BlockKey

__all__ = ["LRUPolicy"]


class LRUPolicy:
    """Evicts the block stored or read longest ago.

    :meth:`insert`, :meth:`access` and :meth:`remove` are O(1) (an
    :class:`~collections.OrderedDict`, least recent first). :meth:`victims`
    walks from the least recent end, skipping keys that are not evictable, so
    choosing ``n`` victims costs O(n + p), where p is the number of pinned keys
    it walks past; pinned keys are the blocks of transfers in flight, few
    compared with a tier.

    Args:
        capacity: The tier's capacity in slots; LRU does not need it.
    """

    __slots__ = ("_order",)

    def __init__(self, capacity: int | None = None) -> None:
        del capacity
        self._order: OrderedDict[BlockKey, None] = OrderedDict()

    def insert(self, key: BlockKey) -> None:
        """``key`` became resident: it is now the most recent (re-inserting refreshes it)."""
        self._order[key] = None
        self._order.move_to_end(key)

    def access(self, key: BlockKey) -> None:
        """``key`` was read: it becomes the most recent (an unknown key is ignored)."""
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: BlockKey) -> None:
        """Forget ``key`` (an unknown key is ignored)."""
        self._order.pop(key, None)

    def victims(self, count: int, evictable: Callable[[BlockKey], bool]) -> list[BlockKey]:
        """The ``count`` least recent keys that ``evictable`` accepts, least recent first.

        Args:
            count: How many victims are wanted.
            evictable: Whether a key may be evicted now.

        Returns:
            Up to ``count`` keys; fewer only when fewer are evictable.
        """
        return first_evictable((self._order,), count, evictable)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __iter__(self) -> Iterator[BlockKey]:
        """Tracked keys, least recent (evicted first) to most recent."""
        return iter(self._order)

    def __repr__(self) -> str:
        return f"LRUPolicy({len(self._order)} keys)"
