"""The offload manager on a real GPU: stream ordering and CUDA contexts (skipped without one).

Found by review, never run on a GPU when written: a synchronous engine's
copies ran on the manager's background thread, whose current stream is the
legacy default one, which does not wait for an engine computing on a stream
of its own (vLLM does); and pinning from a worker thread, whose current
device is GPU 0, created a CUDA context there for every rank.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap

import pytest
import torch

from kvtier import KVCacheBlocks, Request
from kvtier.tiers.cpu import CpuTier
from tests.offload_env import DEADLINE, LAYOUT, Env, key, pattern, scheduled, store_blocking

CUDA = torch.cuda.is_available()
SLEEP_CYCLES = 1 << 29  # a "forward pass" of a few hundred milliseconds


def forward_pass(env: Env) -> Request:
    """A request of two blocks whose KV a slow "forward pass" writes, its store planned.

    The pass is queued on the current stream: a sleep, then the blocks' bytes
    (zeroed before), so a copy not ordered after it reads zeros.
    """
    request = env.request(2)
    blocks = env.alloc(request, 2)
    ids = blocks.get_block_ids()[0]
    written = env.cache[ids].clone()
    env.cache[ids] = 0
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    env.cache[ids] = written
    env.manager.update_state_after_alloc(request, blocks, 0)
    plan = env.manager.build_step(scheduled(new={request.request_id: blocks}))
    env.manager.step_computed(plan.step_id)
    return request


def assert_stored(env: Env, request: Request) -> None:
    """The CPU tier holds the bytes the "forward pass" wrote for the request's two blocks."""
    cpu = env.tiers[0]
    assert isinstance(cpu, CpuTier)
    for position in (0, 1):
        slot = env.manager.indexes[0].slot_of(key(request, position))
        assert slot is not None
        row = cpu.slot_view([slot])
        assert row is not None
        assert torch.equal(row[0], pattern(key(request, position)))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("entered", ["on the engine's stream", "before the engine's stream"])
def test_a_sync_engine_on_its_own_stream_stores_what_its_forward_pass_wrote(entered: str) -> None:
    """The engine's current stream is passed on when entering and with every job it plans."""
    engine = torch.cuda.Stream()
    env = Env(gpu_blocks=16, device="cuda", tiers=[CpuTier(LAYOUT, 8)])
    with contextlib.ExitStack() as stack:
        if entered == "on the engine's stream":
            stack.enter_context(torch.cuda.stream(engine))
            stack.enter_context(env.manager)
        else:  # an engine that switches streams after entering
            stack.enter_context(env.manager)
            stack.enter_context(torch.cuda.stream(engine))
        request = forward_pass(env)  # queued on the engine's stream
        assert env.manager.wait_idle_blocking(DEADLINE)
        assert_stored(env, request)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.asyncio
async def test_an_async_engine_that_left_its_stream_block_stores_what_it_wrote() -> None:
    """The planning-time stream, recorded as an event, orders the job (not the loop thread's
    stream when the job issues its copy: by then the engine left ``with torch.cuda.stream``)."""
    engine = torch.cuda.Stream()
    env = Env(gpu_blocks=16, device="cuda", tiers=[CpuTier(LAYOUT, 8)])
    async with env.manager as manager:
        with torch.cuda.stream(engine):
            request = forward_pass(env)
        await manager.wait_idle()  # the job starts here, on the default stream
        assert_stored(env, request)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_a_sync_engine_s_loads_land_after_its_queued_work_on_the_target_blocks() -> None:
    """Loads start at ``build_step``, while the previous forward pass may still run."""
    engine = torch.cuda.Stream()
    with torch.cuda.stream(engine):
        env = Env(gpu_blocks=16, device="cuda", tiers=[CpuTier(LAYOUT, 8)])
        with env.manager:
            a = env.request(2)
            store_blocking(env, a, 2)
            again = env.request(2, like=a)
            assert env.manager.get_num_new_matched_tokens(again, 0) == (2 * LAYOUT.block_size, True)
            targets = KVCacheBlocks((env.fresh(2),))
            ids = targets.get_block_ids()[0]
            torch.cuda.synchronize()
            # The previous step's forward pass, still writing these (freed) blocks.
            torch.cuda._sleep(SLEEP_CYCLES)
            env.cache[ids] = 0x11
            env.manager.update_state_after_alloc(again, targets, 2 * LAYOUT.block_size)
            env.manager.build_step(scheduled(new={again.request_id: targets}))
            assert env.manager.wait_for_loads_blocking([again.request_id], DEADLINE)
            torch.cuda.synchronize()
            assert all(env.holds(block, again, i) for i, block in enumerate(targets.blocks[0]))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_cpu_tier_of_gpu_1_creates_no_context_on_gpu_0() -> None:
    script = textwrap.dedent(
        """
        import anyio, torch
        from kvtier.tiers.base import BlockLayout
        from kvtier.tiers.cpu import CpuTier

        async def main():
            layout = BlockLayout(num_layers=1, block_size=16, num_kv_heads=1, head_size=8)
            torch.cuda.set_device(1)
            async with CpuTier(layout, 4, device="cuda:1") as tier:
                assert tier.pinned
            print(torch._C._cuda_hasPrimaryContext(0), torch._C._cuda_hasPrimaryContext(1))

        anyio.run(main)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.split() == ["False", "True"]
