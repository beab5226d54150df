"""LRU that learns which new blocks are cold, registered as ``"class_lru"``.

Most blocks a tier stores are never read again (on the Mooncake trace 58 %
of distinct blocks serve one request), and under LRU each of them pushes out
an older block that might have been. This policy keeps LRU's order for the
blocks it expects to be read again, and gives the others a *cold* queue that
is evicted first, so a cold block leaves before it displaces anything.

A block stored for the first time (neither resident nor remembered in the
ghost of recent cold evictions) is predicted cold when either rule holds,
each learned online and acted on only when the data say so beyond chance (a
two-proportion test at two standard errors, :func:`~kvtier.policies.reuse.less_reused`;
counts halved every ``capacity`` first-seen blocks):

* **Unique tails.** It is its chain's tail (``hint.is_tail``), and
  first-seen tails are read again less often than first-seen interior blocks
  (measured over the resident blocks and a ghost of ``capacity`` keys), as
  :mod:`~kvtier.policies.prefix_slru` does: a prompt's last block is where it
  stops matching the next prompt that shares its beginning.
* **Cold request classes.** Its request's tag (``hint.tag``: an application,
  a tenant, a ``max_tokens`` bucket, whatever the engine knows on arrival)
  brings prompts that come back less often than other tags' do: the policy
  remembers the first blocks (depth 0) of the last ``capacity`` prompts it
  stored with their tag, and counts a prompt as reused when a later request
  reads or stores that first block again.

The cold queue is FIFO and evicted before the LRU list; a chain is touched
tail first, so a cold chain leaves tail first and never loses its head while
its tail stays. A cold block that is read again joins the LRU list as any
read block does, and a cold block stored again while the ghost remembers it
enters the LRU list. Without hints (or with neither rule firing) it is LRU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

from kvtier.errors import ConfigError
from kvtier.policies.hints import BlockHint, Tag
from kvtier.policies.reuse import ReuseRates
from kvtier.policies.walk import first_evictable
from kvtier.tiers.base import BlockKey

__all__ = ["ClassLRUPolicy"]


class ClassLRUPolicy:
    """LRU with a learned cold queue for new blocks (see the module doc).

    Every operation is O(1) but :meth:`victims`, which walks the cold queue
    then the LRU list from their eviction ends: O(count + pinned keys walked
    past).

    Args:
        capacity: The tier's capacity in slots: the ghost's length, the
            number of prompts remembered, and the window of the statistics.

    Raises:
        ConfigError: ``capacity`` is not a positive integer.
    """

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"class_lru needs a capacity >= 1, got {capacity!r}")
        self.capacity = capacity
        self.order: OrderedDict[BlockKey, None] = OrderedDict()  # LRU, least recent first
        self.cold: OrderedDict[BlockKey, None] = OrderedDict()  # evicted first, oldest first
        self.ghost: OrderedDict[BlockKey, None] = OrderedDict()  # first-seen keys evicted unread
        self.is_tail: dict[BlockKey, bool] = {}  # first-seen, not read again (resident, ghost)
        self.tails: ReuseRates[bool] = ReuseRates(capacity)
        self.classes: ReuseRates[Tag] = ReuseRates(capacity)
        self.roots: OrderedDict[BlockKey, tuple[Tag, bool]] = OrderedDict()  # -> (tag, reused)

    # -- the rules -----------------------------------------------------------------

    @property
    def tails_first(self) -> bool:
        """Whether first-seen tails are now predicted cold (reused less than interior blocks)."""
        return self.tails.below(True, False)

    def class_is_cold(self, tag: Tag) -> bool:
        """Whether prompts tagged ``tag`` now come back less often than other tags' prompts."""
        return self.classes.below_rest(tag)

    def _root(self, key: BlockKey, tag: Tag | None) -> None:
        """A chain's first block was stored or read for a request tagged ``tag``."""
        seen = self.roots.get(key)
        if seen is not None:
            if not seen[1]:
                self.roots[key] = (seen[0], True)
                self.classes.reuse(seen[0])
            return
        if tag is None:
            return
        self.roots[key] = (tag, False)
        if len(self.roots) > self.capacity:
            self.roots.popitem(last=False)
        self.classes.first_seen(tag)

    def _read_again(self, key: BlockKey) -> None:
        tail = self.is_tail.pop(key, None)
        if tail is not None:
            self.tails.reuse(tail)

    # -- the protocol --------------------------------------------------------------

    def insert(self, key: BlockKey) -> None:
        """``key`` became resident, with no hint: as :meth:`insert_hinted` without one."""
        self.insert_hinted(key, None)

    def insert_hinted(self, key: BlockKey, hint: BlockHint | None) -> None:
        """``key`` became resident at ``hint``'s place in its chain (None: unknown)."""
        if hint is not None and hint.depth == 0:
            self._root(key, hint.tag)
        if key in self.order or key in self.cold or key in self.ghost:
            self.cold.pop(key, None)
            self.ghost.pop(key, None)
            self._read_again(key)
            self.order[key] = None
            self.order.move_to_end(key)
            return
        if hint is None:
            self.order[key] = None
            return
        tail = hint.is_tail
        self.is_tail[key] = tail
        self.tails.first_seen(tail)
        if (tail and self.tails_first) or (hint.tag is not None and self.class_is_cold(hint.tag)):
            self.cold[key] = None
        else:
            self.order[key] = None

    def access(self, key: BlockKey) -> None:
        """``key`` was read: it becomes the most recent (an unknown key is ignored)."""
        if key in self.cold:
            del self.cold[key]
        elif key not in self.order:
            return
        self._read_again(key)
        self.order[key] = None
        self.order.move_to_end(key)

    def access_hinted(self, key: BlockKey, hint: BlockHint | None) -> None:
        """``key`` was read for a request at ``hint``'s place in its chain."""
        if hint is not None and hint.depth == 0 and (key in self.order or key in self.cold):
            self._root(key, hint.tag)
        self.access(key)

    def remove(self, key: BlockKey) -> None:
        """``key`` left the tier; a first-seen key never read joins the ghost."""
        if key in self.order:
            del self.order[key]
        elif key in self.cold:
            del self.cold[key]
        else:
            return
        if key in self.is_tail:
            self.ghost[key] = None
            if len(self.ghost) > self.capacity:
                old, _ = self.ghost.popitem(last=False)
                self.is_tail.pop(old, None)

    def victims(self, count: int, evictable: Callable[[BlockKey], bool]) -> list[BlockKey]:
        """Up to ``count`` evictable keys: the cold queue oldest first, then the LRU list."""
        return first_evictable((self.cold, self.order), count, evictable)

    def __len__(self) -> int:
        return len(self.order) + len(self.cold)

    def __contains__(self, key: object) -> bool:
        return key in self.order or key in self.cold

    def __iter__(self) -> Iterator[BlockKey]:
        """Tracked keys in eviction order: the cold queue, then least to most recent."""
        yield from self.cold
        yield from self.order

    def __repr__(self) -> str:
        return (
            f"ClassLRUPolicy(lru={len(self.order)}, cold={len(self.cold)}, "
            f"ghost={len(self.ghost)}, tails_first={self.tails_first})"
        )
