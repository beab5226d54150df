"""Chained block hashes.

A block's hash covers its parent's hash, its token ids and its extra keys
(:mod:`kvtier.extra_keys`), so equal hashes mean equal prefixes. The first
block's parent is a *root hash* derived from a seed.

Algorithms, chosen by name:

``sha256`` (default)
    SHA-256 over a fixed binary layout: ``parent || u32 n || n x i64 tokens ||
    CBOR(extra keys)`` (little endian; the extra-keys part is empty for plain
    blocks). Collision resistant and fast: the plain-token path packs the
    tokens of many blocks with one ``struct.pack`` call and never pickles.
``sha256_cbor``
    SHA-256 over canonical CBOR of ``[parent, tokens, extra keys or null]``:
    slower, but any language with a CBOR library reproduces it.
``xxhash``
    xxh3-128 over the same binary layout as ``sha256``: the fastest, not
    collision resistant. Without an explicit seed its root hash is random per
    process (a :class:`RandomRootHashWarning` says so), so hashes cannot be
    predicted across processes or shared between them.
"""

from __future__ import annotations

import hashlib
import operator
import os
import struct
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Final, NewType, Protocol, cast

import attrs
import cbor2
import xxhash

from kvtier.errors import InvalidRequestError, UnknownNameError
from kvtier.extra_keys import ExtraKeys

__all__ = [
    "DEFAULT_HASH_ALGORITHM",
    "HASH_ALGORITHMS",
    "BlockHash",
    "BlockHashWithGroupId",
    "HashAlgorithm",
    "RandomRootHashWarning",
    "get_block_hash",
    "get_group_id",
    "get_hash_algorithm",
    "hash_block_tokens",
    "make_block_hash_with_group_id",
    "root_hash",
]

BlockHash = NewType("BlockHash", bytes)
"""The digest of one block, chained over its prefix."""

BlockHashWithGroupId = NewType("BlockHashWithGroupId", bytes)
"""A block hash followed by its KV cache group id (4 bytes, big endian): the
key of the device prefix cache, so that two groups never share an entry."""

DEFAULT_HASH_ALGORITHM: Final = "sha256"
_DEFAULT_SEED: Final = b"kvtier"
_ROOT_DOMAIN: Final = b"kvtier.root\x00"
_GROUP_ID_BYTES: Final = 4


class RandomRootHashWarning(UserWarning):
    """The root hash is random for this process, so hashes are not portable."""


def make_block_hash_with_group_id(block_hash: BlockHash, group_id: int) -> BlockHashWithGroupId:
    """Append a KV cache group id to a block hash.

    Args:
        block_hash: The block's hash.
        group_id: The group, ``0 <= group_id < 2**32``.

    Returns:
        The prefix-cache key of the block in that group.
    """
    return BlockHashWithGroupId(block_hash + group_id.to_bytes(_GROUP_ID_BYTES, "big"))


def get_block_hash(key: BlockHashWithGroupId) -> BlockHash:
    """Return the block hash part of a prefix-cache key."""
    return BlockHash(key[:-_GROUP_ID_BYTES])


def get_group_id(key: BlockHashWithGroupId) -> int:
    """Return the KV cache group id part of a prefix-cache key."""
    return int.from_bytes(key[-_GROUP_ID_BYTES:], "big")


def _encode_tokens(tokens: Sequence[int]) -> bytes:
    """Pack token ids as little-endian signed 64-bit integers.

    ``struct.pack`` is the fastest stdlib packer for a list of Python ints
    (faster than ``array.array`` and than pickling the tuple).
    """
    try:
        return struct.pack(f"<{len(tokens)}q", *tokens)
    except struct.error as exc:
        raise InvalidRequestError(f"token ids must be integers that fit in 64 bits: {exc}") from exc


class HashAlgorithm(Protocol):
    """How block hashes are computed. Implementations are registered by name."""

    @property
    def name(self) -> str:
        """The algorithm's registered name."""
        ...

    def root(self, seed: bytes) -> BlockHash:
        """Derive the root hash (the first block's parent) from a seed."""
        ...

    def hash_block(
        self, parent: BlockHash, tokens: Sequence[int], extra: ExtraKeys | None
    ) -> BlockHash:
        """Hash one block given its parent's hash, its tokens and extra keys."""
        ...

    def hash_run(
        self, parent: BlockHash, tokens: Sequence[int], block_size: int
    ) -> list[BlockHash]:
        """Hash consecutive plain blocks (no extra keys) chained from ``parent``.

        ``len(tokens)`` is a multiple of ``block_size``.
        """
        ...


@attrs.frozen
class _BinaryHash:
    """A digest over kvtier's binary block layout (``sha256``, ``xxhash``).

    ``constructor`` is a hashlib-style constructor (``constructor(data).digest()``)
    used on the hot path instead of ``digest`` when given: it saves a Python
    call per block.
    """

    name: str
    digest: Callable[[bytes], BlockHash]
    constructor: Callable[[bytes], Any] | None = None

    def root(self, seed: bytes) -> BlockHash:
        return self.digest(_ROOT_DOMAIN + seed)

    def hash_block(
        self, parent: BlockHash, tokens: Sequence[int], extra: ExtraKeys | None
    ) -> BlockHash:
        data = parent + struct.pack("<I", len(tokens)) + _encode_tokens(tokens)
        if extra is not None:
            data += cbor2.dumps(extra.to_cbor(), canonical=True)
        return self.digest(data)

    def hash_run(
        self, parent: BlockHash, tokens: Sequence[int], block_size: int
    ) -> list[BlockHash]:
        packed = _encode_tokens(tokens)
        header = struct.pack("<I", block_size)
        stride = block_size * 8
        out: list[BlockHash] = []
        append = out.append
        constructor = self.constructor
        if constructor is not None:
            for offset in range(0, len(packed), stride):
                parent = constructor(parent + header + packed[offset : offset + stride]).digest()
                append(parent)
            return out
        digest = self.digest
        for offset in range(0, len(packed), stride):
            parent = digest(parent + header + packed[offset : offset + stride])
            append(parent)
        return out


@attrs.frozen
class _CborHash:
    """SHA-256 over canonical CBOR (``sha256_cbor``)."""

    name: str = "sha256_cbor"

    def root(self, seed: bytes) -> BlockHash:
        return _sha256(cbor2.dumps(["kvtier.root", seed], canonical=True))

    def hash_block(
        self, parent: BlockHash, tokens: Sequence[int], extra: ExtraKeys | None
    ) -> BlockHash:
        ids: list[object] = list(tokens)  # engines pass what they have, not always ints
        for index, item in enumerate(ids):
            token: int | None = item if type(item) is int else None
            if token is None:  # a bool or another integer-like: as struct packing takes it
                try:
                    token = operator.index(item)  # type: ignore[arg-type]
                except TypeError:
                    token = None
                ids[index] = token
            if token is None or not -(2**63) <= token < 2**63:
                raise InvalidRequestError(
                    f"token ids must be integers that fit in 64 bits, got {tokens[index]!r}"
                )
        payload = [parent, ids, None if extra is None else extra.to_cbor()]
        return _sha256(cbor2.dumps(payload, canonical=True))

    def hash_run(
        self, parent: BlockHash, tokens: Sequence[int], block_size: int
    ) -> list[BlockHash]:
        out: list[BlockHash] = []
        for offset in range(0, len(tokens), block_size):
            parent = self.hash_block(parent, tokens[offset : offset + block_size], None)
            out.append(parent)
        return out


def _sha256_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


_sha256 = cast(Callable[[bytes], BlockHash], _sha256_digest)
_xxh3_128 = cast(Callable[[bytes], BlockHash], xxhash.xxh3_128_digest)

HASH_ALGORITHMS: Final[dict[str, HashAlgorithm]] = {
    "sha256": _BinaryHash("sha256", _sha256, hashlib.sha256),
    "sha256_cbor": _CborHash(),
    "xxhash": _BinaryHash("xxhash", _xxh3_128),
}
"""Registered hash algorithms by name."""

_COLLISION_PRONE: Final = frozenset({"xxhash"})
_process_roots: dict[str, BlockHash] = {}
_process_roots_lock = threading.Lock()


def get_hash_algorithm(name: str | HashAlgorithm) -> HashAlgorithm:
    """Look up a hash algorithm by name.

    Args:
        name: A registered name (see :data:`HASH_ALGORITHMS`), or an algorithm
            object, which is returned as is.

    Returns:
        The algorithm.

    Raises:
        UnknownNameError: No algorithm has that name.
    """
    if not isinstance(name, str):
        return name
    try:
        return HASH_ALGORITHMS[name]
    except KeyError:
        raise UnknownNameError("hash algorithm", name, list(HASH_ALGORITHMS)) from None


def root_hash(algorithm: str | HashAlgorithm, seed: str | bytes | None = None) -> BlockHash:
    """Return the root hash: the parent of every sequence's first block.

    Args:
        algorithm: The hash algorithm or its name.
        seed: Any string or bytes. Equal seeds give equal roots, so processes
            that share a seed (and algorithm) share hashes. ``None`` means a
            fixed default seed, except for ``xxhash``, where it means a root
            drawn at random once per process.

    Returns:
        The root hash.

    Warns:
        RandomRootHashWarning: ``xxhash`` without a seed.
    """
    algo = get_hash_algorithm(algorithm)
    if seed is None:
        if algo.name not in _COLLISION_PRONE:
            return algo.root(_DEFAULT_SEED)
        warnings.warn(
            f"hash algorithm {algo.name!r} without a seed uses a root hash drawn at random "
            "for this process: block hashes will not match other processes. Pass a seed "
            "to share them.",
            RandomRootHashWarning,
            stacklevel=2,
        )
        with _process_roots_lock:
            if algo.name not in _process_roots:
                _process_roots[algo.name] = algo.root(os.urandom(32))
            return _process_roots[algo.name]
    return algo.root(seed.encode() if isinstance(seed, str) else bytes(seed))


def hash_block_tokens(
    algorithm: str | HashAlgorithm,
    parent: BlockHash | None,
    tokens: Sequence[int],
    extra: ExtraKeys | None = None,
    *,
    seed: str | bytes | None = None,
) -> BlockHash:
    """Hash one block.

    Args:
        algorithm: The hash algorithm or its name.
        parent: The previous block's hash, or ``None`` for the first block
            (the root hash for ``seed`` is used).
        tokens: The block's token ids.
        extra: The block's extra keys, if any.
        seed: The root seed, used only when ``parent`` is ``None``.

    Returns:
        The block's hash.
    """
    algo = get_hash_algorithm(algorithm)
    if parent is None:
        parent = root_hash(algo, seed)
    return algo.hash_block(parent, tokens, extra)
