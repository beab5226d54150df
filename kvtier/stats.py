"""Prefix-cache statistics."""

from __future__ import annotations

import attrs

__all__ = ["PrefixCacheStats"]


@attrs.define
class PrefixCacheStats:
    """Counts of prefix-cache lookups since the last snapshot.

    Attributes:
        reset: The prefix cache was reset during the interval.
        requests: Lookups (``get_computed_blocks`` calls that read the cache).
        queries: Tokens looked up.
        hits: Tokens found cached.
        preempted_requests: Lookups by requests that had been preempted.
        preempted_queries: Tokens looked up by those requests.
        preempted_hits: Tokens found cached for those requests.
    """

    reset: bool = False
    requests: int = 0
    queries: int = 0
    hits: int = 0
    preempted_requests: int = 0
    preempted_queries: int = 0
    preempted_hits: int = 0

    def record(self, num_tokens: int, num_hits: int, preempted: bool) -> None:
        """Count one lookup of ``num_tokens`` tokens that hit ``num_hits``."""
        if preempted:
            self.preempted_requests += 1
            self.preempted_queries += num_tokens
            self.preempted_hits += num_hits
        else:
            self.requests += 1
            self.queries += num_tokens
            self.hits += num_hits

    @property
    def hit_rate(self) -> float:
        """Hit tokens over queried tokens (0.0 before any query), preempted excluded."""
        return self.hits / self.queries if self.queries else 0.0
