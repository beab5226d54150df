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

import bisect
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs

from kvtier.errors import InvalidRequestError

if TYPE_CHECKING:
    from kvtier.request import KVCacheRequest

__all__ = [
    "ExtraKeys",
    "FeatureCursor",
    "MultiModalFeature",
    "as_int",
    "event_extra_keys",
    "assemble_extra_keys",
    "block_extra_keys",
    "non_negative",
]


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

    This scans every feature, so calling it for each of a prompt's blocks costs
    O(blocks x features); :class:`FeatureCursor` finds the same features for
    consecutive blocks in one pass.

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
    return assemble_extra_keys(start, mm, lora_name=lora_name, cache_salt=cache_salt)


def assemble_extra_keys(
    start: int,
    mm: tuple[tuple[str, int], ...],
    *,
    lora_name: str | None,
    cache_salt: str | None,
) -> ExtraKeys | None:
    """The extra keys of the block starting at token ``start``, given its ``mm`` keys.

    Args:
        start: Index of the block's first token.
        mm: ``(identifier, offset relative to start)`` of the features
            overlapping the block, in prompt order (see :class:`ExtraKeys`).
        lora_name: The request's LoRA adapter, if any (``""`` counts as none).
        cache_salt: The request's cache salt (``""`` counts as none); used only
            when ``start == 0``.

    Returns:
        The block's extra keys, or ``None`` when it has none.
    """
    salt = cache_salt if start == 0 and cache_salt else None
    lora = lora_name or None
    if not mm and salt is None and lora is None:
        return None
    return ExtraKeys(lora_name=lora, mm=mm, cache_salt=salt)


class FeatureCursor:
    """Finds the multimodal features overlapping consecutive blocks, in one pass.

    It yields for each block exactly the ``mm`` keys that
    :func:`block_extra_keys` computes, but walks the features once instead of
    once per block. It keeps the features that began before the next block and
    have not ended (features may overlap or nest, so a later feature can end
    first) and the index of the first feature not yet begun; each block drops
    the ended ones, takes in those that begin before its end and stops at the
    first that does not. Once past the last feature's end a block costs O(1).
    A block's work is therefore bounded by the features its keys list, plus
    each feature once when it begins and once when it ends.

    Build one with :meth:`create`, then pass consecutive blocks to
    :meth:`overlapping`. :attr:`features` and :attr:`position` (the next
    block's first token) let a caller keep a cursor between calls, as
    :class:`~kvtier.block_hasher.BlockHasher` does while decode fills blocks.
    """

    __slots__ = ("_next", "_open", "_spans", "_stop", "features", "position")

    features: Sequence[MultiModalFeature]
    position: int
    _spans: list[tuple[int, int, str]]
    _next: int
    _open: list[tuple[int, int, str]]
    _stop: int

    def __init__(self) -> None:
        raise TypeError("use FeatureCursor.create()")

    @classmethod
    def create(
        cls, features: Sequence[MultiModalFeature], position: int = 0
    ) -> FeatureCursor | None:
        """A cursor over ``features`` whose next block starts at token ``position``.

        Costs one pass over the features.

        Args:
            features: Multimodal features, sorted by offset (ties in any order).
            position: Index of the first token of the first block to be asked.

        Returns:
            The cursor, or ``None`` when ``features`` are not sorted by offset
            (use :func:`block_extra_keys` then).
        """
        spans: list[tuple[int, int, str]] = []
        still_open: list[tuple[int, int, str]] = []
        last = stop = 0
        for feature in features:
            span = (feature.offset, feature.end, feature.identifier)
            if span[0] < last:
                return None
            last = span[0]
            stop = max(stop, span[1])
            if span[0] < position and span[1] > position:
                still_open.append(span)
            spans.append(span)
        cursor = object.__new__(cls)
        cursor.features = features
        cursor.position = position
        cursor._spans = spans
        cursor._next = bisect.bisect_left(spans, position, key=_span_offset)
        cursor._open = still_open
        cursor._stop = stop
        return cursor

    def overlapping(self, start: int, end: int) -> tuple[tuple[str, int], ...]:
        """The ``mm`` keys of the block ``[start, end)``, the block after the last one asked.

        Args:
            start: Index of the block's first token; must equal :attr:`position`.
            end: Index one past the block's last token (> ``start``).

        Returns:
            ``(identifier, offset - start)`` for every feature overlapping the
            block, in the features' order, as :func:`block_extra_keys` has them.

        Raises:
            ValueError: ``start`` is not :attr:`position`, or ``end <= start``.
        """
        if start != self.position or end <= start:
            raise ValueError(
                f"expected the block starting at {self.position}, got [{start}, {end})"
            )
        self.position = end
        if start >= self._stop:  # every feature has ended
            if self._open:
                self._open = []
            self._next = len(self._spans)
            return ()
        active = self._open
        if active:
            active = [span for span in active if span[1] > start]
        spans, index, count = self._spans, self._next, len(self._spans)
        while index < count and spans[index][0] < end:
            active.append(spans[index])
            index += 1
        self._next = index
        self._open = active
        return tuple((identifier, offset - start) for offset, _, identifier in active)


def _span_offset(span: tuple[int, int, str]) -> int:
    return span[0]


def event_extra_keys(
    request: KVCacheRequest, blocks: range, block_size: int
) -> list[tuple[Any, ...] | None]:
    """The extra keys of the request's consecutive blocks ``blocks``, as events publish them.

    vLLM's untagged form (see :attr:`~kvtier.events.BlockStored.extra_keys`).
    ``cache_salt`` and ``mm_features`` are optional attributes: an engine's
    own request class without them has no such keys. The features are
    walked once (:class:`~kvtier.extra_keys.FeatureCursor`), as the block
    hasher does, when they are sorted by offset.

    Raises:
        InvalidRequestError: ``mm_features`` are not multimodal features
            (each with ``identifier``, ``offset`` and ``end``).
    """
    lora = request.lora_name or None
    salt = getattr(request, "cache_salt", None) or None
    features = getattr(request, "mm_features", None) or ()
    if lora is None and salt is None and not features:
        return [None] * len(blocks)
    try:
        return _event_extra_keys(blocks, block_size, lora, salt, features)
    except (AttributeError, TypeError) as exc:
        raise InvalidRequestError(
            f"request {request.request_id!r}: mm_features must be multimodal features "
            f"(identifier, offset, end): {exc}"
        ) from exc


def _event_extra_keys(
    blocks: range,
    block_size: int,
    lora: str | None,
    salt: str | None,
    features: Sequence[MultiModalFeature],
) -> list[tuple[Any, ...] | None]:
    first = blocks.start * block_size
    cursor = FeatureCursor.create(features, first) if features and blocks else None
    entries: list[tuple[Any, ...] | None] = []
    for index in blocks:
        start = index * block_size
        end = start + block_size
        if cursor is not None:
            keys = assemble_extra_keys(
                start, cursor.overlapping(start, end), lora_name=lora, cache_salt=salt
            )
        else:  # features unsorted: scanned per block
            keys = block_extra_keys(
                start, end, lora_name=lora, mm_features=features, cache_salt=salt
            )
        if keys is None:
            entries.append(None)
            continue
        lead = () if keys.lora_name is None else (keys.lora_name,)
        tail = () if keys.cache_salt is None else (keys.cache_salt,)
        entries.append((*lead, *keys.mm, *tail))
    return entries
