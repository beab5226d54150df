"""TOML configuration: the tier stack, its policies and the block layout.

A file looks like this (``examples/configs/`` holds complete templates)::

    [layout]
    num_layers = 32
    block_size = 16
    num_kv_heads = 8
    head_size = 128
    dtype = "float16"

    [offload]
    write_mode = "eager"          # eager | lazy | selective
    hash = "sha256"               # sha256 | sha256_cbor | xxhash
    prefetch = "timeout"          # best_effort | wait_complete | timeout
    prefetch_timeout = "50ms"     # timeout: base budget ...
    prefetch_timeout_per_1k_tokens = "5ms"   # ... plus this per 1,000 tokens

    [[tiers]]
    kind = "device"
    capacity = "2GiB"

    [[tiers]]
    kind = "cpu"
    capacity = "8GiB"
    eviction = "lru"

    [[tiers]]
    kind = "disk"
    capacity = "100GiB"
    path = "/var/cache/kvtier"
    eviction = "arc"
    direct_io = false

Sizes take binary (``KiB``, ``MiB``, ``GiB``, ``TiB``) or decimal (``KB``,
``MB``, ``GB``, ``TB``) units, or plain bytes; durations ``us``, ``ms``, ``s``.
Every error is a :class:`~kvtier.errors.ConfigError` naming the key, the value
and what was expected; unknown keys are errors too (a typo never silently
falls back to a default).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

import attrs

from kvtier.config_redis import REDIS_KEYS, RedisOptions, parse_redis_options, reject_password
from kvtier.config_units import parse_duration, parse_size
from kvtier.errors import ConfigError
from kvtier.hashing import HASH_ALGORITHMS
from kvtier.policies.base import EVICTION_POLICIES
from kvtier.policies.prefetch import PREFETCH_POLICIES
from kvtier.tiers.base import BlockLayout
from kvtier.tiers.disk import DiskTier

__all__ = [
    "KvtierConfig",
    "OffloadConfig",
    "TierConfig",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
]

TierKind = Literal["device", "cpu", "disk", "redis"]
TIER_KINDS: Final = ("device", "cpu", "disk", "redis")
WRITE_MODES: Final = ("eager", "lazy", "selective")


@attrs.frozen
class TierConfig:
    """One tier of the stack.

    Attributes:
        kind: ``"device"``, ``"cpu"``, ``"disk"`` or ``"redis"``.
        capacity_bytes: The tier's budget.
        eviction: Eviction policy name (lower tiers).
        path: Directory of a disk tier (``None``: ``kvtier replay`` uses a
            temporary directory).
        direct_io: Disk tier: ``O_DIRECT``.
        pin_memory: CPU tier: pinned host memory (``None``: when CUDA is present).
        max_workers: Disk tier: worker threads.
        model: Disk tier: separates models of equal layouts (see
            :class:`~kvtier.tiers.disk.DiskTier`).
        redis: Redis tier: connection and key options.
    """

    kind: TierKind
    capacity_bytes: int
    eviction: str = "lru"
    path: Path | None = None
    direct_io: bool = False
    pin_memory: bool | None = None
    max_workers: int = 4
    redis: RedisOptions | None = None
    model: str = ""


@attrs.frozen
class OffloadConfig:
    """How blocks move between tiers.

    Attributes:
        write_mode: ``"eager"``, ``"lazy"`` or ``"selective"``.
        hash: Block hash algorithm.
        hash_seed: The root hash's seed (see :func:`kvtier.hashing.root_hash`):
            processes with the same algorithm and seed compute the same block
            hashes. None: a fixed default seed, except for ``xxhash``, whose
            root is then drawn at random per process, so blocks kept on disk
            or in Redis are never found by another process.
        prefetch: ``"best_effort"``, ``"wait_complete"`` or ``"timeout"``.
        prefetch_timeout: Timeout policy: base budget in seconds.
        prefetch_timeout_per_1k_tokens: Timeout policy: seconds added per
            1,000 prompt tokens.
        lazy_free_target: Lazy mode: device blocks kept safe to evict.
        selective_min_hits: Selective mode: hits before a block is stored.
        max_probe_blocks: Most blocks a lookup asks shared tiers (Redis) about,
            for blocks other engines stored; 0 turns the probes off.
        flush_on_close: Copy the CPU tier's blocks into the tier below when
            the offload manager closes cleanly (see
            :mod:`kvtier.offload.flush`).
        spill_stores: Eager and selective modes: store the blocks the first
            lower tier has no room for into the next tier down with room
            instead of dropping them (see :mod:`kvtier.offload.stores`);
            None (the key left out): unless ``prefetch`` is ``best_effort``.
    """

    write_mode: str = "eager"
    hash: str = "sha256"
    hash_seed: str | None = None
    prefetch: str = "best_effort"
    prefetch_timeout: float = 0.05
    prefetch_timeout_per_1k_tokens: float = 0.005
    lazy_free_target: int = 32
    selective_min_hits: int = 2
    max_probe_blocks: int = 256
    flush_on_close: bool = False
    spill_stores: bool | None = None


@attrs.frozen
class KvtierConfig:
    """A whole configuration.

    Attributes:
        layout: The KV block layout.
        tiers: The stack, fastest first (the device first when present).
        offload: Movement settings.
    """

    layout: BlockLayout
    tiers: tuple[TierConfig, ...]
    offload: OffloadConfig = OffloadConfig()

    def blocks_of(self, tier: TierConfig) -> int:
        """How many blocks of this layout fit in ``tier``'s capacity."""
        return tier.capacity_bytes // _bytes_per_block(self.layout, tier.kind)


def _bytes_per_block(layout: BlockLayout, kind: str) -> int:
    """The room one block takes in a tier: a disk block's file adds a trailer and padding."""
    if kind == "disk":
        return DiskTier.bytes_per_block(layout)
    return layout.block_bytes


def _table(value: object, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        # Its type only: a misplaced value may be a URL holding a password.
        raise ConfigError(f"{key}: expected a table, got a value of type {type(value).__name__}")
    return value


def _check_keys(table: Mapping[str, Any], allowed: tuple[str, ...], key: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{key}: unknown key(s) {', '.join(unknown)}; valid keys are: {', '.join(allowed)}"
        )


def _choice(
    table: Mapping[str, Any], name: str, valid: tuple[str, ...], default: str, key: str
) -> str:
    value = table.get(name, default)
    if value not in valid:
        raise ConfigError(f"{key}.{name}: {value!r} is not one of: {', '.join(valid)}")
    return str(value)


def _integer(table: Mapping[str, Any], name: str, default: int, key: str, minimum: int = 1) -> int:
    value = table.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}.{name}: {value!r} is not an integer >= {minimum}")
    return value


def _boolean(table: Mapping[str, Any], name: str, default: bool | None, key: str) -> bool | None:
    value = table.get(name, default)
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{key}.{name}: {value!r} is not true or false")
    return value


def _model(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}.model: {value!r} is not a string")
    return value


def _seed(value: object) -> str | None:
    if value is None or (isinstance(value, str) and value):
        return value
    raise ConfigError(f"offload.hash_seed: {value!r} is not a non-empty string")


def _layout(table: Mapping[str, Any]) -> BlockLayout:
    fields = ("num_layers", "block_size", "num_kv_heads", "head_size", "dtype")
    _check_keys(table, fields, "layout")
    missing = [name for name in fields[:4] if name not in table]
    if missing:
        raise ConfigError(f"layout: missing key(s) {', '.join(missing)}")
    layers, block_size, heads, head_size = (_integer(table, n, 0, "layout") for n in fields[:4])
    try:
        return BlockLayout(layers, block_size, heads, head_size, table.get("dtype", "float16"))
    except (ValueError, TypeError, ConfigError) as exc:
        raise ConfigError(f"layout.dtype: {table.get('dtype')!r}: {exc}") from exc


_TIER_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "device": ("kind", "capacity"),
    "cpu": ("kind", "capacity", "eviction", "pin_memory"),
    "disk": ("kind", "capacity", "eviction", "path", "direct_io", "max_workers", "model"),
    "redis": ("kind", "capacity", "eviction", *REDIS_KEYS),
}
"""The keys each kind of tier takes (a key another kind takes would be ignored)."""


def _tier(table: Mapping[str, Any], index: int) -> TierConfig:
    key = f"tiers[{index}]"
    missing = [name for name in ("kind", "capacity") if name not in table]
    if missing:
        raise ConfigError(f"{key}: missing key(s) {', '.join(missing)}")
    kind = _choice(table, "kind", TIER_KINDS, "", key)
    if kind == "redis":
        reject_password(table, key)
    _check_keys(table, _TIER_KEYS[kind], f"{key} ({kind} tier)")
    eviction = _choice(table, "eviction", tuple(sorted(EVICTION_POLICIES)), "lru", key)
    path = table.get("path")
    if path is not None and (not isinstance(path, str) or not path.strip()):
        raise ConfigError(f"{key}.path: a disk tier's path is a directory name, got {path!r}")
    return TierConfig(
        kind,  # type: ignore[arg-type]
        parse_size(table["capacity"], key=f"{key}.capacity"),
        eviction,
        Path(path) if isinstance(path, str) else None,
        bool(_boolean(table, "direct_io", False, key)),
        _boolean(table, "pin_memory", None, key),
        _integer(table, "max_workers", 4, key),
        parse_redis_options(table, key) if kind == "redis" else None,
        _model(table.get("model", ""), key) if kind == "disk" else "",
    )


_IGNORED_BY: Final = {
    "prefetch_timeout": ("prefetch", ("best_effort", "wait_complete"), "best_effort"),
    "prefetch_timeout_per_1k_tokens": ("prefetch", ("best_effort", "wait_complete"), "best_effort"),
    "lazy_free_target": ("write_mode", ("eager", "selective"), "eager"),
    "selective_min_hits": ("write_mode", ("eager", "lazy"), "eager"),
    "spill_stores": ("write_mode", ("lazy",), "eager"),
}
"""``[offload]`` keys that some choices of another key never read: ``(key, choices, default)``.

(A prefetch policy registered by a plug-in is given the timeout keys.)
"""


def _offload(table: Mapping[str, Any]) -> OffloadConfig:
    allowed = (
        "write_mode",
        "hash",
        "hash_seed",
        "prefetch",
        "prefetch_timeout",
        "prefetch_timeout_per_1k_tokens",
        "lazy_free_target",
        "selective_min_hits",
        "max_probe_blocks",
        "flush_on_close",
        "spill_stores",
    )
    _check_keys(table, allowed, "offload")
    offload = OffloadConfig(
        _choice(table, "write_mode", WRITE_MODES, "eager", "offload"),
        _choice(table, "hash", tuple(sorted(HASH_ALGORITHMS)), "sha256", "offload"),
        _seed(table.get("hash_seed")),
        _choice(table, "prefetch", tuple(PREFETCH_POLICIES), "best_effort", "offload"),
        parse_duration(table.get("prefetch_timeout", 0.05), key="offload.prefetch_timeout"),
        parse_duration(
            table.get("prefetch_timeout_per_1k_tokens", 0.005),
            key="offload.prefetch_timeout_per_1k_tokens",
        ),
        _integer(table, "lazy_free_target", 32, "offload"),
        _integer(table, "selective_min_hits", 2, "offload"),
        _integer(table, "max_probe_blocks", 256, "offload", minimum=0),
        bool(_boolean(table, "flush_on_close", False, "offload")),
        _boolean(table, "spill_stores", None, "offload"),
    )
    for name, (option, ignoring, default) in _IGNORED_BY.items():
        chosen = table.get(option, default)
        if name in table and chosen in ignoring:
            raise ConfigError(
                f"offload.{name}: {option} = {chosen!r}"
                + ("" if option in table else " (the default)")
                + " never reads it"
            )
    return offload


def parse_config(data: Mapping[str, Any]) -> KvtierConfig:
    """Validate a parsed TOML document into a :class:`KvtierConfig`.

    Raises:
        ConfigError: A missing, unknown or bad key (the message names it).
    """
    _check_keys(data, ("layout", "offload", "tiers"), "config")
    if "layout" not in data:
        raise ConfigError("config: missing the [layout] table")
    layout = _layout(_table(data["layout"], "layout"))
    tiers_value = data.get("tiers")
    if not isinstance(tiers_value, list) or not tiers_value:
        raise ConfigError("config: needs at least one [[tiers]] entry")
    tiers = tuple(_tier(_table(t, f"tiers[{i}]"), i) for i, t in enumerate(tiers_value))
    kinds = [tier.kind for tier in tiers]
    if "device" in kinds[1:]:
        raise ConfigError("tiers: the device tier, when given, must be the first")
    lower = [tier for tier in tiers if tier.kind != "device"]
    if not lower:
        raise ConfigError("tiers: needs at least one lower tier (cpu, disk or redis)")
    for index, tier in enumerate(tiers):
        room = _bytes_per_block(layout, tier.kind)
        if tier.capacity_bytes < room:
            what = "block file" if tier.kind == "disk" else "block"
            raise ConfigError(
                f"tiers[{index}].capacity: {tier.capacity_bytes} bytes hold no {what} of "
                f"{room} bytes"
            )
    offload = _offload(_table(data.get("offload", {}), "offload"))
    kinds = [tier.kind for tier in lower]
    if offload.flush_on_close and not any(
        kind == "cpu" and set(kinds[index + 1 :]) - {"cpu"} for index, kind in enumerate(kinds)
    ):
        raise ConfigError(
            "offload.flush_on_close: no cpu tier has a disk or redis tier below it to flush into"
        )
    return KvtierConfig(layout, tiers, offload)


def load_config(path: str | Path) -> KvtierConfig:
    """Read and validate a TOML file.

    Raises:
        ConfigError: The file is not valid TOML or not a valid configuration.
        OSError: The file cannot be read.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (a TOML file is UTF-8)") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except ValueError as exc:  # an integer past Python's digit limit (4,300 by default)
        raise ConfigError(f"{path}: a value is out of range: {exc}") from exc
    return parse_config(data)
