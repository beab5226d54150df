"""Eviction, admission and prefetch policies, registered by name."""

from kvtier.policies.base import (
    EVICTION_POLICIES,
    EvictionPolicy,
    EvictionPolicyFactory,
    make_eviction_policy,
    register_eviction_policy,
)
from kvtier.policies.lru import LRUPolicy

__all__ = [
    "EVICTION_POLICIES",
    "EvictionPolicy",
    "EvictionPolicyFactory",
    "LRUPolicy",
    "make_eviction_policy",
    "register_eviction_policy",
]
