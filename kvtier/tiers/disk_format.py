"""The on-disk block format: the payload, then a verified trailer.

A block file is ``payload | trailer | key | zero padding``, the whole file a
multiple of :data:`ALIGN` (4 KiB) bytes. The trailer is ``magic "KVTB" | u16
version | u16 key length | u32 slot | u64 payload length | 16-byte layout
fingerprint | 16-byte xxh3-128 of the payload`` (little endian).

Why the metadata trails the payload: the payload starts at offset 0, so one
``preadv`` lands it straight in the destination row (and the trailer in a small
buffer), and with ``O_DIRECT`` both the payload offset and the file length are
aligned. The padding costs no disk space (file systems allocate whole 4 KiB
blocks anyway). xxh3-128 checksums at memory speed (about 90 GB/s here), so
verifying every read costs little; it detects torn and corrupted payloads, and
the fingerprint and key detect blocks of another model, layout or block.
"""

from __future__ import annotations

import struct
from typing import Final

import attrs
import xxhash

__all__ = [
    "ALIGN",
    "MAX_KEY_BYTES",
    "TRAILER",
    "BlockTrailer",
    "checksum",
    "checksum_stream",
    "decode_trailer",
    "encode_trailer",
    "file_bytes",
]

MAGIC: Final = b"KVTB"
VERSION: Final = 2
TRAILER: Final = struct.Struct("<4sHHIQ16s16s")
MAX_KEY_BYTES: Final = 64
ALIGN: Final = 4096


def checksum(payload: bytes | bytearray | memoryview) -> bytes:
    """xxh3-128 digest of the payload."""
    return xxhash.xxh3_128_digest(payload)


def checksum_stream() -> xxhash.xxh3_128:
    """An incremental :func:`checksum`: ``update`` it with the payload's pieces in order.

    Its ``digest()`` equals ``checksum`` of the pieces joined.
    """
    return xxhash.xxh3_128()


def file_bytes(payload_length: int, key_length: int) -> int:
    """Size of the file holding a payload of ``payload_length`` bytes under a key."""
    unpadded = payload_length + TRAILER.size + key_length
    return -(-unpadded // ALIGN) * ALIGN


@attrs.frozen
class BlockTrailer:
    """A decoded trailer.

    Attributes:
        slot: The slot the block was written to.
        key: The block's key.
        payload_length: Bytes of payload in front of the trailer.
        fingerprint: The layout fingerprint.
        digest: xxh3-128 of the payload.
    """

    slot: int
    key: bytes
    payload_length: int
    fingerprint: bytes
    digest: bytes


def encode_trailer(
    slot: int,
    key: bytes,
    fingerprint: bytes,
    payload: bytes | bytearray | memoryview,
    *,
    digest: bytes | None = None,
) -> bytes:
    """The trailer for ``payload``, key and padding included.

    ``len(payload) + len(result) == file_bytes(len(payload), len(key))``.
    ``digest`` is the payload's :func:`checksum` when the caller already
    computed it (as it wrote the payload); otherwise it is computed here.
    """
    if digest is None:
        digest = checksum(payload)
    body = TRAILER.pack(MAGIC, VERSION, len(key), slot, len(payload), fingerprint, digest) + key
    return body + bytes(file_bytes(len(payload), len(key)) - len(payload) - len(body))


def decode_trailer(data: bytes | bytearray | memoryview) -> BlockTrailer | None:
    """Parse the bytes after the payload; ``None`` unless a valid version-2 trailer.

    The padding after the key must be zeros and the whole must be exactly as
    long as :func:`file_bytes` says, so no stray byte goes unchecked.
    """
    if len(data) < TRAILER.size:
        return None
    magic, version, key_length, slot, length, fingerprint, digest = TRAILER.unpack_from(data)
    if magic != MAGIC or version != VERSION or not 0 < key_length <= MAX_KEY_BYTES:
        return None
    if length + len(data) != file_bytes(length, key_length):
        return None
    end = TRAILER.size + key_length
    if bytes(data[end:]) != bytes(len(data) - end):
        return None
    return BlockTrailer(slot, bytes(data[TRAILER.size : end]), length, fingerprint, digest)
