"""Checks of an :class:`~kvtier.offload.manager.OffloadManager`'s arguments.

Everything here raises :class:`~kvtier.errors.ConfigError` naming the bad
setting, before the manager builds anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from kvtier.errors import ConfigError
from kvtier.log import get_logger
from kvtier.offload.flush import flush_targets
from kvtier.offload.plan import WriteMode
from kvtier.policies.prefetch import PrefetchPolicy, StagingCostModel, make_prefetch_policy
from kvtier.pool import BlockPool
from kvtier.tiers.base import BlockStore

_log = get_logger("kvtier.offload")

__all__ = [
    "MODES",
    "check_flush",
    "check_stack",
    "flag",
    "optional_flag",
    "positive",
    "prefetch_policy",
    "staging_cost_model",
    "tier_policies",
]

MODES: Final[tuple[WriteMode, ...]] = ("eager", "lazy", "selective")


def positive(name: str, value: object, minimum: int = 1) -> int:
    """``value`` if it is an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def flag(name: str, value: object) -> bool:
    """``value`` if it is a bool."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def optional_flag(name: str, value: object) -> bool | None:
    """``value`` if it is a bool or None."""
    return None if value is None else flag(name, value)


def check_world_size(world_size: object, num_tiers: int) -> int:
    """``world_size``, checked: above 1 the stack must have one lower tier.

    Raises:
        ConfigError: Not a positive integer, or above 1 over several lower tiers.
    """
    size = positive("world_size", world_size)
    if size > 1 and num_tiers > 1:
        raise ConfigError(
            f"world_size={size} needs one lower tier, not {num_tiers}: with more, the "
            "manager moves blocks between its tiers itself (demotions, staging for loads, "
            "the flush on close), which the other workers' plans do not carry, so their "
            "tiers would drift from the index and serve other blocks' shards"
        )
    return size


def check_spill(spill_stores: object, mode: WriteMode) -> bool | None:
    """``spill_stores``, checked: True does not apply to lazy mode (as the config says).

    Raises:
        ConfigError: Not a bool or None, or True in lazy mode.
    """
    spill = optional_flag("spill_stores", spill_stores)
    if spill and mode == "lazy":
        raise ConfigError("spill_stores=True does not apply to lazy mode, which never spills")
    return spill


def check_stack(
    block_pool: BlockPool,
    device: BlockStore,
    tiers: Sequence[BlockStore],
    mode: str,
    lazy_free_target: int,
    block_size: int,
) -> None:
    """The lower tiers, the write mode and its target fit together and the device.

    Lazy mode over a first tier smaller than the device logs
    ``lazy_first_tier_smaller_than_device``: it cannot keep the device's
    eviction end written for long.

    Raises:
        ConfigError: No lower tier, an unknown mode, a tier of another layout,
            two tiers of one name, a ``block_size`` other than the device
            layout's (lookups would count tokens no block holds), or (lazy
            mode) a ``lazy_free_target`` above the device's usable blocks.
    """
    if positive("block_size", block_size) != device.layout.block_size:
        raise ConfigError(
            f"block_size={block_size}, but the device's blocks hold "
            f"{device.layout.block_size} tokens"
        )
    if not tiers:
        raise ConfigError("an offload manager needs at least one lower tier")
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    for tier in tiers:
        if tier.layout != device.layout:
            raise ConfigError(f"tier {tier.name!r} has another block layout than the device")
    names = [tier.name for tier in tiers]
    if len(set(names)) != len(names):
        raise ConfigError(f"tier names must be unique, got {names}")
    usable = block_pool.num_gpu_blocks - 1  # the null block aside
    if mode == "lazy" and positive("lazy_free_target", lazy_free_target) > usable:
        raise ConfigError(f"lazy_free_target={lazy_free_target} > the {usable} device blocks")
    if mode == "lazy" and tiers[0].num_slots < usable:
        # Allowed (a test or a tight box may want it), but it churns: see docs/offload.md.
        _log.warning(
            "lazy_first_tier_smaller_than_device",
            tier=tiers[0].name,
            tier_blocks=tiers[0].num_slots,
            device_blocks=usable,
            hint="stores and rewrites will evict each other's copies (dropped_stores)",
        )


def tier_policies(eviction_policy: str | Sequence[str], num_tiers: int) -> list[str]:
    """One eviction policy name per lower tier (one name: the same for all)."""
    if isinstance(eviction_policy, str):
        return [eviction_policy] * num_tiers
    policies = list(eviction_policy)
    if len(policies) != num_tiers:
        raise ConfigError(f"{len(policies)} eviction policies for {num_tiers} tiers")
    return policies


def prefetch_policy(prefetch: PrefetchPolicy | str) -> PrefetchPolicy:
    """A prefetch policy object, or one built by name with its default budget.

    Checked for a callable ``loadable`` (a runtime-checkable protocol would
    accept a policy class, or any object with a ``loadable`` attribute).

    Raises:
        UnknownNameError: No prefetch policy has that name.
        ConfigError: ``prefetch`` is neither a name nor a policy.
    """
    if isinstance(prefetch, str):
        return make_prefetch_policy(prefetch)
    if isinstance(prefetch, type) or not callable(getattr(prefetch, "loadable", None)):
        raise ConfigError(
            "prefetch must be a policy name or a PrefetchPolicy instance (with a "
            f"loadable(levels, num_tokens, costs) method), got {prefetch!r}"
        )
    return prefetch


def check_flush(flush_on_close: object, tiers: Sequence[BlockStore]) -> bool:
    """``flush_on_close`` if it is a bool and, when true, the stack has somewhere to flush.

    Raises:
        ConfigError: Not a bool, or no tier held in memory has a lasting tier
            (disk or Redis) below it.
    """
    flush = flag("flush_on_close", flush_on_close)
    if flush and not flush_targets(tiers):
        raise ConfigError(
            "flush_on_close: no tier held in memory has a tier below it that lasts "
            "(disk or redis) to flush into"
        )
    return flush


def staging_cost_model(costs: StagingCostModel | None) -> StagingCostModel:
    """``costs``, or a new model with the default settings.

    Raises:
        ConfigError: ``costs`` is not a :class:`~kvtier.policies.prefetch.StagingCostModel`.
    """
    if costs is None:
        return StagingCostModel()
    if not isinstance(costs, StagingCostModel):
        raise ConfigError(f"staging_costs must be a StagingCostModel, got {costs!r}")
    return costs
