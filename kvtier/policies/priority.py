"""Priority LRU (TensorRT-LLM's KV cache retention config), registered as ``"priority_lru"``.

Every tracked key has a priority from 0 to 100; the lowest priority is evicted
first and, within one priority, the least recent key. A key without a priority
has :data:`DEFAULT_PRIORITY` (35, TensorRT-LLM's default), so a policy whose
caller never sets one is plain LRU. A priority may carry a duration after
which it reverts to the default, measured on an injectable clock; a key
whose priority changes without being used (a new priority, or one that
expired) joins its new priority's least recent end.

An engine maps its retention config to keys per request: a token range
``[start, end)`` covers the blocks ``start // block_size`` up to
``ceil(end / block_size) - 1`` of the request's chain, and the engine calls
:meth:`PriorityLRUPolicy.set_priority` with each of those blocks' keys
(a block partly covered takes the highest priority of the ranges that touch
it). A priority may be set before the key is stored; it applies when the key
is inserted and is forgotten when the key leaves. Priorities of keys not
stored yet are kept for the ``max_pending`` most recently set (a key that
is never stored, say one below ``offload_min_priority``, must not be kept
for ever); older ones are forgotten (their keys get the default).

Blocks below ``offload_min_priority`` should not be copied to a lower tier:
:meth:`PriorityLRUPolicy.should_offload` answers that for a caller that
decides what to offload (kvtier's offload manager stores every computed
block it is given; it does not ask).
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Callable

from kvtier.errors import ConfigError
from kvtier.policies.walk import first_evictable
from kvtier.tiers.base import BlockKey

__all__ = [
    "DEFAULT_MAX_PENDING",
    "DEFAULT_PRIORITY",
    "MAX_PRIORITY",
    "MIN_PRIORITY",
    "PriorityLRUPolicy",
]

MIN_PRIORITY = 0
"""The lowest priority: evicted first."""
MAX_PRIORITY = 100
"""The highest priority: evicted last."""
DEFAULT_PRIORITY = 35
"""The priority of a key that has none (TensorRT-LLM's default)."""
DEFAULT_MAX_PENDING = 1 << 16
"""Priorities kept for keys not stored (yet), by default."""


def _check_priority(priority: int, what: str) -> None:
    if (
        isinstance(priority, bool)
        or not isinstance(priority, int)
        or not MIN_PRIORITY <= priority <= MAX_PRIORITY
    ):
        raise ConfigError(f"{what} must be an integer in [0, 100], got {priority!r}")


class PriorityLRUPolicy:
    """Lowest priority first, least recent first within a priority.

    Args:
        capacity: The tier's capacity in slots; unused.
        offload_min_priority: Keys below this priority are not offloaded
            (see :meth:`should_offload`); 0 offloads every key.
        clock: Seconds on a monotonic clock, for priority durations
            (:func:`time.monotonic` by default; tests pass a fake).
        max_pending: Most priorities kept for keys not stored (yet); the
            oldest set beyond it are forgotten.

    Raises:
        ConfigError: ``offload_min_priority`` is not in [0, 100], or
            ``max_pending`` is not a positive integer.
    """

    def __init__(
        self,
        capacity: int | None = None,
        *,
        offload_min_priority: int = MIN_PRIORITY,
        clock: Callable[[], float] = time.monotonic,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        del capacity
        _check_priority(offload_min_priority, "offload_min_priority")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ConfigError(f"max_pending must be a positive integer, got {max_pending!r}")
        self.offload_min_priority = offload_min_priority
        self._clock = clock
        self._max_pending = max_pending
        self._buckets: dict[int, OrderedDict[BlockKey, None]] = {}
        self._level: dict[BlockKey, int] = {}  # tracked key -> the bucket it is in
        self._set: dict[BlockKey, tuple[int, float | None]] = {}  # key -> (priority, expiry)
        self._pending: OrderedDict[BlockKey, None] = OrderedDict()  # set, not tracked: oldest first
        self._expiries: list[tuple[float, BlockKey]] = []  # heap; stale entries skipped

    def set_priority(self, key: BlockKey, priority: int, duration_s: float | None = None) -> None:
        """Give ``key`` ``priority``, for ``duration_s`` seconds or until it leaves.

        The key need not be tracked yet: the priority applies when it is
        inserted. A tracked key whose priority changes joins its new
        priority's least recent end (a new priority is not a use); setting the
        priority it has already leaves it where it is (an engine that applies
        a retention config to every request does not push its hot blocks
        toward eviction).

        Args:
            key: The block's key.
            priority: 0 (evicted first) to 100 (evicted last).
            duration_s: Seconds after which the priority reverts to
                :data:`DEFAULT_PRIORITY`; None keeps it until the key leaves.

        Raises:
            ConfigError: A priority outside [0, 100] or a duration that is not positive.
        """
        _check_priority(priority, "priority")
        if duration_s is not None and not duration_s > 0:
            raise ConfigError(f"duration_s must be positive or None, got {duration_s!r}")
        expiry = None if duration_s is None else self._clock() + duration_s
        self._set[key] = (priority, expiry)
        if expiry is not None:
            expiries = self._expiries
            heapq.heappush(expiries, (expiry, key))
            if len(expiries) > 2 * len(self._set) + 64:  # mostly stale: rebuild from the live
                live = [(e, k) for k, (_, e) in self._set.items() if e is not None]
                heapq.heapify(live)
                self._expiries = live
        level = self._level.get(key)
        if level is not None:
            if level != priority:
                self._move(key, priority, keep_recency=True)
            return
        pending = self._pending
        pending[key] = None
        pending.move_to_end(key)
        if len(pending) > self._max_pending:
            oldest, _ = pending.popitem(last=False)
            del self._set[oldest]

    def priority(self, key: BlockKey) -> int:
        """``key``'s priority now (:data:`DEFAULT_PRIORITY` if none is set or it expired)."""
        entry = self._set.get(key)
        if entry is None:
            return DEFAULT_PRIORITY
        priority, expiry = entry
        if expiry is not None and self._clock() >= expiry:
            self._forget(key)
            return DEFAULT_PRIORITY
        return priority

    def _forget(self, key: BlockKey) -> None:
        """Drop ``key``'s (expired) priority: back to the default, at its LRU end."""
        del self._set[key]
        self._pending.pop(key, None)
        if key in self._level and self._level[key] != DEFAULT_PRIORITY:
            self._move(key, DEFAULT_PRIORITY, keep_recency=True)

    def should_offload(self, key: BlockKey) -> bool:
        """Whether ``key`` may be copied to a lower tier (priority >= ``offload_min_priority``)."""
        return self.priority(key) >= self.offload_min_priority

    def _move(self, key: BlockKey, priority: int, *, keep_recency: bool = False) -> None:
        old = self._level.get(key)
        if old is not None:
            del self._buckets[old][key]
            if not self._buckets[old]:
                del self._buckets[old]
        bucket = self._buckets.setdefault(priority, OrderedDict())
        bucket[key] = None
        if keep_recency:  # a re-prioritised key is not a use: it goes to the LRU end
            bucket.move_to_end(key, last=False)
        self._level[key] = priority

    def _expire(self) -> None:
        """Forget the priorities whose time is up (the heap's entries that still apply)."""
        now = self._clock()
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            expiry, key = heapq.heappop(expiries)
            entry = self._set.get(key)
            if entry is not None and entry[1] == expiry:  # else reset or forgotten since
                self._forget(key)

    def insert(self, key: BlockKey) -> None:
        """``key`` became resident: the most recent of its priority."""
        self._pending.pop(key, None)
        self._move(key, self.priority(key))

    def access(self, key: BlockKey) -> None:
        """``key`` was read: the most recent of its priority (an unknown key is ignored)."""
        if key in self._level:
            self._move(key, self.priority(key))

    def remove(self, key: BlockKey) -> None:
        """Forget ``key`` and its priority (an unknown key is ignored, its priority kept)."""
        level = self._level.pop(key, None)
        if level is None:  # not tracked: a priority set for it still waits for its insert
            return
        self._set.pop(key, None)
        del self._buckets[level][key]
        if not self._buckets[level]:
            del self._buckets[level]

    def victims(self, count: int, evictable: Callable[[BlockKey], bool]) -> list[BlockKey]:
        """Up to ``count`` evictable keys: lowest priority first, least recent first within one."""
        if count <= 0:
            return []
        self._expire()
        buckets = self._buckets
        return first_evictable((buckets[level] for level in sorted(buckets)), count, evictable)

    def __len__(self) -> int:
        return len(self._level)

    def __contains__(self, key: object) -> bool:
        return key in self._level

    def __repr__(self) -> str:
        return f"PriorityLRUPolicy({len(self._level)} keys, {len(self._buckets)} priorities)"
