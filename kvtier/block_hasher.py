"""Incremental block hashing of requests.

:class:`BlockHasher` hashes a request's full blocks as its tokens grow: the
prompt's when the request is created, then each block that decode fills. It
takes the plain-token fast path (:meth:`HashAlgorithm.hash_run
<kvtier.hashing.HashAlgorithm.hash_run>`, one token-packing call for all new
blocks) whenever blocks carry no extra keys. Multimodal features are found
with a :class:`~kvtier.extra_keys.FeatureCursor`, kept per request between
calls, so hashing costs O(blocks + features) rather than their product.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Protocol

from kvtier.errors import ConfigError
from kvtier.extra_keys import (
    ExtraKeys,
    FeatureCursor,
    MultiModalFeature,
    assemble_extra_keys,
    block_extra_keys,
)
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

    For a request with multimodal features it keeps, while the request lives,
    a :class:`~kvtier.extra_keys.FeatureCursor` where the last call left off
    (for requests that can be weakly referenced and hashed, and whose
    ``mm_features`` is a tuple, the same one on every call), so later calls do
    not walk the features again. A cursor that does not fit the call (other
    features, or ``block_hashes`` not where it stopped) is rebuilt. Features
    not sorted by offset are scanned per block, as before.

    Args:
        block_size: Tokens per block (> 0).
        algorithm: A name from :data:`HASH_ALGORITHMS`.
        seed: The root seed; see :func:`root_hash`.

    Raises:
        ConfigError: ``block_size`` is not positive.
        UnknownNameError: ``algorithm`` is not registered.
    """

    __slots__ = ("_cursors", "algorithm", "block_size", "root")

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
        self._cursors: weakref.WeakKeyDictionary[HashableRequest, FeatureCursor] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:
        return f"BlockHasher(block_size={self.block_size}, algorithm={self.algorithm.name!r})"

    def __getstate__(self) -> dict[str, object]:
        # Kept cursors stay behind: a copy or an unpickled hasher starts without.
        return {"algorithm": self.algorithm, "block_size": self.block_size, "root": self.root}

    def __setstate__(self, state: dict[str, object] | tuple[None, dict[str, object]]) -> None:
        if isinstance(state, tuple):  # pickled before __getstate__ existed: (None, slots)
            state = state[1]
        for name, value in state.items():
            object.__setattr__(self, name, value)
        self._cursors = weakref.WeakKeyDictionary()

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
        cursor = self._cursor(request, features, start * size) if features else None
        for index in range(start, stop):
            begin = index * size
            if cursor is not None:
                mm = cursor.overlapping(begin, begin + size)
                extra = assemble_extra_keys(begin, mm, lora_name=lora, cache_salt=salt)
            else:  # no features, or unsorted ones
                extra = block_extra_keys(
                    begin, begin + size, lora_name=lora, mm_features=features, cache_salt=salt
                )
            parent = algo.hash_block(parent, tokens[begin : begin + size], extra)
            out.append(parent)
        return out

    def _cursor(
        self, request: HashableRequest, features: Sequence[MultiModalFeature], position: int
    ) -> FeatureCursor | None:
        """A feature cursor for ``request`` at token ``position``: the kept one if it fits."""
        keep = type(features) is tuple  # a list could change between calls
        if keep:
            try:
                cursor = self._cursors.get(request)
            except TypeError:  # not hashable, or no weak references
                keep = False
            else:
                if (
                    cursor is not None
                    and cursor.features is features
                    and cursor.position == position
                ):
                    return cursor
        cursor = FeatureCursor.create(features, position)
        if keep and cursor is not None:
            self._cursors[request] = cursor
        return cursor
