"""Eviction, admission and prefetch policies, registered by name."""
