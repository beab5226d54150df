"""The ``EvictionPolicy`` protocol and the registry of eviction policies by name.

A policy orders the resident blocks of one tier. The tier's
:class:`~kvtier.tiers.index.TierIndex` owns the slots and the pins; it tells
the policy what became resident (:meth:`~EvictionPolicy.insert`), what was read
(:meth:`~EvictionPolicy.access`) and what left (:meth:`~EvictionPolicy.remove`),
and asks it for victims among the blocks that may be evicted now
(:meth:`~EvictionPolicy.victims`). Policies are third-party pluggable:
implement the protocol (no inheritance needed) and register a factory with
:func:`register_eviction_policy`.

Prefix context is optional. A policy that also implements
:class:`PrefixAwarePolicy` (two more methods; the check is
``isinstance(policy, PrefixAwarePolicy)``) is told, where the caller knows it,
where each block sits in its request's chain (a
:class:`~kvtier.policies.hints.BlockHint`: depth, chain length, parent key):
:func:`~kvtier.policies.simulation.simulate` always knows it, the
:class:`~kvtier.tiers.index.TierIndex` passes what the offload manager gives
it with a store or a load. A policy without those methods gets the plain
calls, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from kvtier.errors import ConfigError, UnknownNameError
from kvtier.policies.arc import ARCPolicy
from kvtier.policies.class_lru import ClassLRUPolicy
from kvtier.policies.hints import BlockHint
from kvtier.policies.lfu import LFUPolicy
from kvtier.policies.lru import LRUPolicy
from kvtier.policies.prefix_slru import PrefixSLRUPolicy
from kvtier.policies.priority import PriorityLRUPolicy
from kvtier.policies.s3fifo import S3FIFOPolicy
from kvtier.policies.slru import SLRUPolicy
from kvtier.tiers.base import BlockKey

__all__ = [
    "EVICTION_POLICIES",
    "BlockHint",
    "EvictionPolicy",
    "EvictionPolicyFactory",
    "PrefixAwarePolicy",
    "make_eviction_policy",
    "register_eviction_policy",
]


@runtime_checkable
class EvictionPolicy(Protocol):
    """Orders one tier's resident blocks for eviction.

    The index calls :meth:`insert` once per block that becomes resident and
    :meth:`remove` once when it leaves, whether evicted (after being returned
    by :meth:`victims`), dropped as corrupt or cleared; a policy that keeps
    history (ARC's ghost lists) may treat every removal as an eviction.
    :meth:`access` is only called for tracked keys. Pinned blocks stay tracked;
    :meth:`victims` skips them through its ``evictable`` argument.
    """

    def insert(self, key: BlockKey) -> None:
        """``key`` became resident (a store was committed or a block restored)."""
        ...

    def access(self, key: BlockKey) -> None:
        """``key`` was read (a hit being loaded)."""
        ...

    def remove(self, key: BlockKey) -> None:
        """``key`` left the tier; forget it (an unknown key is not an error)."""
        ...

    def victims(self, count: int, evictable: Callable[[BlockKey], bool]) -> list[BlockKey]:
        """Choose up to ``count`` distinct tracked keys to evict, first victim first.

        Only keys for which ``evictable(key)`` is true may be chosen; fewer
        than ``count`` keys come back only when fewer are evictable. The keys
        stay tracked: the index calls :meth:`remove` for those it evicts.

        Args:
            count: How many victims are wanted (>= 0).
            evictable: Whether a key may be evicted now (false while pinned).

        Returns:
            The victims, in eviction order.
        """
        ...

    def __len__(self) -> int:
        """How many keys are tracked."""
        ...

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is tracked."""
        ...


@runtime_checkable
class PrefixAwarePolicy(EvictionPolicy, Protocol):
    """An :class:`EvictionPolicy` that can also be told where a block sits in its chain.

    Callers that know a block's request (the simulator, the tier index for
    the offload manager's stores and loads) call :meth:`insert_hinted` and
    :meth:`access_hinted` instead of :meth:`~EvictionPolicy.insert` and
    :meth:`~EvictionPolicy.access`, in the same order (a chain tail first)
    and under the same rules; the hint may be None for a block whose place is
    unknown. Demotions from the tier above carry the hints that tier's
    index kept (when its policy is prefix-aware too). Callers that do not
    know (a warm restart's restore, selective and lazy stores, which are not
    for one request) keep calling the plain methods, so a prefix-aware
    policy must still implement them. Policies that implement only
    :class:`EvictionPolicy` are never given hints.
    """

    def insert_hinted(self, key: BlockKey, hint: BlockHint | None) -> None:
        """``key`` became resident, at ``hint``'s place in its request's chain."""
        ...

    def access_hinted(self, key: BlockKey, hint: BlockHint | None) -> None:
        """``key`` was read for a request, at ``hint``'s place in its chain."""
        ...


class EvictionPolicyFactory(Protocol):
    """Builds a policy for a tier of ``capacity`` slots (size-aware policies use it)."""

    def __call__(self, capacity: int) -> EvictionPolicy:
        """Build a fresh, empty policy."""
        ...


EVICTION_POLICIES: dict[str, EvictionPolicyFactory] = {
    "lru": LRUPolicy,
    "arc": ARCPolicy,
    "s3fifo": S3FIFOPolicy,
    "lfu": LFUPolicy,
    "slru": SLRUPolicy,
    "priority_lru": PriorityLRUPolicy,
    "prefix_slru": PrefixSLRUPolicy,
    "class_lru": ClassLRUPolicy,
}
"""Registered eviction policies: name → factory."""


def register_eviction_policy(name: str, factory: EvictionPolicyFactory) -> None:
    """Register ``factory`` under ``name``, replacing any policy of that name.

    Args:
        name: The name :func:`make_eviction_policy` and ``TierIndex`` accept.
        factory: Called with the tier's capacity in slots; returns a new policy.

    Raises:
        ConfigError: ``name`` is not a non-empty string or ``factory`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"an eviction policy name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise ConfigError(f"eviction policy factory for {name!r} is not callable: {factory!r}")
    EVICTION_POLICIES[name] = factory


def make_eviction_policy(name: str, capacity: int) -> EvictionPolicy:
    """Build a fresh policy registered as ``name`` for a tier of ``capacity`` slots.

    Args:
        name: A registered name (see :data:`EVICTION_POLICIES`).
        capacity: The tier's capacity in slots.

    Returns:
        A new, empty policy.

    Raises:
        UnknownNameError: No policy has that name; the message lists the valid ones.
    """
    try:
        factory = EVICTION_POLICIES[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name
        raise UnknownNameError("eviction policy", name, list(EVICTION_POLICIES)) from None
    return factory(capacity)
