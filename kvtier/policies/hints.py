"""Where a block sits in its request's chain: the optional hint a prefix-aware policy receives.

A block's key depends on every block before it, so the blocks of a prompt
form a *chain* (head first) and the blocks of all prompts a prefix tree: a
prefix lookup stops at the first block a tier lacks, so evicting a block
wastes every cached block below it. :class:`BlockHint` tells a policy where
a block sits in the chain of the request it is stored or read for; a policy
opts in by implementing :class:`~kvtier.policies.base.PrefixAwarePolicy`.
A hint may also carry the request's *tag*: a label of its kind that the
engine knows when the request arrives (an application or API key, a tenant,
a bucket of ``max_tokens``), under which a policy can learn how often the
prompts of that kind come back (see :mod:`kvtier.policies.class_lru`).
"""

from __future__ import annotations

from typing import TypeGuard

import attrs

from kvtier.errors import ConfigError
from kvtier.tiers.base import BlockKey

__all__ = ["BlockHint", "Tag", "is_tag"]

Tag = int | str
"""A request's kind as the engine labels it (see :attr:`BlockHint.tag`)."""


def is_tag(value: object) -> TypeGuard[Tag | None]:
    """Whether ``value`` may be a tag: an int (not a bool), a str, or None."""
    return value is None or (isinstance(value, (int, str)) and not isinstance(value, bool))


def _depth(hint: BlockHint, _: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"a block hint's depth must be an integer >= 0, got {value!r}")


def _length(hint: BlockHint, _: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= hint.depth:
        raise ConfigError(
            f"a block hint's length must be an integer > depth ({hint.depth}), got {value!r}"
        )


def _tag(hint: BlockHint, _: attrs.Attribute[int | str | None], value: int | str | None) -> None:
    if not is_tag(value):
        raise ConfigError(f"a block hint's tag must be an int, a str or None, got {value!r}")


@attrs.frozen(slots=True)
class BlockHint:
    """A block's place in the chain of the request it is stored (or read) for.

    Attributes:
        depth: Its position in the chain: 0 for the first block of the prompt.
        length: Blocks in the chain as far as it is known when the hint is made
            (``depth < length``); a block with ``depth == length - 1`` is the
            chain's current *tail*: the deepest block, shared with no later
            block of the request (yet).
        parent: The key of the block before it in the chain (None at depth 0
            or when unknown).
        tag: The request's kind, as the engine labels it (None: untagged).
            Equal tags mean "the same kind of request"; the value is opaque.
    """

    depth: int = attrs.field(validator=_depth)
    length: int = attrs.field(validator=_length)
    parent: BlockKey | None = None
    tag: int | str | None = attrs.field(default=None, validator=_tag)

    @property
    def is_tail(self) -> bool:
        """Whether the block is the last known block of its chain."""
        return self.depth == self.length - 1
