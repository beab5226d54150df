"""A request's blocks in every KV cache group: what the prefix cache hands an engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, overload

import attrs

from kvtier.block import KVCacheBlock
from kvtier.errors import InvalidRequestError

__all__ = ["KVCacheBlocks", "require_blocks"]


@attrs.frozen
class KVCacheBlocks:
    """Blocks of one request, one sequence per KV cache group.

    Attributes:
        blocks: ``blocks[group_id]`` is the group's block list.
    """

    blocks: tuple[Sequence[KVCacheBlock], ...]

    def __add__(self, other: KVCacheBlocks) -> KVCacheBlocks:
        """Concatenate group by group."""
        return KVCacheBlocks(
            tuple([*a, *b] for a, b in zip(self.blocks, other.blocks, strict=True))
        )

    @overload
    def get_block_ids(self, allow_none: Literal[False] = False) -> tuple[list[int], ...]: ...

    @overload
    def get_block_ids(self, allow_none: bool) -> tuple[list[int], ...] | None: ...

    def get_block_ids(self, allow_none: bool = False) -> tuple[list[int], ...] | None:
        """Block ids, one list per group.

        Args:
            allow_none: Return ``None`` instead when every group is empty
                (vLLM's scheduler uses it to skip empty allocations).
        """
        if allow_none and not any(self.blocks):
            return None
        return tuple([block.block_id for block in group] for group in self.blocks)

    def get_unhashed_block_ids(self) -> list[int]:
        """Ids of the blocks (single group) that carry no hash yet.

        Raises:
            InvalidRequestError: There is more than one group.
        """
        if len(self.blocks) != 1:
            raise InvalidRequestError("get_unhashed_block_ids needs exactly one KV cache group")
        return [block.block_id for block in self.blocks[0] if block.block_hash is None]

    def new_empty(self) -> KVCacheBlocks:
        """Blocks with the same number of groups, all empty."""
        return KVCacheBlocks(tuple([] for _ in self.blocks))


def require_blocks(value: object, name: str) -> KVCacheBlocks:
    """``value`` if it is a :class:`KVCacheBlocks`.

    Raises:
        InvalidRequestError: It is not (a list of lists, say), naming ``name``.
    """
    if not isinstance(value, KVCacheBlocks):
        raise InvalidRequestError(f"{name} must be KVCacheBlocks, got {type(value).__name__}")
    return value
