"""The view of a request that kvtier needs.

Engines either use :class:`Request` directly or keep their own request type and
satisfy :class:`KVCacheRequest` (a structural protocol: no inheritance needed).
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Iterable, Sequence
from typing import Protocol

import attrs

from kvtier.block_hasher import BlockHasher
from kvtier.errors import InvalidRequestError
from kvtier.extra_keys import MultiModalFeature, as_int, non_negative
from kvtier.hashing import BlockHash
from kvtier.policies.hints import is_tag

__all__ = ["KVCacheRequest", "Request", "request_lora_id", "request_tag"]


class KVCacheRequest(Protocol):
    """What :class:`~kvtier.manager.KVCacheManager` reads from a request."""

    @property
    def request_id(self) -> str:
        """Unique among live requests."""
        ...

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens so far."""
        ...

    @property
    def all_token_ids(self) -> Sequence[int]:
        """Prompt plus output token ids so far."""
        ...

    @property
    def block_hashes(self) -> Sequence[BlockHash]:
        """Hashes of the request's full blocks, in order."""
        ...

    @property
    def num_computed_tokens(self) -> int:
        """Tokens whose KV is already in the request's blocks."""
        ...

    @property
    def lora_name(self) -> str | None:
        """The LoRA adapter, if any (reported in events)."""
        ...

    @property
    def skip_reading_prefix_cache(self) -> bool:
        """True when the request must not take prefix-cache hits."""
        ...

    @property
    def num_preemptions(self) -> int:
        """How often the request was preempted (for statistics)."""
        ...


def _check_features(
    instance: Request,
    _: attrs.Attribute[tuple[MultiModalFeature, ...]],
    value: tuple[MultiModalFeature, ...],
) -> None:
    last = -1
    for feature in value:
        if not isinstance(feature, MultiModalFeature):
            raise InvalidRequestError(
                f"request {instance.request_id!r}: mm_features must be MultiModalFeature, "
                f"got {type(feature).__name__}"
            )
        if feature.offset < last:
            raise InvalidRequestError(
                f"request {instance.request_id!r}: mm_features must be sorted by offset, "
                f"got offset {feature.offset} after {last}"
            )
        if feature.end > len(instance.prompt_token_ids):
            raise InvalidRequestError(
                f"request {instance.request_id!r}: multimodal feature {feature.identifier!r} "
                f"ends at token {feature.end}, past the prompt's {len(instance.prompt_token_ids)}"
            )
        last = feature.offset


def _check_tag(instance: Request, _: attrs.Attribute[int | str | None], __: object) -> None:
    request_tag(instance)


def _check_lora_id(instance: Request, _: attrs.Attribute[int | None], __: object) -> None:
    request_lora_id(instance)


def request_lora_id(request: KVCacheRequest) -> int | None:
    """A request's optional ``lora_id`` attribute (None when it has none).

    :class:`KVCacheRequest` does not require one: an engine's own request
    class opts in by having a ``lora_id`` (vLLM's ``lora_int_id``), which
    :class:`~kvtier.events.BlockStored` events then carry.

    Raises:
        InvalidRequestError: The id is not a positive integer or None.
    """
    lora_id = getattr(request, "lora_id", None)
    if lora_id is not None and (
        isinstance(lora_id, bool) or not isinstance(lora_id, int) or lora_id <= 0
    ):
        raise InvalidRequestError(f"lora_id must be a positive integer or None, got {lora_id!r}")
    return lora_id


def request_tag(request: KVCacheRequest) -> int | str | None:
    """A request's optional ``tag`` attribute (None when it has none).

    :class:`KVCacheRequest` does not require one: an engine's own request
    class opts in by having a ``tag`` (see :attr:`Request.tag`).

    Raises:
        InvalidRequestError: The tag is not an int, a str or None.
    """
    value: object = getattr(request, "tag", None)
    if not is_tag(value):
        raise InvalidRequestError(
            f"request {request.request_id!r}: tag must be an int, a str or None, got {value!r}"
        )
    return value


_SHORT = 16  # up to this many ids (a decode step), a loop is cheaper than the C passes
_CHUNK = 2048
_pack_chunk = struct.Struct(f"<{_CHUNK}q").pack


def _int_list(tokens: Iterable[int]) -> list[int]:
    """Convert (for attrs) prompt token ids to a new list, every id checked.

    Raises:
        InvalidRequestError: ``tokens`` is a str or bytes, is not iterable,
            or holds an id that is not a 64-bit integer.
    """
    return _token_ids(tokens, single=False)


def _token_ids(tokens: object, *, single: bool) -> list[int]:
    """Return ``tokens`` as a new list, every id checked.

    An id is valid when :mod:`kvtier.hashing` can pack it as a signed 64-bit
    integer (``struct`` format ``q``): an ``int`` in ``[-2**63, 2**63)``,
    bools and other ``int`` subclasses included (kept as given, like
    packing does), or an integer-like object such as a NumPy integer, which
    is converted to ``int`` (:func:`operator.index`) so that every hash
    algorithm sees an ``int``. Anything else (a float, None, a str...) is
    refused. A long list (a prompt) is checked by :func:`_all_int64`, a few
    ids (a decode step) by a loop.

    Args:
        tokens: An iterable of token ids, or (``single``) one token id.
        single: Accept a lone integer as one token id.

    Raises:
        InvalidRequestError: ``tokens`` is a str or bytes, is not iterable
            (nor, with ``single``, an integer), or holds an id that is not
            a 64-bit integer.
    """
    if type(tokens) is list:
        values: list[int] = list(tokens)
    elif getattr(tokens, "ndim", None) == 1 and hasattr(tokens, "tolist"):
        # A NumPy array or a torch tensor: Python ints in one C call (iterating
        # would give NumPy scalars, each converted on its own, 15x slower).
        values = tokens.tolist()  # floats stay floats, and are refused below
    elif isinstance(tokens, (str, bytes, bytearray)):
        raise InvalidRequestError(
            f"token ids must be an iterable of integers, got {type(tokens).__name__} "
            f"{tokens!r:.40}: pass the token ids, not the text"
        )
    else:
        values = _listed(tokens, single=single)
    if len(values) <= _SHORT:
        for value in values:
            if type(value) is not int or not -(2**63) <= value < 2**63:
                break
        else:
            return values
    elif _all_int64(values):
        return values
    return [_token_id(index, value) for index, value in enumerate(values)]


def _all_int64(values: list[int]) -> bool:
    """Whether every id is an ``int`` that packs as a signed 64-bit integer.

    Two C-level passes, about 13 ns a token. Packing (struct format ``q``, as
    :mod:`kvtier.hashing` does; in chunks, which stay in cache: half the time
    of one call on a long prompt) refuses what is not integer-like or out of
    range. Then ``sum`` from ``0.0`` is a plain ``float`` over ``int`` ids
    (bools and ``int`` subclasses included) but a NumPy float once a NumPy
    integer is among them (summed as floats, it never overflows a small
    NumPy type). False sends the ids to the per-id check, which converts or
    refuses them. An integer-like that still passes (one that adds as a
    float) is kept as given: every hash takes it as its index, as packing
    does. (An exact type test costs 17 ns a token more.)
    """
    try:
        size = len(values)
        for start in range(0, size - _CHUNK + 1, _CHUNK):
            _pack_chunk(*values[start : start + _CHUNK])
        if rest := size % _CHUNK:
            struct.pack(f"<{rest}q", *values[size - rest :])
    except (struct.error, TypeError, ArithmeticError):
        return False
    try:
        return type(sum(values, 0.0)) is float
    except Exception:  # an integer-like's own arithmetic failed: the per-id check decides
        return False


def _listed(tokens: object, *, single: bool) -> list[int]:
    """``list(tokens)``, or ``[tokens]`` for a lone integer when ``single``."""
    try:
        return list(tokens)  # type: ignore[call-overload, no-any-return]
    except TypeError:
        if single and hasattr(tokens, "__index__"):  # a NumPy integer, a bool...
            return [tokens]  # type: ignore[list-item]
        kind = "an integer or an iterable of integers" if single else "an iterable of integers"
        raise InvalidRequestError(
            f"token ids must be {kind}, got {type(tokens).__name__}"
        ) from None


def _token_id(index: int, value: object) -> int:
    """One token id (see :func:`_token_ids`); :class:`InvalidRequestError` if it is invalid."""
    token: object = value
    if not isinstance(value, int):
        try:
            token = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            token = None
    if isinstance(token, int) and -(2**63) <= token < 2**63:
        return token
    raise InvalidRequestError(
        f"token ids must be integers that fit in 64 bits, got {value!r} "
        f"({type(value).__name__}) at index {index}"
    )


@attrs.define(eq=False)
class Request:
    """A request as the prefix cache sees it: tokens, block hashes, extra keys.

    Creating it hashes the prompt's full blocks (when a ``block_hasher`` is
    given); :meth:`append_output_token_ids` extends the hashes as decode tokens
    fill blocks.

    Attributes:
        request_id: Unique among live requests.
        prompt_token_ids: The prompt: 64-bit integer token ids (NumPy
            integers are converted to ``int``; see
            :meth:`append_output_token_ids`).
        block_hasher: Computes block hashes; ``None`` leaves them empty (no
            prefix caching for this request).
        cache_salt: Separates tenants: requests with different salts never
            share cached blocks.
        lora_name: The LoRA adapter, if any; part of every block's hash.
        lora_id: The adapter's integer id (vLLM's ``lora_int_id``), reported
            in :class:`~kvtier.events.BlockStored` events; never part of a
            hash (``lora_name`` is).
        mm_features: Multimodal features, sorted by offset.
        skip_reading_prefix_cache: Never take prefix-cache hits (for example
            when prompt logprobs are wanted). Blocks are still cached.
        tag: The request's kind as the engine knows it on arrival (an
            application, a tenant, a ``max_tokens`` bucket), passed to
            prefix-aware eviction policies of the offload tiers, which may
            learn how often each kind's prompts come back (``class_lru``).
            Never part of a block's hash. None: untagged.
        num_computed_tokens: Maintained by the engine.
        num_preemptions: Maintained by the engine.
        output_token_ids: Generated tokens so far.
        all_token_ids: Prompt then output tokens.
        block_hashes: Hashes of the full blocks.

    Raises:
        InvalidRequestError: Token ids that are not an iterable of 64-bit
            integers (a str or bytes, or an id that is a float, None or
            out of range); ``mm_features`` that are not
            ``MultiModalFeature``, unsorted or past the prompt; a
            ``num_computed_tokens`` or ``num_preemptions`` that is not an
            integer >= 0 (NumPy integers are converted to ``int``); a bad
            ``tag`` or ``lora_id``.
    """

    request_id: str
    prompt_token_ids: list[int] = attrs.field(converter=_int_list)
    block_hasher: BlockHasher | None = None
    cache_salt: str | None = None
    lora_name: str | None = None
    mm_features: tuple[MultiModalFeature, ...] = attrs.field(
        default=(), converter=tuple, validator=_check_features
    )
    skip_reading_prefix_cache: bool = False
    tag: int | str | None = attrs.field(default=None, validator=_check_tag, kw_only=True)
    lora_id: int | None = attrs.field(default=None, validator=_check_lora_id, kw_only=True)
    num_computed_tokens: int = attrs.field(default=0, converter=as_int, validator=non_negative)
    num_preemptions: int = attrs.field(default=0, converter=as_int, validator=non_negative)
    output_token_ids: list[int] = attrs.field(init=False, factory=list)
    all_token_ids: list[int] = attrs.field(init=False)
    block_hashes: list[BlockHash] = attrs.field(init=False, factory=list)

    @all_token_ids.default
    def _all_token_ids(self) -> list[int]:
        return list(self.prompt_token_ids)

    def __attrs_post_init__(self) -> None:
        if self.block_hasher is not None:
            self.block_hashes.extend(self.block_hasher(self))

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens so far."""
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        """Tokens in the prompt."""
        return len(self.prompt_token_ids)

    def append_output_token_ids(self, token_ids: int | Iterable[int]) -> None:
        """Append generated tokens and hash the blocks they fill.

        Every id is checked before anything changes, so a bad one never
        reaches ``all_token_ids`` (where it would fail the hashing of every
        later block).

        Args:
            token_ids: One token id or an iterable of them (not a str or
                bytes). Valid ids are what :mod:`kvtier.hashing` packs as
                signed 64-bit integers: ``int`` (bools included, as for
                packing) in ``[-2**63, 2**63)``, or NumPy integers, which
                are converted to ``int``.

        Raises:
            InvalidRequestError: A token id is not a 64-bit integer (a
                float, None, out of range...), or ``token_ids`` is a str,
                bytes, or neither an integer nor an iterable; the request is
                left as it was.
        """
        if type(token_ids) is int and -(2**63) <= token_ids < 2**63:
            new = [token_ids]
        else:
            new = _token_ids(token_ids, single=True)
        self.all_token_ids.extend(new)
        if self.block_hasher is not None:
            try:
                hashes = self.block_hasher(self)
            except InvalidRequestError:
                del self.all_token_ids[len(self.all_token_ids) - len(new) :]
                raise
            self.block_hashes.extend(hashes)
        self.output_token_ids.extend(new)
