"""TOML configuration: the bundled examples load; every bad key or value is named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvtier.config import load_config, parse_config, parse_duration, parse_size
from kvtier.errors import ConfigError
from kvtier.policies.prefetch import PREFETCH_POLICIES

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.toml"))


def base(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "layout": {"num_layers": 2, "block_size": 16, "num_kv_heads": 1, "head_size": 8},
        "tiers": [{"kind": "cpu", "capacity": "1MiB"}],
    }
    data.update(overrides)
    return data


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_bundled_examples_load(path: Path) -> None:
    config = load_config(path)
    assert config.tiers
    assert all(config.blocks_of(tier) > 0 for tier in config.tiers)


def test_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {
        "cpu-only.toml",
        "device-cpu.toml",
        "device-cpu-disk.toml",
    }


def test_a_full_stack_is_parsed() -> None:
    config = parse_config(
        base(
            offload={
                "write_mode": "lazy",
                "prefetch": "timeout",
                "prefetch_timeout": "20ms",
                "hash": "xxhash",
                "hash_seed": "team-a",
            },
            tiers=[
                {"kind": "device", "capacity": "2MiB"},
                {"kind": "cpu", "capacity": "4MiB", "eviction": "arc", "pin_memory": False},
                {"kind": "disk", "capacity": "1GB", "path": "/tmp/x", "direct_io": True},
            ],
        )
    )
    assert [t.kind for t in config.tiers] == ["device", "cpu", "disk"]
    assert config.tiers[1].eviction == "arc"
    assert config.tiers[1].pin_memory is False
    assert config.tiers[2].capacity_bytes == 10**9
    assert config.tiers[2].path == Path("/tmp/x")
    assert config.offload.prefetch_timeout == pytest.approx(0.02)
    assert (config.offload.hash, config.offload.hash_seed) == ("xxhash", "team-a")
    assert parse_config(base()).offload.hash_seed is None
    assert config.blocks_of(config.tiers[0]) == (2 << 20) // config.layout.block_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GiB", 8 << 30),
        ("512 MiB", 512 << 20),
        ("100GB", 10**11),
        ("4096", 4096),
        (7, 7),
        ("1.5GiB", 3 << 29),
        ("64 mib", 64 << 20),
        ("9007199254740993", 9007199254740993),  # exact: no float on the way
        ("0B", 0),
    ],
)
def test_sizes(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0.1KiB", "not a whole number of bytes"),
        ("1.5B", "not a whole number of bytes"),
        ("\uff18GiB", "not a size"),  # full-width digits
        ("1" + "0" * 400 + "TiB", "more than 1 EiB"),
        ("2EiB", "not a size"),
        (-1, "not a size"),
        (True, "not a size"),
        (1.5, "not a size"),
    ],
)
def test_bad_sizes(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_size(value, key="tiers[0].capacity")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (float("inf"), "not a duration"),
        (float("nan"), "not a duration"),
        (-1, "not a duration"),
        ("1e3s", "not a duration"),
        ("400days", "not a duration"),
        (10**9, "more than a year"),
    ],
)
def test_bad_durations(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_duration(value, key="offload.prefetch_timeout")


@pytest.mark.parametrize(("text", "expected"), [("50ms", 0.05), ("2s", 2.0), ("500us", 5e-4)])
def test_durations(text: str, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (base(tiers=[{"kind": "cpu", "capacity": "8 gigs"}]), r"tiers\[0\]\.capacity: '8 gigs'"),
        (base(tiers=[{"kind": "tape", "capacity": "1GiB"}]), r"tiers\[0\]\.kind: 'tape'.*cpu"),
        (
            base(tiers=[{"kind": "cpu", "capacity": "1GiB", "eviction": "mru"}]),
            r"eviction: 'mru' is not one of: arc, class_lru, lfu, lru, prefix_slru, priority_lru, "
            r"s3fifo, slru",
        ),
        (
            base(tiers=[{"kind": "cpu", "capacity": "1GiB", "colour": 1}]),
            r"unknown key\(s\) colour",
        ),
        (base(tiers=[{"kind": "disk", "capacity": "1GiB", "path": 3}]), r"path: a disk tier"),
        (
            base(tiers=[{"kind": "cpu", "capacity": "1GiB", "path": "/x"}]),
            r"tiers\[0\] \(cpu tier\): unknown key\(s\) path",
        ),
        (base(tiers=[{"kind": "disk", "capacity": "1GiB", "path": ""}]), r"path: a disk tier"),
        (
            base(tiers=[{"kind": "device", "capacity": "1GiB", "eviction": "lru"}]),
            r"\(device tier\): unknown key\(s\) eviction",
        ),
        (base(tiers=[{"kind": "cpu"}]), r"tiers\[0\]: missing key\(s\) capacity"),
        (base(tiers=[{"kind": "cpu", "capacity": "10B"}]), r"hold no block"),
        (  # 2 KiB hold two 1 KiB blocks, but not one 4 KiB block file
            base(tiers=[{"kind": "disk", "capacity": "2KiB", "path": "/x"}]),
            r"tiers\[0\]\.capacity: 2048 bytes hold no block file of 4096 bytes",
        ),
        (base(tiers=[{"kind": "device", "capacity": "1GiB"}]), r"at least one lower tier"),
        (
            base(
                tiers=[{"kind": "cpu", "capacity": "1GiB"}, {"kind": "device", "capacity": "1GiB"}]
            ),
            r"must be the first",
        ),
        (base(tiers=[]), r"at least one \[\[tiers\]\]"),
        (base(offload={"write_mode": "sometimes"}), r"offload\.write_mode: 'sometimes'"),
        (base(offload={"prefetch_timeout": "soon"}), r"offload\.prefetch_timeout: 'soon'"),
        (base(offload={"hash": "md5"}), r"offload\.hash: 'md5'"),
        (base(offload={"hash_seed": 3}), r"offload\.hash_seed: 3 is not a non-empty string"),
        (base(offload={"hash_seed": ""}), r"offload\.hash_seed: '' is not a non-empty string"),
        (base(offload={"lazy_free_target": 0}), r"lazy_free_target: 0 is not an integer >= 1"),
        (base(layout={"num_layers": 2}), r"layout: missing key\(s\) block_size"),
        (
            base(
                layout={
                    "num_layers": 2,
                    "block_size": 16,
                    "num_kv_heads": 1,
                    "head_size": 8,
                    "dtype": "int3",
                }
            ),
            r"layout\.dtype: 'int3'",
        ),
        ({"tiers": []}, r"missing the \[layout\] table"),
        (base(extra=1), r"config: unknown key\(s\) extra"),
        (
            base(tiers=[{"kind": "disk", "capacity": "1GiB", "direct_io": "yes"}]),
            r"not true or false",
        ),
    ],
)
def test_bad_configs_name_the_key_and_the_value(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_a_config_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b"\xff\xfe[layout]")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[layout\nnum_layers = 2\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def _redis(**extra: object) -> dict[str, object]:
    table: dict[str, object] = {"kind": "redis", "capacity": "1GiB", "model": "m"}
    table.update(extra)
    return {
        "layout": {"num_layers": 1, "block_size": 16, "num_kv_heads": 1, "head_size": 8},
        "tiers": [{"kind": "cpu", "capacity": "1MiB"}, table],
    }


def test_redis_tier_options() -> None:
    config = parse_config(
        _redis(
            url="rediss://cache:6380/0",
            prefix="p:",
            model="m",
            ttl="2s",
            timeout="250ms",
            batch_size=8,
            username="u",
            password_env="KVTIER_TEST_PW",
            cluster=True,
            rank=1,
            world_size=4,
        )
    )
    options = config.tiers[1].redis
    assert options is not None
    assert (options.url, options.prefix, options.model) == ("rediss://cache:6380/0", "p:", "m")
    assert (options.ttl, options.timeout, options.batch_size) == (2.0, 0.25, 8)
    assert options.cluster
    assert (options.rank, options.world_size) == (1, 4)
    assert "KVTIER_TEST_PW" not in repr(options)
    defaults = parse_config(_redis()).tiers[1].redis
    assert defaults is not None
    assert defaults.ttl is None
    assert defaults.url == "redis://127.0.0.1:6379/0"


def test_a_redis_tier_without_a_model_is_refused() -> None:
    table = _redis()
    tiers = table["tiers"]
    assert isinstance(tiers, list)
    del tiers[1]["model"]
    with pytest.raises(ConfigError, match="would read each other's KV bytes"):
        parse_config(table)


def test_redis_password_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    options = parse_config(_redis(password_env="KVTIER_TEST_PW")).tiers[1].redis
    assert options is not None
    monkeypatch.delenv("KVTIER_TEST_PW", raising=False)
    with pytest.raises(ConfigError, match="that password_env names is not set"):
        options.password()
    monkeypatch.setenv("KVTIER_TEST_PW", "s3cret")
    assert options.password() == "s3cret"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"password": "x"}, r"tiers\[1\].password: passwords do not go in the file"),
        ({"url": "http://x"}, r"tiers\[1\].url: 'http://x' is not a redis://"),
        ({"batch_size": 0}, r"tiers\[1\].batch_size: 0 is not an integer >= 1"),
        ({"timeout": "0s"}, r"tiers\[1\].timeout: must be more than 0"),
        ({"connect_timeout": "100000s"}, r"tiers\[1\].connect_timeout: must be at most a day"),
        ({"ttl": "soon"}, r"tiers\[1\].ttl: 'soon' is not a duration"),
        ({"cluster": "yes"}, r"tiers\[1\].cluster: 'yes' is not true or false"),
        ({"path": "/x"}, r"unknown key\(s\) path"),
        ({"rank": 2, "world_size": 2}, r"tiers\[1\].rank: 2 is not below world_size=2"),
        ({"world_size": 0}, r"tiers\[1\].world_size: 0 is not an integer >= 1"),
        ({"model": ""}, r"tiers\[1\].model: a redis tier needs the model's name"),
        ({"model": 3}, r"tiers\[1\].model: 3 is not a string"),
        (
            {"url": "redis://u:pw@[::1:6379/0"},
            r"url: 'redis://u:\*\*\*@\[::1:6379/0' is not a valid",
        ),
        # Once refused only when the tier was built, without the key's name:
        ({"prefix": "kv{a}:"}, r"tiers\[1\].prefix: 'kv\{a\}:' has a brace"),
        ({"tls_key_file": "k.pem"}, r"tiers\[1\].tls_key_file: 'k.pem' needs tls_cert_file"),
        (
            {"url": "unix:///s.sock", "tls": True},
            r"tiers\[1\].tls: True turns TLS on, .* not the unix:// socket of url 'unix:///s",
        ),
        ({"url": "unix:///s.sock", "tls_ca_file": "ca.pem"}, r"tiers\[1\].tls_ca_file: 'ca.pem'"),
        ({"url": "UNIX:///s", "tls_cert_file": "c", "tls_key_file": "k"}, r"\.tls_cert_file: 'c'"),
        ({"url": "unix://:pw@/s", "cluster": True}, r"tiers\[1\].cluster: .*'unix://:\*\*\*@/s'"),
        ({"url": "redis://h/1", "cluster": True}, r"tiers\[1\].url: .*database 0 only"),
    ],
)
def test_bad_redis_options(extra: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(_redis(**extra))


@pytest.mark.parametrize(
    "extra",
    [
        {"url": "http://user:hunter2@127.0.0.1:6379/0"},
        {"url": "redis://user:hunter2@[::1:6379/0"},
        {"url": "redis://user:hunter2@host:99999/0"},
        {"password": "hunter2"},
    ],
)
def test_errors_never_show_a_password(extra: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_redis(**extra))
    assert "hunter2" not in str(info.value)


def test_the_options_repr_redacts_the_url() -> None:
    options = parse_config(_redis(url="redis://user:hunter2@cache:6379/0")).tiers[1].redis
    assert options is not None
    assert options.url == "redis://user:hunter2@cache:6379/0"  # the client still gets it
    assert "hunter2" not in repr(options)
    assert "redis://user:***@cache:6379/0" in repr(options)


def test_a_disk_tier_counts_blocks_by_their_files() -> None:
    config = parse_config(base(tiers=[{"kind": "disk", "capacity": "16KiB", "path": "/x"}]))
    assert config.blocks_of(config.tiers[0]) == 4  # 4 KiB files, not 1 KiB blocks
    cpu = parse_config(base())
    assert cpu.blocks_of(cpu.tiers[0]) == 1024


@pytest.mark.parametrize(
    ("offload", "message"),
    [
        ({"prefetch_timeout": "1s"}, r"prefetch = 'best_effort' \(the default\) never reads it"),
        (
            {"prefetch": "wait_complete", "prefetch_timeout_per_1k_tokens": "1ms"},
            r"prefetch_timeout_per_1k_tokens: prefetch = 'wait_complete' never reads it",
        ),
        ({"lazy_free_target": 8}, r"lazy_free_target: write_mode = 'eager' \(the default\)"),
        (
            {"write_mode": "lazy", "selective_min_hits": 3},
            r"selective_min_hits: write_mode = 'lazy' never reads it",
        ),
        (
            {"write_mode": "lazy", "spill_stores": False},
            r"spill_stores: write_mode = 'lazy' never reads it",
        ),
    ],
)
def test_a_key_its_mode_does_not_read_is_refused(offload: dict[str, object], message: str) -> None:
    """A setting that would do nothing is an error, not silence (a mode switched, a typo)."""
    with pytest.raises(ConfigError, match=message):
        parse_config(base(offload=offload))


def test_keys_of_the_chosen_mode_are_read() -> None:
    offload = parse_config(
        base(offload={"write_mode": "selective", "selective_min_hits": 5})
    ).offload
    assert offload.selective_min_hits == 5


def test_a_registered_prefetch_policy_is_given_the_timeout_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PrefetchFactory takes (timeout, timeout_per_1k_tokens): a plug-in may read them."""
    monkeypatch.setitem(PREFETCH_POLICIES, "my_timeout", PREFETCH_POLICIES["timeout"])
    offload = parse_config(
        base(offload={"prefetch": "my_timeout", "prefetch_timeout": "200ms"})
    ).offload
    assert offload.prefetch_timeout == pytest.approx(0.2)


def test_flush_on_close_is_read_and_needs_a_tier_below_a_cpu_tier() -> None:
    assert parse_config(base()).offload.flush_on_close is False
    two = [{"kind": "cpu", "capacity": "1MiB"}, {"kind": "disk", "capacity": "1MiB", "path": "/x"}]
    config = parse_config(base(tiers=two, offload={"flush_on_close": True}))
    assert config.offload.flush_on_close is True
    below = "flush_on_close: no cpu tier has a disk or redis tier below it"
    with pytest.raises(ConfigError, match=below):
        parse_config(base(offload={"flush_on_close": True}))  # a CPU tier alone
    cpus = [{"kind": "cpu", "capacity": "1MiB"}] * 2
    with pytest.raises(ConfigError, match=below):
        parse_config(base(tiers=cpus, offload={"flush_on_close": True}))
    with pytest.raises(ConfigError, match=r"offload.flush_on_close: 'yes' is not true or false"):
        parse_config(base(tiers=two, offload={"flush_on_close": "yes"}))


def test_spill_stores_is_left_to_the_prefetch_policy_by_default_and_read_when_set() -> None:
    assert parse_config(base()).offload.spill_stores is None
    for mode, spill in (("eager", False), ("selective", True)):
        config = parse_config(base(offload={"write_mode": mode, "spill_stores": spill}))
        assert config.offload.spill_stores is spill
    with pytest.raises(ConfigError, match=r"offload.spill_stores: 'no' is not true or false"):
        parse_config(base(offload={"spill_stores": "no"}))
