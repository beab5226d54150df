"""Prefetch policies: how long a request may wait for blocks held by slow tiers.

A lower-tier hit in the first lower tier (pinned host memory) is always
loaded: a host-to-device copy is fast and overlaps compute. A hit further
down (disk, a remote store) must be staged through the first lower tier
first, and that can take longer than recomputing. SGLang HiCache's three
names decide how much of it to wait for:

* ``best_effort``: load only the prefix already in the first lower tier; the
  rest of the hit is recomputed, so no request ever waits for storage;
* ``wait_complete``: load the whole hit, however long staging takes;
* ``timeout``: stage blocks while their estimated staging time fits a budget
  of ``timeout + timeout_per_1k_tokens * prompt_tokens / 1000``.

Unlike HiCache, which cuts a prefetch off when the deadline passes, kvtier
decides *before* the load starts, from :class:`StagingCostModel`'s measured
seconds per block: a load into device blocks cannot be abandoned halfway
without waiting for its copies anyway, and deciding up front never leaves a
request holding half-written blocks.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import attrs

from kvtier.errors import ConfigError, UnknownNameError

__all__ = [
    "PREFETCH_POLICIES",
    "BestEffort",
    "PrefetchPolicy",
    "StagingCostModel",
    "Timeout",
    "WaitComplete",
    "make_prefetch_policy",
]


@runtime_checkable
class PrefetchPolicy(Protocol):
    """Chooses how many leading lower-tier hit blocks a request loads."""

    def loadable(self, levels: Sequence[int], num_tokens: int, costs: StagingCostModel) -> int:
        """How many of the hit blocks to load, from the first.

        Args:
            levels: The lower tier holding each hit block, in prefix order
                (0: the first lower tier; higher: slower tiers, staged).
            num_tokens: The request's prompt tokens.
            costs: Measured staging seconds per block of each tier.

        Returns:
            A count in ``[0, len(levels)]``; the rest of the hit is recomputed.
        """
        ...


class StagingCostModel:
    """Seconds per block to stage from each slow tier, learned from finished loads.

    An exponentially weighted mean per tier level; a level not measured yet
    costs ``prior`` seconds per block (0: optimistic, so the first loads
    happen and get measured). An estimate relaxes back toward ``prior`` with
    a half-life of ``half_life`` seconds since the level's last observation:
    only a load the policy accepts measures a tier again, so without it one
    slow read (a stalled disk) could keep a ``timeout`` policy from ever
    loading from that tier again. :class:`Timeout` charges blocks the
    higher of the :meth:`measured` and the relaxed estimate, and once the
    measurement is :meth:`stale` (a half-life old) and the lower of the two
    fits, it loads one exploratory block, whose observation replaces the
    stale estimate: a tier that is still slow is declined again after one
    block, a recovered one is back in use at once. (With ``half_life``
    infinite, or a prior above the budget and a slow measurement, nothing
    brings a tier measured slow back.)

    Args:
        weight: The weight of each new observation, in (0, 1].
        prior: Seconds per block before any observation.
        half_life: Seconds over which an estimate's distance to ``prior``
            halves (``math.inf``: never).
        clock: Seconds, monotonic (tests pass a fake one).

    Raises:
        ConfigError: ``weight`` outside (0, 1], a ``prior`` that is negative,
            infinite or NaN, a ``half_life`` that is not > 0, any of them not a
            real number (or a bool), or a ``clock`` that is not callable.
    """

    def __init__(
        self,
        *,
        weight: float = 0.2,
        prior: float = 0.0,
        half_life: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not _real(weight) or not 0.0 < weight <= 1.0:
            raise ConfigError(f"staging cost weight must be in (0, 1], got {weight!r}")
        if not _real(prior) or not 0.0 <= prior < math.inf:  # NaN fails too
            raise ConfigError(f"staging cost prior must be finite seconds >= 0, got {prior!r}")
        if not _real(half_life) or not half_life > 0.0:  # NaN fails too
            raise ConfigError(f"staging cost half_life must be seconds > 0, got {half_life!r}")
        if not callable(clock):
            raise ConfigError(f"staging cost clock must be callable, got {clock!r}")
        self.weight = weight
        self.prior = prior
        self.half_life = half_life
        self._clock = clock
        self._per_block: dict[int, tuple[float, float]] = {}  # level: (estimate, observed at)

    def _freshness(self, at: float) -> float:
        """How much of an estimate observed at ``at`` still stands: 1 now, halving per half-life."""
        return math.pow(0.5, max(0.0, self._clock() - at) / self.half_life)

    def _current(self, level: int) -> float | None:
        entry = self._per_block.get(level)
        if entry is None:
            return None
        estimate, at = entry
        return self.prior + (estimate - self.prior) * self._freshness(at)

    def observe(self, level: int, blocks: int, seconds: float) -> None:
        """A load staged ``blocks`` blocks from ``level`` and took ``seconds``.

        The sample is blended with the estimate as last measured, with more
        weight the staler that estimate is (``weight`` when fresh), and
        replaces a :meth:`stale` one: the load that explores a tier after an
        idle spell says what it costs now, whether it recovered or not.
        """
        if blocks <= 0 or not 0.0 <= seconds < math.inf:
            return
        sample = seconds / blocks
        entry = self._per_block.get(level)
        if entry is None or self._stale_since(entry[1]):
            estimate = sample
        else:
            old, at = entry
            estimate = old + (1.0 - (1.0 - self.weight) * self._freshness(at)) * (sample - old)
        self._per_block[level] = (estimate, self._clock())

    def _stale_since(self, at: float) -> bool:
        """An estimate observed at ``at`` is a half-life old or more."""
        return self._freshness(at) <= 0.5

    def stale(self, level: int) -> bool:
        """Whether ``level``'s estimate was last observed a half-life ago or more.

        A tier never measured is not stale (it costs ``prior``); neither is
        level 0.
        """
        entry = self._per_block.get(level)
        return level > 0 and entry is not None and self._stale_since(entry[1])

    def seconds_per_block(self, level: int) -> float:
        """The estimate for ``level`` now, relaxed (level 0, the first lower tier, costs 0)."""
        if level <= 0:
            return 0.0
        current = self._current(level)
        return self.prior if current is None else current

    def measured(self, level: int) -> float:
        """The estimate for ``level`` as its last observation left it (not relaxed).

        A level not measured yet costs ``prior``; level 0 costs nothing.
        """
        if level <= 0:
            return 0.0
        entry = self._per_block.get(level)
        return self.prior if entry is None else entry[0]


def _real(value: object) -> bool:
    """A real number, not a bool (``True`` is an ``int``)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _first_lower_prefix(levels: Sequence[int]) -> int:
    count = 0
    for level in levels:
        if level != 0:
            break
        count += 1
    return count


@attrs.frozen
class BestEffort:
    """Load the prefix held by the first lower tier; never wait for storage."""

    def loadable(self, levels: Sequence[int], num_tokens: int, costs: StagingCostModel) -> int:
        """The leading blocks held by the first lower tier."""
        return _first_lower_prefix(levels)


@attrs.frozen
class WaitComplete:
    """Load every hit block, however slow the tier that holds it."""

    def loadable(self, levels: Sequence[int], num_tokens: int, costs: StagingCostModel) -> int:
        """All of them."""
        return len(levels)


def _non_negative(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise ConfigError(f"prefetch {attribute.name} must be finite seconds >= 0, got {value!r}")


@attrs.frozen
class Timeout:
    """Stage blocks while their estimated time fits ``timeout + per-1k-token budget``.

    Attributes:
        timeout: The base budget in seconds.
        timeout_per_1k_tokens: Seconds added per 1,000 prompt tokens (longer
            prompts save more by loading, so they may wait longer).
    """

    timeout: float = attrs.field(default=0.05, validator=_non_negative)
    timeout_per_1k_tokens: float = attrs.field(default=0.005, validator=_non_negative)

    def budget(self, num_tokens: int) -> float:
        """Seconds of staging a request of ``num_tokens`` prompt tokens may wait."""
        return self.timeout + self.timeout_per_1k_tokens * num_tokens / 1000

    def loadable(self, levels: Sequence[int], num_tokens: int, costs: StagingCostModel) -> int:
        """The longest prefix whose staging time fits the budget.

        Each block is charged the higher of its tier's estimate as last
        measured (:meth:`StagingCostModel.measured`) and the relaxed one, so
        relaxing toward a pessimistic prior makes the policy more careful
        and relaxing toward an optimistic one does not make a slow tier look
        fast. Where the charge no longer fits, the tier's measurement is
        :meth:`~StagingCostModel.stale` and the lower of the two estimates
        fits, one more block is loaded to measure the tier again, and the
        prefix ends there. A NaN estimate ends the prefix. No state changes:
        every lookup that finds a tier stale may explore it (each by one
        block: by its estimate, a request overruns its budget by one block
        at most, though concurrent explorations of a stalled tier queue
        behind each other).
        """
        left = self.budget(num_tokens)
        for count, level in enumerate(levels):
            relaxed = costs.seconds_per_block(level)
            measured = costs.measured(level)
            if math.isnan(relaxed) or math.isnan(measured):
                return count
            charge = max(measured, relaxed)
            if charge <= left:
                left -= charge
                continue
            explore = costs.stale(level) and min(measured, relaxed) <= left
            return count + 1 if explore else count
        return len(levels)


PrefetchFactory = Callable[[float, float], PrefetchPolicy]
"""Builds a policy from ``(timeout, timeout_per_1k_tokens)`` (the config's keys)."""

PREFETCH_POLICIES: dict[str, PrefetchFactory] = {
    "best_effort": lambda _timeout, _per_1k: BestEffort(),
    "wait_complete": lambda _timeout, _per_1k: WaitComplete(),
    "timeout": Timeout,
}
"""Prefetch policies by name (SGLang HiCache's names)."""


def make_prefetch_policy(
    name: str, *, timeout: float = 0.05, timeout_per_1k_tokens: float = 0.005
) -> PrefetchPolicy:
    """Build the prefetch policy registered as ``name``.

    Raises:
        UnknownNameError: No policy has that name; the message lists the valid ones.
        ConfigError: A negative budget.
    """
    try:
        factory = PREFETCH_POLICIES[name]
    except (KeyError, TypeError):
        raise UnknownNameError("prefetch policy", name, list(PREFETCH_POLICIES)) from None
    return factory(timeout, timeout_per_1k_tokens)
