"""Storage tiers behind the ``BlockStore`` protocol: device, pinned CPU, disk, remote.

The names an engine plugs in with are importable from here::

    from kvtier.tiers import BlockLayout, CpuTier, DeviceTier, DiskTier, TierIndex

Each is imported from its module on first use, so importing one tier (or
``kvtier`` itself, whose policies use :mod:`kvtier.tiers.base`) loads no
other. ``RedisTier`` needs the ``redis`` extra (``pip install
'kvtier[redis]'``): it is left out of ``__all__``, so ``import *`` works
without it, and asking for it without redis-py raises an ``ImportError``
that says so.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from kvtier.tiers.base import BlockKey, BlockLayout, BlockStore
    from kvtier.tiers.cpu import CpuTier
    from kvtier.tiers.disk import DiskTier
    from kvtier.tiers.gpu import DeviceTier
    from kvtier.tiers.index import TierIndex
    from kvtier.tiers.redis import RedisTier as RedisTier
    from kvtier.tiers.slots import Reservation

_MODULES: Final = {
    "BlockKey": "base",
    "BlockLayout": "base",
    "BlockStore": "base",
    "CpuTier": "cpu",
    "DeviceTier": "gpu",
    "DiskTier": "disk",
    "RedisTier": "redis",
    "Reservation": "slots",
    "TierIndex": "index",
}

__all__ = [
    "BlockKey",
    "BlockLayout",
    "BlockStore",
    "CpuTier",
    "DeviceTier",
    "DiskTier",
    "Reservation",
    "TierIndex",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        loaded = importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as exc:
        if name != "RedisTier" or exc.name is None or not exc.name.startswith("redis"):
            raise
        raise ImportError(
            "kvtier.tiers.RedisTier needs redis-py: pip install 'kvtier[redis]'",
            name=exc.name,
        ) from exc
    return getattr(loaded, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULES})
