"""The shape of the device KV cache: groups of layers and their attention kind.

A model's layers are split into *KV cache groups*; all layers of a group share
a block table. kvtier supports full-attention groups now. The group id is part
of every prefix-cache key (:func:`kvtier.hashing.make_block_hash_with_group_id`)
and every group has its own manager (:mod:`kvtier.groups`), which is where
sliding-window and Mamba-state groups will plug in.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, Final

import attrs

from kvtier.errors import ConfigError

__all__ = ["DTYPE_SIZES", "FullAttentionSpec", "KVCacheConfig", "KVCacheGroupSpec", "KVCacheSpec"]

DTYPE_SIZES: Final[dict[str, int]] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}
"""Bytes per element of the KV cache dtypes kvtier knows, by name."""


def _dtype_name(value: object) -> str:
    """Accept ``"float16"`` or a ``torch.dtype`` (without importing torch)."""
    return str(value).removeprefix("torch.")


def _positive_int(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{attribute.name} must be a positive integer, got {value!r}")


def _known_dtype(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in DTYPE_SIZES:
        raise ConfigError(
            f"{attribute.name} {value!r} is not a known KV cache dtype; "
            f"known: {', '.join(sorted(DTYPE_SIZES))}"
        )


@attrs.frozen
class FullAttentionSpec:
    """A group of full-attention layers: every token attends to all before it.

    Attributes:
        block_size: Tokens per block.
        num_kv_heads: KV heads per layer.
        head_size: Elements per head.
        dtype: Element type, by name (a ``torch.dtype`` is accepted too).
    """

    kind: ClassVar[str] = "full_attention"

    block_size: int = attrs.field(validator=_positive_int)
    num_kv_heads: int = attrs.field(default=1, validator=_positive_int)
    head_size: int = attrs.field(default=1, validator=_positive_int)
    dtype: str = attrs.field(default="float16", converter=_dtype_name, validator=_known_dtype)

    @property
    def page_size_bytes(self) -> int:
        """Bytes of one block of one layer, K and V together."""
        return 2 * self.block_size * self.num_kv_heads * self.head_size * DTYPE_SIZES[self.dtype]


KVCacheSpec = FullAttentionSpec
"""Any supported group spec (sliding window and Mamba state will join it)."""


def _layer_names(value: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _groups(value: Iterable[KVCacheGroupSpec]) -> tuple[KVCacheGroupSpec, ...]:
    return tuple(value)


@attrs.frozen
class KVCacheGroupSpec:
    """Layers that share a block table.

    Attributes:
        layer_names: The layers in the group.
        kv_cache_spec: Their attention kind and block shape.
    """

    layer_names: tuple[str, ...] = attrs.field(converter=_layer_names)
    kv_cache_spec: KVCacheSpec


def _check_groups(
    _: object,
    attribute: attrs.Attribute[tuple[KVCacheGroupSpec, ...]],
    groups: tuple[KVCacheGroupSpec, ...],
) -> None:
    if not groups:
        raise ConfigError("kv_cache_groups must hold at least one group, got none")
    for group in groups:
        if not isinstance(group.kv_cache_spec, FullAttentionSpec):
            raise ConfigError(
                f"kv_cache_groups: {type(group.kv_cache_spec).__name__} is not supported; "
                "supported: FullAttentionSpec"
            )
    sizes = {group.kv_cache_spec.block_size for group in groups}
    if len(sizes) > 1:
        raise ConfigError(
            f"kv_cache_groups have different block sizes {sorted(sizes)}; "
            "groups of one pool must share a block size"
        )


def _check_num_blocks(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ConfigError(f"num_blocks must be >= 2 (block 0 is the null block), got {value}")


@attrs.frozen
class KVCacheConfig:
    """The device KV cache: how many blocks, and which groups share them.

    Attributes:
        num_blocks: Blocks in the pool, the null block included (>= 2).
        kv_cache_groups: The groups, in group-id order.
    """

    num_blocks: int = attrs.field(validator=_check_num_blocks)
    kv_cache_groups: tuple[KVCacheGroupSpec, ...] = attrs.field(
        converter=_groups, validator=_check_groups
    )

    @classmethod
    def full_attention(
        cls,
        num_blocks: int,
        block_size: int,
        *,
        num_kv_heads: int = 1,
        head_size: int = 1,
        dtype: str = "float16",
        layer_names: tuple[str, ...] = ("layers",),
    ) -> KVCacheConfig:
        """A config with one full-attention group: the common case.

        Args:
            num_blocks: Blocks in the pool, the null block included.
            block_size: Tokens per block.
            num_kv_heads: KV heads per layer.
            head_size: Elements per head.
            dtype: Element type name.
            layer_names: The layers of the group.

        Returns:
            The config.
        """
        spec = FullAttentionSpec(block_size, num_kv_heads, head_size, dtype)
        return cls(num_blocks, (KVCacheGroupSpec(layer_names, spec),))

    @property
    def block_size(self) -> int:
        """Tokens per block (shared by all groups)."""
        return self.kv_cache_groups[0].kv_cache_spec.block_size
