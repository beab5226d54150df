"""How :class:`~kvtier.tiers.index.TierIndex` tells its policy of a batch, with or without hints.

Keys arrive as the offload manager lists them (each request's chain head
first); the policy hears of them tail first. A policy that implements
:class:`~kvtier.policies.base.PrefixAwarePolicy` gets each key's
:class:`~kvtier.policies.hints.BlockHint` when the caller gave hints; any
other policy, or a call without hints, gets the plain methods.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.errors import InvalidRequestError
from kvtier.policies.base import EvictionPolicy, PrefixAwarePolicy
from kvtier.policies.hints import BlockHint
from kvtier.tiers.base import BlockKey

__all__ = ["HintMemory", "Hints", "check_hints", "notify_access", "notify_insert"]

Hints = Sequence[BlockHint | None]
"""One hint (or None) per key of a commit or pin call."""


def check_hints(tier: str, keys: Sequence[BlockKey], hints: Hints | None) -> None:
    """Raise unless ``hints`` is None or holds one ``BlockHint`` or None per key.

    Raises:
        InvalidRequestError: A length mismatch or a hint of another type.
    """
    if hints is None:
        return
    if len(hints) != len(keys):
        raise InvalidRequestError(
            f"tier {tier!r}: {len(hints)} hints for {len(keys)} keys (one per key, or none)"
        )
    for hint in hints:
        if hint is not None and not isinstance(hint, BlockHint):
            raise InvalidRequestError(
                f"tier {tier!r}: a hint must be a BlockHint or None, got {hint!r}"
            )


class HintMemory:
    """The latest hint of each visible key, for demotions; kept only for prefix-aware policies."""

    __slots__ = ("_hints",)

    def __init__(self, policy: EvictionPolicy) -> None:
        self._hints: dict[BlockKey, BlockHint] | None = (
            {} if isinstance(policy, PrefixAwarePolicy) else None
        )

    def remember(self, keys: Sequence[BlockKey], hints: Hints | None) -> None:
        """Keep each key's hint (a None hint keeps the one before)."""
        if self._hints is None or hints is None:
            return
        for key, hint in zip(keys, hints, strict=True):
            if hint is not None:
                self._hints[key] = hint

    def of(self, keys: Sequence[BlockKey]) -> tuple[BlockHint | None, ...]:
        """One hint (or None) per key; empty when no hints are kept."""
        hints = self._hints
        return () if hints is None else tuple(hints.get(key) for key in keys)

    def forget(self, key: BlockKey) -> None:
        """``key`` left the tier."""
        if self._hints is not None:
            self._hints.pop(key, None)

    def clear(self) -> None:
        """Every key left the tier."""
        if self._hints is not None:
            self._hints.clear()


def notify_insert(policy: EvictionPolicy, keys: Sequence[BlockKey], hints: Hints | None) -> None:
    """``policy.insert`` (or ``insert_hinted``) for each key, tail first."""
    if hints is not None and isinstance(policy, PrefixAwarePolicy):
        for key, hint in zip(reversed(keys), reversed(hints), strict=True):
            policy.insert_hinted(key, hint)
        return
    for _ in map(policy.insert, reversed(keys)):  # a C loop
        pass


def notify_access(policy: EvictionPolicy, keys: Sequence[BlockKey], hints: Hints | None) -> None:
    """``policy.access`` (or ``access_hinted``) for each key, tail first."""
    if hints is not None and isinstance(policy, PrefixAwarePolicy):
        for key, hint in zip(reversed(keys), reversed(hints), strict=True):
            policy.access_hinted(key, hint)
        return
    for _ in map(policy.access, reversed(keys)):
        pass
