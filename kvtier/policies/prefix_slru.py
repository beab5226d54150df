"""SLRU that learns whether chain tails are one-hit wonders, registered as ``"prefix_slru"``.

:class:`~kvtier.policies.slru.SLRUPolicy` (probation P, protected M, ghost G)
made prefix-aware through :class:`~kvtier.policies.hints.BlockHint`:

* **Unique tails.** The last block of a chain (``hint.is_tail``) is the block
  of the prompt that the fewest other requests can share: in a prefix tree a
  block is shared by at most as many requests as its parent, and a prompt's
  last block is where it stops matching the next prompt that shares its
  beginning. The policy *measures* rather than assumes how often first-seen
  tails are read again, against first-seen interior blocks (re-reads while
  on probation or through the ghost, over about the last ``capacity``
  first-seen blocks), and while tails are clearly (beyond chance) the less
  reused kind a new tail enters P at its *eviction* end: it leaves first,
  before it pushes anything out. Where tails are reused (multi-round chat:
  each round's prompt extends the last one) they enter as every block does.
* **Prefix order.** A block inserted below a parent that is still on
  probation moves the parent to P's most recent end, so a block that turned
  out not to be a tail (a chunked prefill's or a decode step's last block,
  extended by the next store) is never evicted before the blocks below it.

Without hints (a caller that only has keys) it behaves as ``"slru"``.
"""

from __future__ import annotations

from kvtier.policies.hints import BlockHint
from kvtier.policies.reuse import less_reused
from kvtier.policies.slru import SLRUPolicy
from kvtier.tiers.base import BlockKey

__all__ = ["PrefixSLRUPolicy"]

_TAIL, _INTERIOR = 1, 0


class PrefixSLRUPolicy(SLRUPolicy):
    """SLRU with learned one-hit-wonder placement of chain tails (see the module doc).

    Every operation is O(1); :meth:`victims` is SLRU's (O(count + pinned keys
    walked past), amortised over M's demotions).

    Args:
        capacity: The tier's capacity in slots; also the ghost's length and
            the window (in first-seen blocks) of the reuse statistics.
        probation_fraction: P's share of the capacity (0 < f < 1).

    Raises:
        ConfigError: A bad capacity or fraction.
    """

    def __init__(self, capacity: int, probation_fraction: float = 0.1) -> None:
        super().__init__(capacity, probation_fraction)
        self.kind: dict[BlockKey, int] = {}  # first-seen keys on probation: tail or interior
        self.ghost_kind: dict[BlockKey, int] = {}  # the same, for ghost keys
        self.inserted = [0.0, 0.0]  # first-seen blocks, per kind (interior, tail)
        self.reused = [0.0, 0.0]  # ... read again on probation or through the ghost
        self._window = 0

    # -- the statistics ------------------------------------------------------------

    def reuse_rate(self, tail: bool) -> float:
        """Measured share of first-seen tails (or interior blocks) read again (0.0: none seen)."""
        kind = _TAIL if tail else _INTERIOR
        return self.reused[kind] / self.inserted[kind] if self.inserted[kind] else 0.0

    @property
    def tails_first(self) -> bool:
        """Whether a new tail now enters probation at its eviction end.

        True when tails are read again less often than interior blocks by
        more than chance explains: a two-proportion z-test at two standard
        errors (about 98 % one-sided), so equal rates measured on few blocks
        never flip the placement.
        """
        (reused_i, reused_t), (inserted_i, inserted_t) = self.reused, self.inserted
        return less_reused(reused_t, inserted_t, reused_i, inserted_i)

    def _count_first_seen(self, kind: int) -> None:
        self.inserted[kind] += 1.0
        self._window += 1
        if self._window >= self.capacity:  # halve: the rates follow the recent workload
            self._window = 0
            self.inserted = [n / 2 for n in self.inserted]
            self.reused = [n / 2 for n in self.reused]

    # -- the protocol --------------------------------------------------------------

    def insert(self, key: BlockKey) -> None:
        """``key`` became resident, with no hint: as :meth:`insert_hinted` without one."""
        self.insert_hinted(key, None)

    def insert_hinted(self, key: BlockKey, hint: BlockHint | None) -> None:
        """``key`` became resident at ``hint``'s place in its chain (None: unknown)."""
        if key in self.probation or key in self.protected:
            self.access(key)
        elif key in self.ghost:
            del self.ghost[key]
            kind = self.ghost_kind.pop(key, None)
            if kind is not None:
                self.reused[kind] += 1.0
            self.protected[key] = None
        else:
            self.probation[key] = None
            if hint is not None:
                kind = _TAIL if hint.is_tail else _INTERIOR
                self.kind[key] = kind
                self._count_first_seen(kind)
                if kind == _TAIL and self.tails_first:
                    self.probation.move_to_end(key, last=False)
        if hint is not None and hint.parent is not None and hint.parent in self.probation:
            self.probation.move_to_end(hint.parent)

    def access(self, key: BlockKey) -> None:
        """``key`` was read: to M's most recent end (an unknown key is ignored)."""
        kind = self.kind.pop(key, None)
        if kind is not None:
            self.reused[kind] += 1.0
        super().access(key)

    def access_hinted(self, key: BlockKey, hint: BlockHint | None) -> None:
        """``key`` was read for a request (the hint is not needed: as :meth:`access`)."""
        del hint
        self.access(key)

    def remove(self, key: BlockKey) -> None:
        """``key`` left the tier; from P it joins G with its kind (G holds ``capacity`` keys)."""
        if key in self.probation:
            kind = self.kind.pop(key, None)
            del self.probation[key]
            self.ghost[key] = None
            if kind is not None:
                self.ghost_kind[key] = kind
            while len(self.ghost) > self.capacity:
                old, _ = self.ghost.popitem(last=False)
                self.ghost_kind.pop(old, None)
        else:
            self.protected.pop(key, None)

    def __repr__(self) -> str:
        return (
            f"PrefixSLRUPolicy(probation={len(self.probation)}, protected={len(self.protected)}, "
            f"ghost={len(self.ghost)}, tails_first={self.tails_first})"
        )
