"""Config values at the edges: huge integers, look-alike letters, inexact sizes, secrets, db paths.

Each is a typed :class:`~kvtier.errors.ConfigError` with a message naming the
key, and ``kvtier replay`` turns it into one line on stderr and exit status 2.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from kvtier.cli import main
from kvtier.config import parse_config
from kvtier.config_redis import RedisOptions, parse_redis_options, url_problem
from kvtier.config_units import parse_duration, parse_size
from kvtier.errors import ConfigError
from kvtier.tiers.redis import RedisTier
from tests.test_tier_redis import LAYOUT, MODEL

HUGE = 10**400  # TOML integers have no limit; float() of this raises OverflowError
BASE: dict[str, Any] = {
    "layout": {"num_layers": 1, "block_size": 16, "num_kv_heads": 1, "head_size": 8},
    "offload": {"prefetch": "timeout"},
    "tiers": [
        {"kind": "cpu", "capacity": "1MiB"},
        {"kind": "redis", "capacity": "1MiB", "model": "m", "url": "redis://h:1/0"},
    ],
}


def config_error(section: str, key: str, value: object) -> str:
    """The message of the ConfigError that ``BASE`` with ``key = value`` raises."""
    data = copy.deepcopy(BASE)
    table = data["tiers"][1] if section == "redis" else data[section]
    table[key] = value
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


# -- 1: integers too large for a float ----------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "shown"),
    [
        ("offload", "prefetch_timeout", "offload.prefetch_timeout"),
        ("offload", "prefetch_timeout_per_1k_tokens", "offload.prefetch_timeout_per_1k_tokens"),
        ("redis", "ttl", "tiers[1].ttl"),
        ("redis", "timeout", "tiers[1].timeout"),
        ("redis", "connect_timeout", "tiers[1].connect_timeout"),
    ],
)
def test_a_huge_integer_duration_is_a_config_error(section: str, key: str, shown: str) -> None:
    message = config_error(section, key, HUGE)
    assert message.startswith(f"{shown}: 1000")
    assert "more than a year" in message
    assert len(message) < 200  # the 401 digits are cut short
    assert "is not a duration" in config_error(section, key, -HUGE)


def test_the_largest_durations_and_sizes_are_exact_at_their_limits() -> None:
    assert parse_duration(86_400 * 365) == 86_400.0 * 365
    with pytest.raises(ConfigError, match="more than a year"):
        parse_duration(86_400 * 365 + 1)
    assert parse_size(1 << 60) == 1 << 60
    with pytest.raises(ConfigError, match="more than 1 EiB"):
        parse_size(HUGE)
    with pytest.raises(ConfigError, match="more than 1 EiB"):
        parse_size(str((1 << 60) + 1))


@pytest.mark.parametrize(
    ("parse", "unit", "reason"),
    [(parse_size, "", "more than 1 EiB"), (parse_duration, "s", "more than a year")],
)
def test_a_number_of_millions_of_digits_is_a_config_error(
    parse: Any, unit: str, reason: str
) -> None:
    # Past the default decimal context's exponent range (decimal.Overflow before).
    with pytest.raises(ConfigError, match=reason) as info:
        parse("1" * 2_000_000 + unit, key="k")
    assert len(str(info.value)) < 200


# -- 2: letters that only Unicode case folding makes units ---------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "16M\u0131b",  # dotless i: matched "i" under re.IGNORECASE, then KeyError
        "1K\u0131B",
        "16\u212aiB",  # Kelvin sign: matched "k", and lower() made it one
        "16\u212aB",
        "8\u00a0GiB",  # a no-break space is not a space in a config
    ],
)
def test_a_unit_with_a_look_alike_letter_is_not_a_size(text: str) -> None:
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.capacity: .* is not a size; expected"):
        parse_config({**BASE, "tiers": [{"kind": "cpu", "capacity": text}]})


@pytest.mark.parametrize("text", ["1\u017f", "50m\u017f", "5\u00a0s"])  # long s, no-break space
def test_a_unit_with_a_look_alike_letter_is_not_a_duration(text: str) -> None:
    with pytest.raises(ConfigError, match="is not a duration; expected"):
        parse_duration(text, key="offload.prefetch_timeout")


def test_units_still_ignore_ascii_case() -> None:
    assert parse_size("16mib") == parse_size("16MIB") == parse_size(" 16 MiB ") == 16 << 20
    assert parse_size("2kb") == 2000


# -- 3: sizes that are almost a whole number of bytes --------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "1.0000000000000000000000000001 GiB",  # the default 28 digits rounded it to 1 GiB
        "16777216.0000000000000000000001",
        "1152921504606846975.9999999999999999999999999999999999",  # rounded to 1 EiB
        "0.5B",
        "0.0001 KiB",
    ],
)
def test_a_size_that_is_not_a_whole_number_of_bytes_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="is not a whole number of bytes") as info:
        parse_size(text, key="tiers[0].capacity")
    assert str(info.value).startswith("tiers[0].capacity: ")


def test_a_fraction_of_a_unit_that_is_whole_bytes_is_exact() -> None:
    assert parse_size("1." + "0" * 60 + " KiB") == 1024
    assert parse_size("0.5 KiB") == 512
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("0.000000000001 TB") == 1


# -- 4: password_env holding the password itself -------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "hunter2-actual-password",
        "S3cr3t!pw",
        "pass word",
        "x" * 200,
        "9lives",
        "d41d8cd98f00b204e9800998ecf8427e",  # a generated password looks like a name
        "Summer2024",
        "KVTIER_TEST_UNSET_PASSWORD",
    ],
)
def test_an_unset_password_env_is_never_quoted(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(value, raising=False)
    with pytest.raises(ConfigError, match="never the password itself") as info:
        RedisOptions(model="m", password_env=value).password()
    assert value[:6] not in str(info.value)


def test_a_set_password_env_gives_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVTIER_TEST_UNSET_PASSWORD", "pw")
    assert RedisOptions(model="m", password_env="KVTIER_TEST_UNSET_PASSWORD").password() == "pw"


@pytest.mark.parametrize(
    ("name", "value"),
    [("password_env", 123456), ("url", ["redis://:hunter2@cache:6379/0"])],
)
def test_a_password_env_or_url_that_is_not_a_string_is_not_quoted(name: str, value: object) -> None:
    table = {"kind": "redis", "capacity": "16MiB", "model": "m", name: value}
    kind = type(value).__name__
    with pytest.raises(
        ConfigError, match=f"{name}: a value of type {kind} is not a string"
    ) as info:
        parse_redis_options(table, "tiers[1]")
    assert "123456" not in str(info.value)
    assert "hunter2" not in str(info.value)


def test_a_tier_that_is_not_a_table_is_not_quoted() -> None:
    """``tiers = ["redis://:pw@host"]``: the value may be a URL with its password."""
    data = {**BASE, "tiers": ["redis://:hunter2@cache:6379/0"]}
    with pytest.raises(ConfigError, match="expected a table, got a value of type str") as info:
        parse_config(data)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    "word", ["MySecretPassw0rd", "hunter2", "Sekr1t_pw", "correct_horse_battery_staple"]
)
def test_a_bare_word_in_a_urls_query_is_not_quoted(word: str) -> None:
    """A password pasted into the query as a bare word is not shown in the error."""
    problem = url_problem(f"redis://cache:6379/0?{word}")
    assert problem is not None
    assert "a parameter" in problem
    assert word not in problem


# -- 5: a TCP URL's path and db parameters ---------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis://127.0.0.1:1/notanumber", "has a path that is not a database number"),
        ("rediss://h:6380/0/", "has a path that is not a database number"),
        ("redis://h/%31", "has a path that is not a database number"),
        ("redis://h/\u0663", "has a path that is not a database number"),  # Arabic-Indic 3
        ("redis://h/1234567890", "has a path that is not a database number"),
        ("redis://h:1/0?db=x", "sets db in its query to something that is not a database"),
        ("redis://h:1/0?db=", "sets db in its query to something that is not a database"),
        ("unix:///run/redis.sock?db=one", "sets db in its query to something that is not a"),
        ("redis://h:1/0?db=1&db=2", "sets db in its query more than once"),
        ("redis://h:1/3?db=5", "names one database in its path and another in its query"),
    ],
)
def test_a_database_that_redis_py_would_not_use_is_refused(url: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=rf"^tiers\[1\]\.url: .* {reason}"):
        parse_redis_options({"url": url, "model": "m"}, "tiers[1]")
    with pytest.raises(ConfigError, match=reason):
        RedisTier(LAYOUT, 4, model=MODEL, url=url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://:S3cr3t@127.0.0.1:1/notanumber",
        "redis://user:S3cr3t@h:1/3?db=5",
        "redis://h:1/0?password=S3cr3t&db=x",
        "unix://:S3cr3t@/run/redis.sock?db=x",
    ],
)
def test_a_refused_database_never_shows_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_redis_options({"url": url, "model": "m"}, "tiers[1]")
    assert "S3cr3t" not in str(info.value)
    assert "***" in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:6379",
        "redis://h:6379/",
        "redis://h:6379/15",
        "redis://h:6379/0?db=5",  # the default /0, overridden
        "redis://h:6379/5?db=5",
        "redis://h:6379?db=5",
        "unix:///run/redis/not-a-number.sock",  # a socket's path
        "unix:///run/redis.sock?db=3",
    ],
)
def test_a_database_number_or_a_socket_path_is_accepted(url: str) -> None:
    assert url_problem(url) is None
    assert parse_redis_options({"url": url, "model": "m"}, "tiers[1]").url == url


# -- the command line: one line on stderr, exit status 2 -------------------------------------

HEAD = "[layout]\nnum_layers = 1\nblock_size = 512\nnum_kv_heads = 1\nhead_size = 8\n"
CPU = '[[tiers]]\nkind = "cpu"\ncapacity = "1MiB"\n'
REDIS = '[[tiers]]\nkind = "redis"\ncapacity = "16MiB"\nmodel = "m"\n'


@pytest.mark.parametrize(
    ("toml", "expected", "absent"),
    [
        (
            f'{HEAD}[offload]\nprefetch = "timeout"\nprefetch_timeout = 1{"0" * 400}\n{CPU}',
            "offload.prefetch_timeout: ",
            "OverflowError",
        ),
        (HEAD + CPU.replace("1MiB", "16M\u0131b"), "tiers[0].capacity: ", "KeyError"),
        (
            HEAD + CPU + f'{REDIS}url = "redis://127.0.0.1:1/notanumber"\n',
            "tiers[1].url: 'redis://127.0.0.1:1/notanumber' has a path",
            "Traceback",
        ),
        (
            HEAD + CPU + f'{REDIS}url = "redis://127.0.0.1:1/0"\n'
            'password_env = "hunter2-actual-password"\n',
            "never the password itself",
            "hunter2",
        ),
        (  # past Python's limit on digits: tomllib itself raises ValueError
            f'{HEAD}[offload]\nprefetch = "timeout"\nprefetch_timeout = 1{"1" * 5000}\n{CPU}',
            "a value is out of range",
            "Traceback",
        ),
    ],
    ids=["prefetch_timeout", "dotless-i", "db-path", "password_env", "5000-digits"],
)
def test_replay_of_a_bad_config_exits_2_with_one_line(
    tmp_path: Path,
    toml: str,
    expected: str,
    absent: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(toml, encoding="utf-8")
    monkeypatch.delenv("hunter2-actual-password", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    command = ["replay", str(config), "--workload", "sample", "--limit", "1", "--no-progress"]
    assert main(command) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kvtier: error: ")
    assert expected in lines[0]
    assert absent not in err
    assert "Traceback" not in err
