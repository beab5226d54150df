"""``kvtier replay`` through a device + CPU + Redis stack, against a real server."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.config import load_config, parse_config
from kvtier.replay import chat_workload, replay
from tests.redis_server import RedisServer, redis_server

__all__ = ["redis_server"]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "configs" / "device-cpu-redis.toml"
BLOCK_BYTES = 2 * 16 * 1 * 8 * 2


@pytest.mark.asyncio
async def test_replay_loads_verified_blocks_back_from_redis(redis_server: RedisServer) -> None:
    config = parse_config(
        {
            "layout": {"num_layers": 1, "block_size": 16, "num_kv_heads": 1, "head_size": 8},
            "offload": {"prefetch": "wait_complete"},
            "tiers": [
                {"kind": "device", "capacity": 64 * BLOCK_BYTES},
                {"kind": "cpu", "capacity": 48 * BLOCK_BYTES},
                {
                    "kind": "redis",
                    "capacity": 4096 * BLOCK_BYTES,
                    "url": redis_server.url,
                    "model": "m",
                },
            ],
        }
    )
    workload = chat_workload(users=6, rounds=4, system_prompt=256, question=32, answer=64)
    report = await replay(config, workload)
    _, remote = report.tiers
    assert remote.name == "redis"
    assert remote.demotions > 0  # CPU evictions went to Redis
    assert remote.hits > 0
    assert remote.loaded_blocks > 0
    assert report.verified_blocks == (report.device_hit_tokens + report.loaded_tokens) // 16
    with redis_server.client() as admin:
        assert admin.dbsize() > 0


def test_example_redis_config_loads() -> None:
    config = load_config(EXAMPLE)
    assert [tier.kind for tier in config.tiers] == ["device", "cpu", "redis"]
    assert config.tiers[2].redis is not None


ENGINE_A = """
import json, sys, anyio
from kvtier.config import parse_config
from kvtier.replay import chat_workload, replay
config = parse_config(json.loads(sys.argv[1]))
workload = chat_workload(users=3, rounds=2, system_prompt=256, question=32, answer=64)
report = anyio.run(lambda: replay(config, workload))
print(json.dumps({"stored": report.tiers[-1].stored_blocks}))
"""


def _shared_config(
    url: str, *, head_size: int = 8, scan: bool = False, probe: bool = True
) -> dict[str, object]:
    block = 2 * 16 * 1 * head_size * 2
    return {
        "layout": {"num_layers": 1, "block_size": 16, "num_kv_heads": 1, "head_size": head_size},
        "offload": {"prefetch": "wait_complete", "max_probe_blocks": 256 if probe else 0},
        "tiers": [
            {"kind": "device", "capacity": 64 * block},
            {
                "kind": "redis",
                "capacity": 4096 * block,
                "url": url,
                "scan_on_open": scan,
                "model": "m",
            },
        ],
    }


def run_engine_a(url: str) -> None:
    """Engine A: another process replays the chat workload through Redis and exits."""
    import json
    import subprocess
    import sys

    first = subprocess.run(
        [sys.executable, "-c", ENGINE_A, json.dumps(_shared_config(url))],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(first.stdout.strip().splitlines()[-1])["stored"] > 0


@pytest.mark.asyncio
async def test_engine_b_loads_from_redis_what_engine_a_computed_in_another_process(
    redis_server: RedisServer,
) -> None:
    run_engine_a(redis_server.url)
    workload = chat_workload(users=3, rounds=2, system_prompt=256, question=32, answer=64)
    # Engine B: a fresh device cache; it knows Redis's blocks from the scan on
    # open alone (probing off).
    b = await replay(
        parse_config(_shared_config(redis_server.url, scan=True, probe=False)), workload
    )
    remote = b.tiers[-1]
    assert remote.hits > 0
    assert remote.loaded_blocks > 0
    assert b.loaded_tokens > 0
    assert b.verified_blocks == (b.device_hit_tokens + b.loaded_tokens) // 16  # A's bytes
    # Another layout (head size 16) shares the server but never a key.
    other = await replay(
        parse_config(_shared_config(redis_server.url, head_size=16, scan=True)), workload
    )
    assert other.tiers[-1].hits == 0
    assert other.loaded_tokens == 0


@pytest.mark.asyncio
async def test_engine_b_without_a_scan_finds_engine_as_blocks_by_probing(
    redis_server: RedisServer,
) -> None:
    run_engine_a(redis_server.url)
    workload = chat_workload(users=3, rounds=2, system_prompt=256, question=32, answer=64)
    # No scan on open: B's Redis index starts empty; lookups probe Redis instead.
    b = await replay(parse_config(_shared_config(redis_server.url)), workload)
    remote = b.tiers[-1]
    assert remote.probed_blocks > 0
    assert remote.loaded_blocks > 0
    assert b.verified_blocks == (b.device_hit_tokens + b.loaded_tokens) // 16  # A's bytes
    # With probing off and no scan, B knows nothing of A's blocks.
    c = await replay(parse_config(_shared_config(redis_server.url, probe=False)), workload)
    assert c.tiers[-1].probed_blocks == 0
    assert c.loaded_tokens < b.loaded_tokens


@pytest.mark.asyncio
async def test_the_example_redis_config_replays_against_a_real_server(
    redis_server: RedisServer,
) -> None:
    import tomllib

    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    # The example's offload and Redis settings as they are; its model-sized
    # layout and capacities scaled down to this machine, its URL to the test server.
    data["layout"] = {"num_layers": 1, "block_size": 16, "num_kv_heads": 1, "head_size": 8}
    device, cpu, remote = data["tiers"]
    device["capacity"], cpu["capacity"] = 64 * BLOCK_BYTES, 48 * BLOCK_BYTES
    remote["capacity"], remote["url"] = 4096 * BLOCK_BYTES, redis_server.url
    data["offload"]["prefetch"] = "wait_complete"  # every hit loaded, whatever this VM's speed
    for unread in ("prefetch_timeout", "prefetch_timeout_per_1k_tokens"):
        del data["offload"][unread]
    workload = chat_workload(users=6, rounds=4, system_prompt=256, question=32, answer=64)
    report = await replay(parse_config(data), workload)
    tier = report.tiers[-1]
    assert tier.name == "redis"
    assert tier.demotions > 0
    assert tier.loaded_blocks > 0
    assert report.verified_blocks == (report.device_hit_tokens + report.loaded_tokens) // 16
