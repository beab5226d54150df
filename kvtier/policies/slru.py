"""Segmented LRU with a ghost history, registered as ``"slru"``.

A prefix-aware one-hit-wonder filter. A block stored for the first time is on
probation (segment P, 10 % of the capacity as S3-FIFO's small queue); a block
read again (a second request shared it) moves to the protected segment M.
When M holds more than its share (90 %), its least recent keys drop back to
P's most recent end (classic SLRU). Victims come from P's least recent end
while P holds more than its share, else from M's. Keys evicted from P are
remembered in a ghost list G (as many keys as the capacity); a key stored
again while G remembers it goes straight to M.

With chains touched tail first (as :func:`~kvtier.policies.simulation.simulate`
and an engine freeing blocks tail first do), a chain's tail is less recent
than its head in both segments, so tails are evicted first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from kvtier.errors import ConfigError
from kvtier.tiers.base import BlockKey

__all__ = ["SLRUPolicy"]


class SLRUPolicy:
    """Segmented LRU over one tier of ``capacity`` slots.

    Args:
        capacity: The tier's capacity in slots.
        probation_fraction: P's share of the capacity (0 < f < 1).

    Raises:
        ConfigError: A bad capacity or fraction.
    """

    def __init__(self, capacity: int, probation_fraction: float = 0.1) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"SLRU needs a capacity >= 1, got {capacity!r}")
        if not 0.0 < probation_fraction < 1.0:
            raise ConfigError(f"probation_fraction must be in (0, 1), got {probation_fraction!r}")
        self.capacity = capacity
        self.probation_target = max(1, int(capacity * probation_fraction))
        self.protected_target = max(1, capacity - self.probation_target)
        self.probation: OrderedDict[BlockKey, None] = OrderedDict()
        self.protected: OrderedDict[BlockKey, None] = OrderedDict()
        self.ghost: OrderedDict[BlockKey, None] = OrderedDict()

    def insert(self, key: BlockKey) -> None:
        """``key`` became resident: on probation, or protected if G remembers it."""
        if key in self.probation or key in self.protected:
            self.access(key)
        elif key in self.ghost:
            del self.ghost[key]
            self.protected[key] = None
        else:
            self.probation[key] = None

    def access(self, key: BlockKey) -> None:
        """``key`` was read: to M's most recent end (an unknown key is ignored)."""
        if key in self.probation:
            del self.probation[key]
            self.protected[key] = None
        elif key in self.protected:
            self.protected.move_to_end(key)

    def remove(self, key: BlockKey) -> None:
        """``key`` left the tier; from P it joins G (G holds at most ``capacity`` keys)."""
        if key in self.probation:
            del self.probation[key]
            self.ghost[key] = None
            while len(self.ghost) > self.capacity:
                self.ghost.popitem(last=False)
        else:
            self.protected.pop(key, None)

    def victims(self, count: int, evictable: Callable[[BlockKey], bool]) -> list[BlockKey]:
        """Up to ``count`` evictable keys: P's least recent while P is over its share, else M's.

        M's least recent keys beyond its share first drop back to P's most
        recent end. The victims stay tracked until :meth:`remove`.
        """
        out: list[BlockKey] = []
        if count <= 0:
            return out
        while len(self.protected) > self.protected_target:
            key, _ = self.protected.popitem(last=False)
            self.probation[key] = None
        from_p = (key for key in self.probation if evictable(key))
        from_m = (key for key in self.protected if evictable(key))
        head_p, head_m = next(from_p, None), next(from_m, None)
        left_in_p = len(self.probation)
        while len(out) < count and (head_p is not None or head_m is not None):
            if head_p is not None and (left_in_p > self.probation_target or head_m is None):
                out.append(head_p)
                left_in_p -= 1
                head_p = next(from_p, None)
            elif head_m is not None:
                out.append(head_m)
                head_m = next(from_m, None)
        return out

    def __len__(self) -> int:
        return len(self.probation) + len(self.protected)

    def __contains__(self, key: object) -> bool:
        return key in self.probation or key in self.protected

    def __repr__(self) -> str:
        return (
            f"SLRUPolicy(probation={len(self.probation)}, protected={len(self.protected)}, "
            f"ghost={len(self.ghost)})"
        )
