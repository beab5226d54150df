"""Incremental block hashing of requests.

:class:`BlockHasher` hashes a request's full blocks as its tokens grow: the
prompt's when the request is created, then each block that decode fills. It
takes the plain-token fast path (:meth:`HashAlgorithm.hash_run
<kvtier.hashing.HashAlgorithm.hash_run>`, one token-packing call for all new
blocks) whenever blocks carry no extra keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from kvtier.errors import ConfigError
from kvtier.extra_keys import ExtraKeys, MultiModalFeature, block_extra_keys
from kvtier.hashing import (
    DEFAULT_HASH_ALGORITHM,
    BlockHash,
    HashAlgorithm,
    get_hash_algorithm,
    root_hash,
)

__all__ = ["BlockHasher", "HashableRequest"]


class HashableRequest(Protocol):
    """What :class:`BlockHasher` reads from a request."""

    @property
    def all_token_ids(self) -> Sequence[int]:
        """Prompt and output tokens so far."""
        ...

    @property
    def block_hashes(self) -> Sequence[BlockHash]:
        """Hashes of the full blocks hashed so far."""
        ...

    @property
    def lora_name(self) -> str | None:
        """The LoRA adapter, if any."""
        ...

    @property
    def cache_salt(self) -> str | None:
        """The tenant's cache salt, if any."""
        ...

    @property
    def mm_features(self) -> Sequence[MultiModalFeature]:
        """Multimodal features, sorted by offset."""
        ...


class BlockHasher:
    """Computes the hashes of a request's full blocks, incrementally.

    Call it after tokens are appended: it returns the hashes of the blocks that
    became full since the last call (``request.block_hashes`` tells where that
    was), and the caller extends ``request.block_hashes`` with them.

    Args:
        block_size: Tokens per block (> 0).
        algorithm: A name from :data:`HASH_ALGORITHMS`.
        seed: The root seed; see :func:`root_hash`.

    Raises:
        ConfigError: ``block_size`` is not positive.
        UnknownNameError: ``algorithm`` is not registered.
    """

    __slots__ = ("algorithm", "block_size", "root")

    def __init__(
        self,
        block_size: int,
        algorithm: str | HashAlgorithm = DEFAULT_HASH_ALGORITHM,
        seed: str | bytes | None = None,
    ) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ConfigError(f"block_size must be a positive integer, got {block_size!r}")
        self.block_size = block_size
        self.algorithm = get_hash_algorithm(algorithm)
        self.root = root_hash(self.algorithm, seed)

    def __repr__(self) -> str:
        return f"BlockHasher(block_size={self.block_size}, algorithm={self.algorithm.name!r})"

    def __call__(self, request: HashableRequest) -> list[BlockHash]:
        """Return the hashes of ``request``'s full blocks that have none yet."""
        size = self.block_size
        tokens = request.all_token_ids
        start = len(request.block_hashes)
        stop = len(tokens) // size
        if stop <= start:
            return []
        algo = self.algorithm
        parent = request.block_hashes[-1] if start else self.root
        lora, salt, features = request.lora_name, request.cache_salt, request.mm_features
        if not lora and not features:
            if start or not salt:
                return algo.hash_run(parent, tokens[start * size : stop * size], size)
            first = algo.hash_block(parent, tokens[:size], ExtraKeys(cache_salt=salt))
            return [first, *algo.hash_run(first, tokens[size : stop * size], size)]
        out: list[BlockHash] = []
        for index in range(start, stop):
            begin = index * size
            extra = block_extra_keys(
                begin, begin + size, lora_name=lora, mm_features=features, cache_salt=salt
            )
            parent = algo.hash_block(parent, tokens[begin : begin + size], extra)
            out.append(parent)
        return out
