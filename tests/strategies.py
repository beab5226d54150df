"""Hypothesis strategies shared by the property tests."""

from __future__ import annotations

from hypothesis import strategies as st

# Prompts are drawn from a few shared prefixes plus short random tails over a
# tiny vocabulary, so requests share and partially share blocks often.
PREFIXES: tuple[tuple[int, ...], ...] = (
    (),
    (1, 2, 3, 4, 5, 6, 7, 8),
    (1, 2, 3, 4, 9, 9, 9, 9),
    (5,) * 12,
    (1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4),
)

prefixes = st.sampled_from(PREFIXES)
tails = st.lists(st.integers(0, 3), max_size=10)
decode_tokens = st.lists(st.integers(0, 3), min_size=1, max_size=6)
