"""Online reuse rates per kind of block, and the test that one kind is reused less.

Admission rules of the prefix-aware policies learn, while they run, how often
the blocks of one *kind* (a chain tail, or a request class) are read again
after they are first stored, and act only when a kind is reused less than the
others by more than chance explains. :class:`ReuseRates` keeps the counts,
halving them every ``window`` first-seen blocks so the rates follow the
recent workload; :func:`less_reused` is the two-proportion z-test.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

from kvtier.errors import ConfigError

__all__ = ["Z_SCORE", "ReuseRates", "less_reused"]

Z_SCORE = 2.0
"""Standard errors by which one rate must fall below another (about 98 % one-sided)."""

K = TypeVar("K", bound=Hashable)
_FORGOTTEN = 1.0 / 64  # counts below it are dropped: one block, unseen for seven windows


def less_reused(
    reused_a: float, seen_a: float, reused_b: float, seen_b: float, z: float = Z_SCORE
) -> bool:
    """Whether kind *a*'s reuse rate is below kind *b*'s by more than ``z`` standard errors.

    A two-proportion z-test with the pooled rate: equal rates measured on few
    blocks never pass, and no kind passes before both have been seen.

    Args:
        reused_a: Blocks of kind *a* read again.
        seen_a: Blocks of kind *a* first seen.
        reused_b: Blocks of kind *b* read again.
        seen_b: Blocks of kind *b* first seen.
        z: The standard errors required.

    Returns:
        True only when ``reused_a / seen_a`` is clearly below ``reused_b / seen_b``.
    """
    if seen_a <= 0 or seen_b <= 0:
        return False
    pooled = (reused_a + reused_b) / (seen_a + seen_b)
    spread = pooled * (1.0 - pooled) * (1.0 / seen_a + 1.0 / seen_b)
    gap = reused_b / seen_b - reused_a / seen_a
    return gap > 0 and gap * gap > z * z * spread


class ReuseRates(Generic[K]):
    """First-seen and reused counts per kind, halved every ``window`` first-seen blocks.

    Args:
        window: First-seen blocks between two halvings (a tier's capacity:
            the rates then describe about the blocks the tier could hold).

    Raises:
        ConfigError: ``window`` is not a positive integer.
    """

    __slots__ = ("_since_halving", "reused", "seen", "total_reused", "total_seen", "window")

    def __init__(self, window: int) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"a reuse window must be an integer >= 1, got {window!r}")
        self.window = window
        self.seen: dict[K, float] = {}
        self.reused: dict[K, float] = {}
        self.total_seen = 0.0
        self.total_reused = 0.0
        self._since_halving = 0

    def first_seen(self, kind: K) -> None:
        """Count a block of ``kind`` stored for the first time."""
        self.seen[kind] = self.seen.get(kind, 0.0) + 1.0
        self.total_seen += 1.0
        self._since_halving += 1
        if self._since_halving >= self.window:  # kinds not seen for long fade out
            self._since_halving = 0
            self.seen = {k: n / 2 for k, n in self.seen.items() if n >= _FORGOTTEN}
            self.reused = {k: n / 2 for k, n in self.reused.items() if k in self.seen}
            self.total_seen = sum(self.seen.values())
            self.total_reused = sum(self.reused.values())

    def reuse(self, kind: K) -> None:
        """Count a first-seen block of ``kind`` read again (once per block)."""
        self.reused[kind] = self.reused.get(kind, 0.0) + 1.0
        self.total_reused += 1.0

    def rate(self, kind: K) -> float:
        """Measured share of ``kind``'s first-seen blocks read again (0.0: none seen)."""
        seen = self.seen.get(kind, 0.0)
        return min(1.0, self.reused.get(kind, 0.0) / seen) if seen else 0.0

    def below_rest(self, kind: K) -> bool:
        """Whether ``kind`` is reused less than all other kinds together (:func:`less_reused`)."""
        seen, reused = self.seen.get(kind, 0.0), self.reused.get(kind, 0.0)
        return less_reused(reused, seen, self.total_reused - reused, self.total_seen - seen)

    def below(self, kind: K, other: K) -> bool:
        """Whether ``kind`` is reused less than ``other`` (see :func:`less_reused`)."""
        return less_reused(
            self.reused.get(kind, 0.0),
            self.seen.get(kind, 0.0),
            self.reused.get(other, 0.0),
            self.seen.get(other, 0.0),
        )

    def __repr__(self) -> str:
        rates = ", ".join(f"{k!r}: {self.rate(k):.2f}" for k in self.seen)
        return f"ReuseRates({{{rates}}})"
