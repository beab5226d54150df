"""Typed errors raised by kvtier.

Every error kvtier raises on purpose derives from :class:`KVTierError`, so an
engine can catch the whole family in one place. Errors caused by bad input also
derive from :class:`ValueError`, so code written against vLLM (which raises
``ValueError``) keeps working. An operation that raises an error for bad input
(:class:`ConfigError`, :class:`InvalidRequestError` and the other ``ValueError``
kinds) has changed no state; an I/O error (:class:`TierIOError`,
:class:`BlockMissingError`) may leave part of a batch done, as each method
documents.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "BlockMissingError",
    "ClosedError",
    "ConfigError",
    "InvalidRequestError",
    "KVTierError",
    "LedgerError",
    "NoFreeBlocksError",
    "TierError",
    "TierFullError",
    "TierIOError",
    "TransferCancelledError",
    "UnknownNameError",
]


class KVTierError(Exception):
    """Base class of every error kvtier raises on purpose."""


class ConfigError(KVTierError, ValueError):
    """A configuration value is out of range or of the wrong kind.

    Raised, for example, for a pool of fewer than two blocks or a block size
    that is not positive. The message names the parameter and the bad value.
    """


class UnknownNameError(ConfigError, KeyError):
    """A pluggable component was asked for by a name that is not registered.

    Attributes:
        kind: What was being looked up (for example ``"hash algorithm"``).
        name: The name that was asked for.
        valid: The registered names, sorted.
    """

    def __init__(self, kind: str, name: object, valid: list[str]) -> None:
        self.kind = kind
        self.name = name
        self.valid = sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid names are: {', '.join(self.valid)}")

    def __str__(self) -> str:
        # KeyError's __str__ would repr() the message; keep it readable.
        return str(self.args[0])


class InvalidRequestError(KVTierError, ValueError):
    """A request or a per-step argument is malformed.

    Raised for negative token counts, token ids that do not fit in 64 bits,
    multimodal features that lie outside the prompt, and similar bad input.
    """


class NoFreeBlocksError(KVTierError, ValueError):
    """More blocks were asked of the pool than it has free.

    A ``ValueError`` too, as vLLM's ``BlockPool.get_new_blocks`` raises.

    ``KVCacheManager.allocate_slots`` never raises this: it checks first and
    returns ``None``. Only direct callers of ``BlockPool.get_new_blocks`` see it.
    """


class ClosedError(KVTierError, RuntimeError):
    """A tier, pipeline or manager was used after ``aclose()``."""


class TierError(KVTierError):
    """A storage tier could not do what was asked.

    Attributes:
        tier: The tier's name (its ``medium``), when known.
    """

    def __init__(self, message: str, *, tier: str | None = None) -> None:
        super().__init__(message)
        self.tier = tier


class TierIOError(TierError):
    """The tier's backend failed (a disk error, a lost connection…).

    The backend's own exception is the ``__cause__``.
    """


class BlockMissingError(TierError):
    """A slot's bytes are absent or failed verification.

    Verification covers the checksum, the layout fingerprint and the key.
    kvtier treats this as a miss, never as data.

    Attributes:
        slots: The slots that could not be read.
    """

    def __init__(
        self, message: str, *, tier: str | None = None, slots: tuple[int, ...] = ()
    ) -> None:
        super().__init__(message, tier=tier)
        self.slots = slots

    @classmethod
    def of_slots(cls, tier: str, slots: Iterable[int]) -> BlockMissingError:
        """The error for ``slots`` of ``tier``, its message naming them (the first 8)."""
        found = tuple(sorted(set(slots)))
        shown = ", ".join(map(str, found[:8])) + (", …" if len(found) > 8 else "")
        return cls(
            f"tier {tier}: {len(found)} block(s) missing or failed verification (slots {shown})",
            tier=tier,
            slots=found,
        )


class TierFullError(TierError):
    """A tier has no free (unpinned) slot for a write."""


class TransferCancelledError(KVTierError):
    """The transfer behind a completion was cancelled before it finished."""


class LedgerError(KVTierError):
    """An index refused to record a transfer (commit, abort, unpin or remove raised).

    The transfer's completion fails with it (the ledger's exception is the
    cause); the pipeline keeps serving.
    """
