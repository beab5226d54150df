"""S3-FIFO (Yang et al., SOSP 2023), registered as ``"s3fifo"``.

Three FIFO queues: a small probation queue S (10 % of the capacity by
default), a main queue M, and a ghost queue G of keys evicted from S. New keys
enter S (or M if G remembers them). Choosing a victim walks S while it holds
at least its share, else M: a key read since it entered (a frequency counter
up to 3) moves on (S to M; M back to M's tail with one read less), an unread
one is the victim. One-hit wonders leave through S quickly; keys read again
stay in M. Two changes from the paper: G holds up to ``capacity`` keys (the
paper bounds it by M's size), and S's share is checked again after each
move to M (the paper walks S until a key leaves it). Choosing victims
passes over pinned keys by moving them to their queue's tail: a tier whose
queues start with many pinned keys pays for each of them per eviction
(about ten times LRU's cost per pinned key).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from kvtier.errors import ConfigError
from kvtier.tiers.base import BlockKey

__all__ = ["S3FIFOPolicy"]

_MAX_FREQ = 3


class S3FIFOPolicy:
    """S3-FIFO over one tier of ``capacity`` slots.

    Args:
        capacity: The tier's capacity in slots.
        small_fraction: S's share of the capacity (0 < f < 1).

    Raises:
        ConfigError: A bad capacity or fraction.
    """

    def __init__(self, capacity: int, small_fraction: float = 0.1) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"S3-FIFO needs a capacity >= 1, got {capacity!r}")
        if not 0.0 < small_fraction < 1.0:
            raise ConfigError(f"small_fraction must be in (0, 1), got {small_fraction!r}")
        self.capacity = capacity
        self.small_target = max(1, int(capacity * small_fraction))
        self.small: OrderedDict[BlockKey, None] = OrderedDict()
        self.main: OrderedDict[BlockKey, None] = OrderedDict()
        self.ghost: OrderedDict[BlockKey, None] = OrderedDict()
        self.freq: dict[BlockKey, int] = {}

    def insert(self, key: BlockKey) -> None:
        """``key`` became resident: into S, or M if G remembers it."""
        if key in self.freq:
            self.access(key)
            return
        self.freq[key] = 0
        if key in self.ghost:
            del self.ghost[key]
            self.main[key] = None
        else:
            self.small[key] = None

    def access(self, key: BlockKey) -> None:
        """``key`` was read (an unknown key is ignored)."""
        if key in self.freq:
            self.freq[key] = min(_MAX_FREQ, self.freq[key] + 1)

    def remove(self, key: BlockKey) -> None:
        """``key`` left the tier; from S it joins G (G holds at most ``capacity`` keys)."""
        if self.freq.pop(key, None) is None:
            return
        if key in self.small:
            del self.small[key]
            self.ghost[key] = None
            while len(self.ghost) > self.capacity:
                self.ghost.popitem(last=False)
        else:
            self.main.pop(key, None)

    def victims(self, count: int, evictable: Callable[[BlockKey], bool]) -> list[BlockKey]:
        """Up to ``count`` evictable keys, in S3-FIFO's order.

        Choosing moves read keys along (S to M, M to M's tail) as S3-FIFO's
        eviction does; the victims themselves stay tracked, at the head of
        their queue, until :meth:`remove`. Pinned keys are passed over.
        """
        out: list[BlockKey] = []
        chosen: set[BlockKey] = set()
        # Each key is visited at most once in S and _MAX_FREQ + 1 times in M
        # (pinned and chosen keys leave the walk), so this visits everything.
        budget = (len(self.small) + len(self.main)) * (_MAX_FREQ + 2) + 1
        skipped_small: list[BlockKey] = []
        skipped_main: list[BlockKey] = []
        while len(out) < count and budget > 0 and (self.small or self.main):
            budget -= 1
            use_small = self.small and (len(self.small) >= self.small_target or not self.main)
            queue = self.small if use_small else self.main
            key, _ = queue.popitem(last=False)
            if self.freq[key] > 0 and use_small:  # read while on probation: promoted
                self.main[key] = None
            elif self.freq[key] > 0:
                self.freq[key] -= 1
                self.main[key] = None
            elif evictable(key) and key not in chosen:
                out.append(key)
                chosen.add(key)
                (skipped_small if use_small else skipped_main).append(key)
            else:  # pinned: passed over, it keeps its place
                (skipped_small if use_small else skipped_main).append(key)
        for queue, keys in ((self.small, skipped_small), (self.main, skipped_main)):
            for key in reversed(keys):  # back to the head, in their order
                queue[key] = None
                queue.move_to_end(key, last=False)
        return out

    def __len__(self) -> int:
        return len(self.freq)

    def __contains__(self, key: object) -> bool:
        return key in self.freq

    def __repr__(self) -> str:
        return (
            f"S3FIFOPolicy(small={len(self.small)}, main={len(self.main)}, ghost={len(self.ghost)})"
        )
