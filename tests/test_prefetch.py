"""Prefetch policies: which leading lower-tier hits a request loads."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtier.errors import ConfigError, UnknownNameError
from kvtier.policies.prefetch import (
    PREFETCH_POLICIES,
    BestEffort,
    PrefetchPolicy,
    StagingCostModel,
    Timeout,
    WaitComplete,
    make_prefetch_policy,
)


def costs(**per_level: float) -> StagingCostModel:
    model = StagingCostModel(weight=1.0, half_life=math.inf)
    for name, seconds in per_level.items():
        model.observe(int(name.removeprefix("l")), 1, seconds)
    return model


def test_best_effort_loads_the_first_lower_tier_prefix_only() -> None:
    policy = BestEffort()
    assert policy.loadable([0, 0, 1, 0], 1000, costs()) == 2
    assert policy.loadable([1, 0], 1000, costs()) == 0
    assert policy.loadable([], 1000, costs()) == 0
    assert policy.loadable([0, 0], 1000, costs()) == 2


def test_wait_complete_loads_everything() -> None:
    assert WaitComplete().loadable([0, 2, 1, 2], 10, costs(l1=9.0, l2=9.0)) == 4


def test_timeout_stages_while_the_budget_lasts() -> None:
    policy = Timeout(timeout=0.010, timeout_per_1k_tokens=0.002)
    assert policy.budget(5000) == pytest.approx(0.020)
    model = costs(l1=0.004, l2=0.015)
    # first-tier blocks are free; each disk (l1) block costs 4 ms of the 20 ms budget
    assert policy.loadable([0, 0, 1, 1, 1, 1, 1, 1], 5000, model) == 7
    assert policy.loadable([1, 2, 1], 5000, model) == 2  # 4 + 15 ms fit, 4 more do not
    assert policy.loadable([2, 2], 1000, model) == 0  # 15 ms > 12 ms
    assert policy.loadable([0, 0, 0], 0, costs(l1=1.0)) == 3


def test_unmeasured_tiers_cost_the_prior() -> None:
    assert Timeout(0.0, 0.0).loadable([1, 1], 0, StagingCostModel()) == 2  # optimistic
    assert Timeout(0.0, 0.0).loadable([1, 1], 0, StagingCostModel(prior=1.0)) == 0


def test_cost_model_is_an_exponentially_weighted_mean_per_level() -> None:
    model = StagingCostModel(weight=0.5, half_life=math.inf)
    model.observe(1, 10, 1.0)  # 0.1 s per block
    assert model.seconds_per_block(1) == pytest.approx(0.1)
    model.observe(1, 10, 3.0)  # 0.3 s per block
    assert model.seconds_per_block(1) == pytest.approx(0.2)
    model.observe(1, 0, 5.0)  # nothing staged: ignored
    model.observe(1, 3, -1.0)  # a clock going back: ignored
    assert model.seconds_per_block(1) == pytest.approx(0.2)
    assert model.seconds_per_block(0) == 0.0
    assert model.seconds_per_block(2) == 0.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_estimate_relaxes_toward_the_prior_with_its_half_life() -> None:
    """A stalled read must not keep a timeout policy off a tier forever: only an
    accepted load measures it again."""
    clock = FakeClock()
    model = StagingCostModel(weight=0.5, half_life=10.0, clock=clock)
    model.observe(1, 1, 0.4)
    assert model.seconds_per_block(1) == pytest.approx(0.4)
    clock.now += 10.0
    assert model.seconds_per_block(1) == pytest.approx(0.2)
    clock.now += 20.0
    assert model.seconds_per_block(1) == pytest.approx(0.05)
    assert model.measured(1) == pytest.approx(0.4)  # as the observation left it
    policy = Timeout(timeout=0.1, timeout_per_1k_tokens=0.0)
    assert policy.loadable([1, 1, 1], 0, model) == 1  # one exploratory block re-measures
    model.observe(1, 1, 0.25)  # still slow: the estimate was stale, the sample replaces it
    assert model.measured(1) == 0.25
    assert model.seconds_per_block(1) == model.measured(1)  # just observed: nothing relaxed
    assert policy.loadable([1, 1, 1], 0, model) == 0


def test_a_relaxed_estimate_approaches_a_pessimistic_prior_from_below() -> None:
    clock = FakeClock()
    model = StagingCostModel(weight=1.0, prior=1.0, half_life=5.0, clock=clock)
    model.observe(1, 1, 0.2)
    clock.now += 5.0
    assert model.seconds_per_block(1) == pytest.approx(0.6)


def test_an_infinite_half_life_never_relaxes() -> None:
    clock = FakeClock()
    model = StagingCostModel(weight=1.0, half_life=float("inf"), clock=clock)
    model.observe(2, 4, 2.0)
    clock.now += 1e9
    assert model.seconds_per_block(2) == pytest.approx(0.5)


def test_non_finite_observations_are_ignored() -> None:
    model = StagingCostModel(weight=1.0, half_life=math.inf)
    model.observe(1, 1, 0.1)
    model.observe(1, 1, float("nan"))
    model.observe(1, 1, float("inf"))
    assert model.seconds_per_block(1) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weight": 0.0},
        {"weight": 1.5},
        {"prior": -1.0},
        {"prior": float("nan")},
        {"prior": float("inf")},
        {"half_life": 0.0},
        {"half_life": -1.0},
        {"half_life": float("nan")},
        {"weight": True},
        {"half_life": True},
        {"prior": False},
        {"half_life": "30"},
        {"weight": None},
        {"clock": 5.0},
    ],
)
def test_cost_model_rejects_bad_parameters(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        StagingCostModel(**kwargs)


def test_registry_builds_by_name_and_lists_names_on_error() -> None:
    assert set(PREFETCH_POLICIES) == {"best_effort", "wait_complete", "timeout"}
    timeout = make_prefetch_policy("timeout", timeout=0.5, timeout_per_1k_tokens=0.1)
    assert timeout == Timeout(0.5, 0.1)
    for name in PREFETCH_POLICIES:
        assert isinstance(make_prefetch_policy(name), PrefetchPolicy)
    with pytest.raises(UnknownNameError, match="best_effort"):
        make_prefetch_policy("eventually")
    with pytest.raises(ConfigError, match="timeout"):
        make_prefetch_policy("timeout", timeout=-1.0)
    for bad in (float("nan"), float("inf")):  # NaN compared false: everything was loaded
        for name in ("timeout", "timeout_per_1k_tokens"):
            with pytest.raises(ConfigError, match=f"{name} must be finite seconds"):
                make_prefetch_policy("timeout", **{name: bad})


@given(
    levels=st.lists(st.integers(0, 3), max_size=40),
    tokens=st.integers(0, 100_000),
    seconds=st.lists(st.floats(0, 1), min_size=3, max_size=3),
    budget=st.floats(0, 2),
)
def test_every_policy_returns_a_prefix_length_and_they_are_ordered(
    levels: list[int], tokens: int, seconds: list[float], budget: float
) -> None:
    model = StagingCostModel(weight=1.0, half_life=math.inf)
    for level, value in enumerate(seconds, 1):
        model.observe(level, 1, value)
    best = BestEffort().loadable(levels, tokens, model)
    timed = Timeout(budget, 0.0).loadable(levels, tokens, model)
    full = WaitComplete().loadable(levels, tokens, model)
    assert 0 <= best <= timed <= full == len(levels)
    assert all(level == 0 for level in levels[:best])


def test_relaxation_buys_one_exploratory_block_never_a_whole_hit() -> None:
    clock = FakeClock()
    model = StagingCostModel(clock=clock)  # defaults: weight 0.2, prior 0, half-life 30 s
    model.observe(1, 4, 4.0)  # the tier really costs 1 s a block
    policy = Timeout()  # 50 ms + 5 ms per 1k tokens: 70 ms for 4,096 tokens
    assert policy.loadable([1] * 256, 4096, model) == 0  # fresh: 1 s a block never fits
    for idle in (150.0, 300.0, 600.0):
        clock.now += idle  # relaxed under the budget: one exploratory block, not 72 or 256
        assert policy.loadable([1] * 256, 4096, model) == 1
        assert policy.loadable([0, 0, 1, 1, 1], 4096, model) == 3
        model.observe(1, 1, 1.0)  # still 1 s a block: the stale estimate gives way
        assert model.measured(1) > 0.9
        assert policy.loadable([1] * 256, 4096, model) == 0


def test_exploring_needs_a_measurement_a_half_life_old() -> None:
    clock = FakeClock()
    model = StagingCostModel(weight=1.0, clock=clock)
    model.observe(1, 1, 0.01)  # 10 ms a block
    policy = Timeout(0.0699, 0.0)  # six blocks and 9.9 ms left
    assert policy.loadable([1] * 20, 0, model) == 6
    clock.now += 1.0  # relaxed a little: 9.8 ms would fit the 9.9 left, but it is fresh
    assert not model.stale(1)
    assert policy.loadable([1] * 20, 0, model) == 6
    clock.now += 29.0
    assert model.stale(1)
    assert policy.loadable([1] * 20, 0, model) == 7
    assert not StagingCostModel().stale(1)  # never measured: the prior, not stale
    assert not model.stale(0)


def test_an_ageing_estimate_gives_a_sample_more_weight_and_a_stale_one_gives_way() -> None:
    clock = FakeClock()
    model = StagingCostModel(clock=clock)  # weight 0.2: fresh samples move it by a fifth
    model.observe(1, 1, 1.0)
    model.observe(1, 1, 0.5)
    assert model.measured(1) == pytest.approx(0.9)
    clock.now += 15.0  # half a half-life: the sample weighs 1 - 0.8 / sqrt(2)
    model.observe(1, 1, 0.1)
    assert model.measured(1) == pytest.approx(0.9 + (1 - 0.8 * 0.5**0.5) * (0.1 - 0.9))
    clock.now += 30.0  # stale: the tier recovered, and one sample says so
    model.observe(1, 1, 0.01)
    assert model.measured(1) == 0.01
    assert Timeout(0.055, 0.0).loadable([1] * 10, 0, model) == 5


def test_under_steady_lookups_a_recovered_tier_is_back_after_its_exploration() -> None:
    clock = FakeClock()
    model = StagingCostModel(clock=clock)  # defaults: weight 0.2, prior 0, half-life 30 s
    model.observe(1, 1, 1.0)  # a stalled read: 1 s a block
    policy = Timeout(0.07, 0.0)
    for _ in range(600):  # a lookup a second
        clock.now += 1.0
        if policy.loadable([1] * 10, 0, model):
            break
    model.observe(1, 1, 0.03)  # the exploratory block: the disk recovered to 30 ms
    assert policy.loadable([1] * 10, 0, model) == 2  # in use at once, not a half-life later


def test_an_idle_fast_tier_loads_what_its_measurement_allows_and_one_more() -> None:
    clock = FakeClock()
    model = StagingCostModel(clock=clock)
    model.observe(1, 1, 0.01)  # 10 ms a block
    policy = Timeout(0.055, 0.0)
    assert policy.loadable([1] * 20, 0, model) == 5
    clock.now += 600.0  # relaxed to ~0: the measured cost still counts, plus one block
    assert policy.loadable([1] * 20, 0, model) == 6


class _NaNMeasured(StagingCostModel):
    def measured(self, level: int) -> float:
        return math.nan if level else 0.0


class _NaNRelaxed(StagingCostModel):
    def seconds_per_block(self, level: int) -> float:
        return math.nan if level else 0.0


@pytest.mark.parametrize("model", [_NaNMeasured(), _NaNRelaxed()], ids=["measured", "relaxed"])
def test_a_cost_model_answering_nan_loads_nothing_from_that_tier(model: StagingCostModel) -> None:
    assert Timeout(1.0, 0.0).loadable([0, 1, 1], 0, model) == 1


def test_relaxing_toward_a_pessimistic_prior_makes_the_policy_more_careful() -> None:
    clock = FakeClock()
    model = StagingCostModel(prior=0.1, half_life=10.0, clock=clock)
    model.observe(1, 1, 0.01)  # measured fast: 10 ms a block
    policy = Timeout(0.065, 0.0)
    assert policy.loadable([1] * 20, 0, model) == 6
    clock.now += 10.0  # halfway back to 100 ms: 55 ms a block
    assert model.seconds_per_block(1) == pytest.approx(0.055)
    # One block charged 55 ms; the 10 ms left fit the 10 ms measured, a half-life old:
    # one exploratory block.
    assert policy.loadable([1] * 20, 0, model) == 2


def test_a_prior_above_the_budget_never_locks_out_a_measured_fast_tier() -> None:
    clock = FakeClock()
    model = StagingCostModel(prior=0.1, half_life=10.0, clock=clock)
    model.observe(1, 1, 0.01)
    policy = Timeout(0.065, 0.0)
    clock.now += 10_000.0  # relaxed all the way to the 100 ms prior, over the budget
    assert policy.loadable([1] * 20, 0, model) == 1  # explored: the 10 ms measured fits
    model.observe(1, 1, 0.01)  # still fast: trusted again at once
    assert policy.loadable([1] * 20, 0, model) == 6
