"""The on-disk block format: a verified header in front of the payload.

``magic "KVTB" | u16 version | u16 key length | u32 slot | u64 payload length |
16-byte layout fingerprint | 16-byte xxh3-128 of the payload | key | payload``
(little endian). xxh3-128 checksums at memory speed, so verifying every read
costs little; it detects torn and corrupted payloads, and the fingerprint and
key detect blocks of another model, layout or block.
"""

from __future__ import annotations

import struct
from typing import Final

import attrs
import xxhash

__all__ = ["HEADER", "BlockHeader", "checksum", "decode_header", "encode_header"]

MAGIC: Final = b"KVTB"
VERSION: Final = 1
HEADER: Final = struct.Struct("<4sHHIQ16s16s")
MAX_KEY_BYTES: Final = 64


def checksum(payload: bytes | bytearray | memoryview) -> bytes:
    """xxh3-128 digest of the payload."""
    return xxhash.xxh3_128_digest(payload)


@attrs.frozen
class BlockHeader:
    """A decoded header.

    Attributes:
        slot: The slot the block was written to.
        key: The block's key.
        payload_length: Bytes of payload that follow.
        fingerprint: The layout fingerprint.
        digest: xxh3-128 of the payload.
    """

    slot: int
    key: bytes
    payload_length: int
    fingerprint: bytes
    digest: bytes

    @property
    def size(self) -> int:
        """Bytes of header, key included."""
        return HEADER.size + len(self.key)


def encode_header(
    slot: int, key: bytes, fingerprint: bytes, payload: bytes | bytearray | memoryview
) -> bytes:
    """The header for ``payload`` (key included)."""
    return (
        HEADER.pack(MAGIC, VERSION, len(key), slot, len(payload), fingerprint, checksum(payload))
        + key
    )


def decode_header(data: bytes | bytearray | memoryview) -> BlockHeader | None:
    """Parse a header; ``None`` when it is not a valid version-1 header."""
    if len(data) < HEADER.size:
        return None
    magic, version, key_length, slot, length, fingerprint, digest = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION or key_length > MAX_KEY_BYTES:
        return None
    if len(data) < HEADER.size + key_length:
        return None
    key = bytes(data[HEADER.size : HEADER.size + key_length])
    return BlockHeader(slot, key, length, fingerprint, digest)
