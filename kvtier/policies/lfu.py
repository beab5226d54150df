"""LFU with dynamic aging (LFU-DA, Arlitt et al.), registered as ``"lfu"``.

A key's priority is ``L + hits``, where ``hits`` counts its insertion and
reads and ``L`` is the priority of the last evicted key: the "age" of the
cache. Only an eviction (a key :meth:`LFUPolicy.victims` chose, then
removed) ages the cache: a key removed otherwise (found corrupt, discarded)
does not, or one hot block dropped as corrupt would outrank every resident
key's frequency at once. Keys that were popular long ago lose to keys read recently as ``L``
climbs, which plain LFU never lets happen. The lowest priority is evicted
first; among equal priorities the key that reached it first (with tail-first
insertion, a chain's tail before its head).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

from kvtier.tiers.base import BlockKey

__all__ = ["LFUPolicy"]


class LFUPolicy:
    """LFU-DA over one tier: a heap with lazy deletion, O(log n) per operation.

    :meth:`victims` is O((count + p) log n), ``p`` the pinned keys it passes
    over at the low end (few: the blocks being loaded).

    Args:
        capacity: The tier's capacity in slots; unused (the heap is
            compacted when stale entries outnumber live ones).
    """

    def __init__(self, capacity: int | None = None) -> None:
        del capacity
        self.age = 0
        self._hits: dict[BlockKey, int] = {}
        self._priority: dict[BlockKey, tuple[int, int]] = {}
        self._heap: list[tuple[int, int, BlockKey]] = []
        self._order = itertools.count()
        self._chosen: set[BlockKey] = set()  # the last victims(): their removal ages the cache

    def _push(self, key: BlockKey) -> None:
        entry = (self.age + self._hits[key], next(self._order))
        self._priority[key] = entry
        heapq.heappush(self._heap, (*entry, key))
        if len(self._heap) > 2 * len(self._priority) + 64:
            self._heap = [(*p, k) for k, p in self._priority.items()]
            heapq.heapify(self._heap)

    def insert(self, key: BlockKey) -> None:
        """``key`` became resident (one hit)."""
        self._hits[key] = self._hits.get(key, 0) + 1
        self._push(key)

    def access(self, key: BlockKey) -> None:
        """``key`` was read: one more hit (an unknown key is ignored)."""
        if key in self._hits:
            self._hits[key] += 1
            self._push(key)

    def remove(self, key: BlockKey) -> None:
        """``key`` left the tier; if evicted (a victim chosen), the age rises to its priority."""
        entry = self._priority.pop(key, None)
        if entry is not None:
            del self._hits[key]
            if key in self._chosen:
                self._chosen.discard(key)
                self.age = max(self.age, entry[0])

    def victims(self, count: int, evictable: Callable[[BlockKey], bool]) -> list[BlockKey]:
        """Up to ``count`` evictable keys, lowest priority first."""
        out: list[BlockKey] = []
        if count <= 0:
            return out
        held: list[tuple[int, int, BlockKey]] = []
        while len(out) < count and self._heap:
            entry = heapq.heappop(self._heap)
            priority, order, key = entry
            if self._priority.get(key) != (priority, order):
                continue  # stale
            held.append(entry)
            if evictable(key):
                out.append(key)
        for entry in held:  # victims stay tracked until remove()
            heapq.heappush(self._heap, entry)
        self._chosen = set(out)
        return out

    def priority(self, key: BlockKey) -> int | None:
        """The key's current priority (None if not tracked)."""
        entry = self._priority.get(key)
        return None if entry is None else entry[0]

    def __len__(self) -> int:
        return len(self._priority)

    def __contains__(self, key: object) -> bool:
        return key in self._priority

    def __repr__(self) -> str:
        return f"LFUPolicy(age={self.age}, {len(self._priority)} keys)"
