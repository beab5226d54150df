"""Extra keys: what besides its tokens makes a block's KV different.

Two blocks with the same tokens hold different KV when they were computed with
a different LoRA adapter, when image (or audio…) embeddings stand in place of
placeholder tokens, or when the operator separates tenants with a cache salt.
Those inputs become a block's *extra keys* and are folded into its hash:

- the LoRA name, on every block;
- every multimodal feature that overlaps the block, as its identifier and its
  offset relative to the block's first token (negative when the feature began
  in an earlier block);
- the cache salt, on the first block only (the chain carries it onward).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import attrs

from kvtier.errors import InvalidRequestError

__all__ = ["ExtraKeys", "MultiModalFeature", "as_int", "block_extra_keys", "non_negative"]


def as_int(value: object) -> object:
    """Convert (for attrs) an integral value (a NumPy integer, say) to ``int``; others as given.

    Bools and non-integral values pass through unchanged, for the validator
    to refuse with a typed error.
    """
    if isinstance(value, bool):
        return value
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return value


def non_negative(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    """Validate (for attrs) an ``int`` (not a bool) >= 0, else :class:`InvalidRequestError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequestError(f"{attribute.name} must be an integer >= 0, got {value!r}")


def _positive(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidRequestError(f"{attribute.name} must be an integer > 0, got {value!r}")


@attrs.frozen
class MultiModalFeature:
    """A run of placeholder tokens whose KV comes from a multimodal input.

    Attributes:
        identifier: A content hash of the input (for example of the image
            bytes). Equal identifiers must mean equal embeddings.
        offset: Index of the feature's first placeholder token in the prompt.
        length: Number of placeholder tokens.
    """

    identifier: str
    offset: int = attrs.field(converter=as_int, validator=non_negative)
    length: int = attrs.field(converter=as_int, validator=_positive)

    @property
    def end(self) -> int:
        """Index one past the feature's last token."""
        return self.offset + self.length


@attrs.frozen
class ExtraKeys:
    """The extra keys of one block.

    Attributes:
        lora_name: The LoRA adapter's name, or ``None``.
        mm: ``(identifier, offset relative to the block start)`` for every
            multimodal feature overlapping the block, in prompt order.
        cache_salt: The tenant's cache salt (first block only), or ``None``.
    """

    lora_name: str | None = None
    mm: tuple[tuple[str, int], ...] = ()
    cache_salt: str | None = None

    def to_cbor(self) -> list[Any]:
        """The keys as a CBOR-ready list: ``[lora, [[id, offset], ...], salt]``."""
        return [self.lora_name, [[ident, off] for ident, off in self.mm], self.cache_salt]


def block_extra_keys(
    start: int,
    end: int,
    *,
    lora_name: str | None,
    mm_features: Sequence[MultiModalFeature],
    cache_salt: str | None,
) -> ExtraKeys | None:
    """Compute the extra keys of the block covering tokens ``[start, end)``.

    Args:
        start: Index of the block's first token.
        end: Index one past the block's last token.
        lora_name: The request's LoRA adapter, if any.
        mm_features: The request's multimodal features, sorted by offset.
        cache_salt: The request's cache salt; used only when ``start == 0``.

    Returns:
        The block's extra keys, or ``None`` when it has none.
    """
    mm = tuple(
        (feature.identifier, feature.offset - start)
        for feature in mm_features
        if feature.offset < end and feature.end > start
    )
    salt = cache_salt if start == 0 and cache_salt else None
    lora = lora_name or None
    if not mm and salt is None and lora is None:
        return None
    return ExtraKeys(lora_name=lora, mm=mm, cache_salt=salt)
