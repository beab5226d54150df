"""Keys and values of the Redis tier: names, the verified value header, cluster slots.

**Key**: ``<prefix><namespace hex>:<block key hex>``. The *namespace* is 12
bytes of SHA-256 over the model name and the layout fingerprint (layers,
block size, KV heads, head size, dtype), so two models, layouts or block sizes
never share a key. The block key is the prefix-cache hash with its group id;
the cache salt is hashed into a sequence's first block and chained onward, so
tenants with different salts never share a key either.

**Value**: ``header | block key | payload``. The header is ``magic "KVTR" |
u16 version | u16 key length | u32 flags (0) | u64 payload length | 16-byte
namespace fingerprint | 16-byte xxh3-128 of the payload`` (little endian).
A read checks every field, the key and the checksum; anything else (a value
written by another model, a stale format, a buggy client, garbage) is a miss.

**Cluster**: a key's slot is CRC16-XMODEM of the key (or of its ``{hash
tag}``) modulo 16384, as Redis Cluster computes it. kvtier's keys carry no
hash tag (a prefix may not contain braces), so blocks spread over every slot
and node; a batch is split per node by the cluster pipeline, one round trip
per node.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import Final

import cbor2

from kvtier.errors import ConfigError
from kvtier.tiers.base import BlockKey, BlockLayout
from kvtier.tiers.disk_format import checksum

__all__ = [
    "HEADER",
    "MAGIC",
    "MODEL_WHY",
    "MAX_KEY_BYTES",
    "NUM_CLUSTER_SLOTS",
    "VERSION",
    "KeyFormat",
    "encode_header",
    "hash_slot",
    "max_value_bytes",
    "payload_offset",
    "slot_groups",
    "verify_value",
]

MAGIC: Final = b"KVTR"
VERSION: Final = 1
HEADER: Final = struct.Struct("<4sHHIQ16s16s")
MAX_KEY_BYTES: Final = 64
NUM_CLUSTER_SLOTS: Final = 16384

MODEL_WHY: Final = (
    "a shared store's names must say whose blocks they are: two models of one "
    "layout (a base model and its fine-tune) hash equal prompts to equal block "
    "keys and would read each other's KV bytes"
)
"""Why a Redis tier needs its model's name (error messages and docs)."""


class KeyFormat:
    """Builds the Redis names of one model and layout.

    Args:
        prefix: Put in front of every name (for example ``"kvtier:"``); no braces.
        layout: The block layout.
        model: The model's name (or any non-empty string that separates
            deployments): see :data:`MODEL_WHY`.
        rank: This worker's rank among ``world_size`` tensor- or
            pipeline-parallel workers: each holds its own shard of every
            block, under its own names.
        world_size: How many workers share the model (1: names without a rank).

    Raises:
        ConfigError: The prefix contains ``{`` or ``}`` (a hash tag would put
            every block on one cluster node) or is not a string; ``model`` is
            empty or not a string; ``rank`` is not in ``[0, world_size)``.
    """

    __slots__ = ("_head", "fingerprint", "namespace", "prefix")

    def __init__(
        self, prefix: str, layout: BlockLayout, model: str, rank: int = 0, world_size: int = 1
    ) -> None:
        if not isinstance(prefix, str) or "{" in prefix or "}" in prefix:
            raise ConfigError(f"prefix must be a string without braces, got {prefix!r}")
        if not isinstance(model, str) or not model:
            raise ConfigError(
                f"model must name the model (a non-empty string), got {model!r}; {MODEL_WHY}"
            )
        for label, value in (("rank", rank), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{label} must be an integer, got {value!r}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}")
        fields: list[object] = ["kvtier.redis.namespace.v1", model, layout.fingerprint()]
        if world_size > 1:  # a shard of every block: ranks never read each other's
            fields += [rank, world_size]
        digest = hashlib.sha256(cbor2.dumps(fields, canonical=True)).digest()
        self.prefix = prefix
        self.fingerprint: bytes = digest[:16]
        """16 bytes stored in every value's header."""
        self.namespace: str = digest[:12].hex()
        """The hex part of every name that identifies model and layout."""
        self._head = f"{prefix}{self.namespace}:".encode()

    def name(self, key: BlockKey) -> bytes:
        """The Redis name of ``key``."""
        return self._head + key.hex().encode()

    def pattern(self) -> bytes:
        """A ``SCAN MATCH`` pattern for every name of this model and layout."""
        escaped = "".join("\\" + c if c in "*?[]\\" else c for c in self._head.decode())
        return escaped.encode() + b"*"

    def key_of(self, name: bytes) -> BlockKey | None:
        """The block key a name stands for, or None when it is not one of ours."""
        if not name.startswith(self._head):
            return None
        text = name[len(self._head) :]
        try:
            key = bytes.fromhex(text.decode("ascii"))
        except ValueError:
            return None
        if key.hex().encode() != text:  # upper case, spaces: not a name kvtier writes
            return None
        return key if 0 < len(key) <= MAX_KEY_BYTES else None


def max_value_bytes(payload_length: int) -> int:
    """The largest value a block of ``payload_length`` bytes takes (the longest key)."""
    return HEADER.size + MAX_KEY_BYTES + payload_length


def payload_offset(key: BlockKey) -> int:
    """Where the payload starts in the value of ``key``."""
    return HEADER.size + len(key)


def encode_header(key: BlockKey, fingerprint: bytes, payload: bytes | memoryview) -> bytes:
    """``header | key`` for ``payload`` (what precedes it in the value)."""
    digest = checksum(payload)
    return HEADER.pack(MAGIC, VERSION, len(key), 0, len(payload), fingerprint, digest) + key


def verify_value(
    value: bytes | memoryview, key: BlockKey, fingerprint: bytes, payload_length: int
) -> memoryview | None:
    """The payload of a value that is exactly ``key``'s block, else None.

    Checks length, magic, version, flags, key, fingerprint and checksum.
    """
    offset = payload_offset(key)
    if len(value) != offset + payload_length:
        return None
    view = memoryview(value)
    magic, version, key_length, flags, length, stored_fp, digest = HEADER.unpack_from(view)
    valid = (
        magic == MAGIC
        and version == VERSION
        and flags == 0
        and key_length == len(key)
        and length == payload_length
        and stored_fp == fingerprint
        and view[HEADER.size : offset] == key
    )
    if not valid:
        return None
    payload = view[offset:]
    return payload if checksum(payload) == digest else None


def _crc16(data: bytes) -> int:
    """CRC16-XMODEM (polynomial 0x1021, initial 0), the Redis Cluster key CRC."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def hash_slot(name: bytes) -> int:
    """The Redis Cluster slot of ``name``, honouring a non-empty ``{hash tag}``."""
    start = name.find(b"{")
    if start >= 0:
        end = name.find(b"}", start + 1)
        if end > start + 1:
            name = name[start + 1 : end]
    return _crc16(name) % NUM_CLUSTER_SLOTS


def slot_groups(names: Sequence[bytes]) -> dict[int, list[int]]:
    """Batch positions grouped by cluster slot, positions ascending in each group."""
    groups: dict[int, list[int]] = {}
    for index, name in enumerate(names):
        groups.setdefault(hash_slot(name), []).append(index)
    return groups
