"""Eviction, admission and prefetch policies, registered by name."""

from kvtier.policies.arc import ARCPolicy
from kvtier.policies.base import (
    EVICTION_POLICIES,
    EvictionPolicy,
    EvictionPolicyFactory,
    PrefixAwarePolicy,
    make_eviction_policy,
    register_eviction_policy,
)
from kvtier.policies.class_lru import ClassLRUPolicy
from kvtier.policies.hints import BlockHint
from kvtier.policies.lfu import LFUPolicy
from kvtier.policies.lru import LRUPolicy
from kvtier.policies.prefix_slru import PrefixSLRUPolicy
from kvtier.policies.priority import PriorityLRUPolicy
from kvtier.policies.s3fifo import S3FIFOPolicy
from kvtier.policies.slru import SLRUPolicy

__all__ = [
    "EVICTION_POLICIES",
    "ARCPolicy",
    "BlockHint",
    "ClassLRUPolicy",
    "LFUPolicy",
    "S3FIFOPolicy",
    "EvictionPolicy",
    "EvictionPolicyFactory",
    "LRUPolicy",
    "PrefixAwarePolicy",
    "PrefixSLRUPolicy",
    "PriorityLRUPolicy",
    "SLRUPolicy",
    "make_eviction_policy",
    "register_eviction_policy",
]
