"""DeviceTier and CpuTier: canonical bytes, batches, strided buffers, lifecycle, CUDA."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Sequence

import anyio
import pytest
import pytest_asyncio
import torch
from structlog.testing import capture_logs

from kvtier.errors import ClosedError, ConfigError, InvalidRequestError
from kvtier.tiers._copy import OFFLOAD_MIN_BYTES, STAGING_BYTES
from kvtier.tiers.base import BlockLayout, BlockStore
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.gpu import DeviceTier

SMALL = BlockLayout(num_layers=2, block_size=4, num_kv_heads=2, head_size=8, dtype="float16")
BB = SMALL.block_bytes  # 512
NUM_BLOCKS = 600
CUDA = torch.cuda.is_available()


def rand_bytes(*shape: int, device: str | torch.device = "cpu") -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8).to(device)


def per_layer_cache(
    layout: BlockLayout = SMALL, num_blocks: int = NUM_BLOCKS, device: str = "cpu"
) -> list[torch.Tensor]:
    """Random bytes in 2 * num_layers tensors [K0, V0, K1, V1, ...]."""
    return [
        rand_bytes(num_blocks, layout.page_bytes, device=device)
        .view(layout.torch_dtype)
        .view(num_blocks, *layout.page_shape)
        for _ in range(2 * layout.num_layers)
    ]


def cross_layer_cache(
    layout: BlockLayout = SMALL, num_blocks: int = NUM_BLOCKS, device: str = "cpu"
) -> torch.Tensor:
    shape = (num_blocks, layout.num_layers, 2, *layout.page_shape)
    return (
        rand_bytes(num_blocks, layout.block_bytes, device=device)
        .view(layout.torch_dtype)
        .view(shape)
    )


def canonical(cache: torch.Tensor | Sequence[torch.Tensor], slots: Sequence[int]) -> torch.Tensor:
    """The reference canonical bytes of ``slots``, built without the tier."""
    if isinstance(cache, torch.Tensor):
        rows = cache.reshape(cache.shape[0], -1).view(torch.uint8)
    else:
        pages = [t.reshape(t.shape[0], -1).view(torch.uint8) for t in cache]
        rows = torch.cat(pages, dim=1)
    return rows[list(slots)].cpu()


def make_device_tier(
    kind: str, *, offload_min_bytes: int = OFFLOAD_MIN_BYTES, staging_bytes: int = STAGING_BYTES
) -> tuple[DeviceTier, torch.Tensor | list[torch.Tensor]]:
    cache: torch.Tensor | list[torch.Tensor]
    cache = per_layer_cache() if kind == "per-layer" else cross_layer_cache()
    tier = DeviceTier(
        cache, SMALL, offload_min_bytes=offload_min_bytes, staging_bytes=staging_bytes
    )
    return tier, cache


def keys_for(slots: Sequence[int]) -> list[bytes]:
    return [s.to_bytes(8, "little") for s in slots]


@pytest_asyncio.fixture
async def cpu_tier() -> AsyncIterator[CpuTier]:
    async with CpuTier(SMALL, NUM_BLOCKS) as tier:
        yield tier


KINDS = ["per-layer", "cross-layer"]


# -- protocol and canonical order ------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_tiers_are_block_stores(kind: str) -> None:
    tier, _ = make_device_tier(kind)
    assert isinstance(tier, BlockStore)
    assert (tier.name, tier.layout, tier.num_slots, tier.closed) == (
        "gpu",
        SMALL,
        NUM_BLOCKS,
        False,
    )
    assert tier.cross_layer is (kind == "cross-layer")
    assert tier.device == torch.device("cpu")
    cpu = CpuTier(SMALL, 8, name="host")
    assert isinstance(cpu, BlockStore)
    assert (cpu.name, cpu.layout, cpu.num_slots) == ("host", SMALL, 8)
    assert "not open" in repr(cpu)
    assert "per-layer" in repr(tier) or "cross-layer" in repr(tier)
    await tier.aclose()


@pytest.mark.asyncio
async def test_per_layer_bytes_land_in_their_layer_and_k_or_v() -> None:
    layout = BlockLayout(num_layers=3, block_size=4, num_kv_heads=2, head_size=8)
    cache = [torch.empty(5, *layout.page_shape, dtype=torch.float16) for _ in range(6)]
    for i, tensor in enumerate(cache):  # tensor i = layer i // 2, K (even) or V (odd)
        for block in range(5):
            tensor[block] = 100 * i + block
    tier = DeviceTier(cache, layout)
    out = torch.empty(2, layout.block_bytes, dtype=torch.uint8)
    await tier.read_into([3, 1], keys_for([3, 1]), out)
    pages = out.view(2, 3, 2, layout.page_bytes)  # [row, layer, K/V, page]
    for row, block in enumerate([3, 1]):
        for layer in range(3):
            for kv in range(2):
                values = pages[row, layer, kv].view(torch.float16)
                assert torch.all(values == 100 * (2 * layer + kv) + block)

    # And back: canonical bytes of known values go to the right tensors.
    data = torch.empty(1, layout.block_bytes, dtype=torch.uint8)
    data.view(torch.float16).view(3, 2, -1)[:, :] = torch.tensor([[-1.0], [-2.0]])
    data.view(torch.float16).view(3, 2, -1)[2, 1] = -9.0
    await tier.write_from([4], keys_for([4]), data)
    assert torch.all(cache[0][4] == -1)
    assert torch.all(cache[1][4] == -2)
    assert torch.all(cache[4][4] == -1)
    assert torch.all(cache[5][4] == -9)
    assert torch.all(cache[5][3] == 503)  # neighbours untouched


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_read_matches_reference_canonical_bytes(kind: str) -> None:
    tier, cache = make_device_tier(kind)
    slots = [17, 3, 599, 0, 3]  # unordered, repeated
    out = torch.empty(len(slots), BB, dtype=torch.uint8)
    await tier.read_into(slots, keys_for(slots), out)
    assert torch.equal(out, canonical(cache, slots))


# -- round trips -------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 7, 64, 129, 512])
@pytest.mark.parametrize("order", ["run", "shuffled"])
async def test_round_trip_device_cpu_device(
    kind: str, n: int, order: str, cpu_tier: CpuTier
) -> None:
    tier, cache = make_device_tier(kind)
    rng = random.Random(n)
    dev_slots = rng.sample(range(NUM_BLOCKS), n) if order == "shuffled" else list(range(5, 5 + n))
    cpu_slots = rng.sample(range(NUM_BLOCKS), n) if order == "shuffled" else list(range(50, 50 + n))
    keys = keys_for(dev_slots)
    original = canonical(cache, dev_slots)

    # store: device -> staging -> CPU
    staging = torch.empty(n, BB, dtype=torch.uint8)
    await tier.read_into(dev_slots, keys, staging)
    await cpu_tier.write_from(cpu_slots, keys, staging)
    # wipe the device blocks, then load them back: CPU -> staging -> device
    await tier.write_from(dev_slots, keys, torch.zeros(n, BB, dtype=torch.uint8))
    assert not canonical(cache, dev_slots).any()
    back = torch.empty(n, BB, dtype=torch.uint8)
    await cpu_tier.read_into(cpu_slots, keys, back)
    await tier.write_from(dev_slots, keys, back)
    assert torch.equal(canonical(cache, dev_slots), original)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_slot_view_lets_the_device_gather_and_scatter_in_place(
    kind: str, cpu_tier: CpuTier
) -> None:
    tier, cache = make_device_tier(kind)
    dev_slots = [9, 2, 40, 41]
    view = cpu_tier.slot_view([10, 11, 12, 13])
    assert view is not None
    assert view.shape == (4, BB)
    await tier.read_into(dev_slots, keys_for(dev_slots), view)
    check = torch.empty(4, BB, dtype=torch.uint8)
    await cpu_tier.read_into([10, 11, 12, 13], keys_for(dev_slots), check)
    assert torch.equal(check, canonical(cache, dev_slots))
    await tier.write_from([100, 101, 102, 103], keys_for(dev_slots), view)
    assert torch.equal(canonical(cache, [100, 101, 102, 103]), check)

    assert cpu_tier.slot_view([3, 5]) is None
    assert cpu_tier.slot_view([5, 4]) is None
    assert cpu_tier.slot_view([]) is None
    single = cpu_tier.slot_view([599])
    assert single is not None
    assert single.shape == (1, BB)
    with pytest.raises(InvalidRequestError, match="out of range"):
        cpu_tier.slot_view([599, 600])


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_partial_batches_leave_other_slots_alone(kind: str) -> None:
    tier, cache = make_device_tier(kind)
    before = canonical(cache, range(NUM_BLOCKS))
    slots = [4, 6, 8, 300]
    data = rand_bytes(len(slots), BB)
    await tier.write_from(slots, keys_for(slots), data)
    after = canonical(cache, range(NUM_BLOCKS))
    assert torch.equal(after[slots], data)
    others = [s for s in range(NUM_BLOCKS) if s not in slots]
    assert torch.equal(after[others], before[others])


@pytest.mark.asyncio
async def test_cpu_tier_batches_of_every_size(cpu_tier: CpuTier) -> None:
    rng = random.Random(0)
    mirror = torch.zeros(NUM_BLOCKS, BB, dtype=torch.uint8)
    for n in [1, 3, 16, 128, 512]:
        slots = rng.sample(range(NUM_BLOCKS), n)
        data = rand_bytes(n, BB)
        await cpu_tier.write_from(slots, keys_for(slots), data)
        mirror[slots] = data
        read = rng.sample(range(NUM_BLOCKS), n)
        out = torch.empty(n, BB, dtype=torch.uint8)
        await cpu_tier.read_into(read, keys_for(read), out)
        assert torch.equal(out, mirror[read])


def strided_buffers(n: int) -> dict[str, torch.Tensor]:
    """Views of [n, BB] that are not plain contiguous tensors."""
    return {
        "padded-rows": torch.zeros(n, BB + 64, dtype=torch.uint8)[:, 16 : 16 + BB],
        "odd-offset": torch.zeros(n, BB + 8, dtype=torch.uint8)[:, 3 : 3 + BB],
        "every-other-row": torch.zeros(2 * n, BB, dtype=torch.uint8)[::2],
        "transposed": torch.zeros(BB, n, dtype=torch.uint8).t(),
    }


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", [*KINDS, "cpu"])
@pytest.mark.parametrize(
    "layout_name", ["padded-rows", "odd-offset", "every-other-row", "transposed"]
)
@pytest.mark.parametrize("offload", [False, True])
async def test_strided_views_in_and_out(kind: str, layout_name: str, offload: bool) -> None:
    offload_min_bytes = 0 if offload else 1 << 30
    staging_bytes = 3 * BB
    tier: DeviceTier | CpuTier
    if kind == "cpu":
        tier = CpuTier(
            SMALL, NUM_BLOCKS, offload_min_bytes=offload_min_bytes, staging_bytes=staging_bytes
        )
        await tier.__aenter__()
    else:
        tier, _ = make_device_tier(
            kind, offload_min_bytes=offload_min_bytes, staging_bytes=staging_bytes
        )
    n = 7
    slots = [70, 3, 12, 13, 14, 500, 8]
    data = strided_buffers(n)[layout_name]
    data.copy_(rand_bytes(n, BB))
    await tier.write_from(slots, keys_for(slots), data)
    out = strided_buffers(n)[layout_name]
    await tier.read_into(slots, keys_for(slots), out)
    assert torch.equal(out, data)
    run = strided_buffers(3)[layout_name]
    await tier.read_into([12, 13, 14], keys_for([12, 13, 14]), run)
    assert torch.equal(run, data[2:5])
    await tier.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "layout",
    [
        BlockLayout(1, 1, 1, 1, dtype="int8"),  # 1-byte pages: moved byte by byte
        BlockLayout(2, 3, 1, 5, dtype="float32"),  # 60-byte pages: 4-byte words
        BlockLayout(2, 4, 2, 8, dtype="bfloat16"),
        BlockLayout(3, 2, 1, 16, dtype="float8_e4m3fn"),
    ],
)
async def test_other_dtypes_and_odd_page_sizes(layout: BlockLayout) -> None:
    for cache in (per_layer_cache(layout, 20), cross_layer_cache(layout, 20)):
        tier = DeviceTier(cache, layout)
        slots = [19, 0, 7, 8]
        out = torch.empty(4, layout.block_bytes, dtype=torch.uint8)
        await tier.read_into(slots, keys_for(slots), out)
        assert torch.equal(out, canonical(cache, slots))
        data = rand_bytes(4, layout.block_bytes)
        await tier.write_from(slots, keys_for(slots), data)
        assert torch.equal(canonical(cache, slots), data)


@pytest.mark.asyncio
async def test_every_bit_pattern_survives(cpu_tier: CpuTier) -> None:
    # NaNs (signalling too), infinities and denormals, as float64 / complex128 words.
    patterns = [0x7FF0000000000001, 0xFFF8000000000001, 0x7FF0000000000000, 0x1, 0xFFFFFFFFFFFFFFFF]
    words = torch.tensor(patterns * (BB // 8 // len(patterns) + 1), dtype=torch.uint64)
    data = words[: BB // 8].view(torch.uint8).view(1, BB).repeat(3, 1)
    for tier, _ in (make_device_tier("per-layer"), make_device_tier("cross-layer")):
        await tier.write_from([5, 1, 9], keys_for([5, 1, 9]), data)
        out = torch.empty(3, BB, dtype=torch.uint8)
        await tier.read_into([5, 1, 9], keys_for([5, 1, 9]), out)
        assert torch.equal(out, data)
    await cpu_tier.write_from([5, 1, 9], keys_for([5, 1, 9]), data)
    out = torch.empty(3, BB, dtype=torch.uint8)
    await cpu_tier.read_into([5, 1, 9], keys_for([5, 1, 9]), out)
    assert torch.equal(out, data)


@pytest.mark.asyncio
async def test_engine_style_strided_per_layer_tensors() -> None:
    # vLLM-style: one [2, num_blocks, ...] tensor per layer, and a [num_blocks, 2, ...] one.
    kv0 = torch.randn(2, 30, *SMALL.page_shape).half()
    kv1 = torch.randn(30, 2, *SMALL.page_shape).half()
    cache = [kv0[0], kv0[1], kv1[:, 0], kv1[:, 1]]
    tier = DeviceTier(tuple(cache), SMALL)
    slots = [29, 4, 5]
    out = torch.empty(3, BB, dtype=torch.uint8)
    await tier.read_into(slots, keys_for(slots), out)
    assert torch.equal(out, canonical(cache, slots))
    data = rand_bytes(3, BB)
    await tier.write_from(slots, keys_for(slots), data)
    assert torch.equal(canonical(cache, slots), data)


@pytest.mark.asyncio
async def test_uint8_and_flat_cross_layer_pools() -> None:
    flat = rand_bytes(10, BB)
    tier = DeviceTier(flat, SMALL)
    out = torch.empty(2, BB, dtype=torch.uint8)
    await tier.read_into([7, 2], keys_for([7, 2]), out)
    assert torch.equal(out, flat[[7, 2]])
    per_layer_flat = rand_bytes(10, BB).view(torch.float16).view(10, 2, -1)
    tier = DeviceTier(per_layer_flat, SMALL)
    await tier.read_into([7, 2], keys_for([7, 2]), out)
    assert torch.equal(out, canonical(per_layer_flat, [7, 2]))


@pytest.mark.asyncio
async def test_empty_batches_are_no_ops(cpu_tier: CpuTier) -> None:
    tier, _ = make_device_tier("per-layer")
    empty = torch.empty(0, BB, dtype=torch.uint8)
    for store in (tier, cpu_tier):
        await store.read_into([], [], empty)
        await store.write_from([], [], empty)


@pytest.mark.asyncio
async def test_copies_are_logged_with_sizes(cpu_tier: CpuTier) -> None:
    with capture_logs() as logs:
        await cpu_tier.write_from([1, 2], keys_for([1, 2]), rand_bytes(2, BB))
    (event,) = [e for e in logs if e["event"] == "tier_write"]
    assert (event["tier"], event["n_blocks"], event["bytes"]) == ("cpu", 2, 2 * BB)
    assert event["seconds"] >= 0


# -- errors ------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", [*KINDS, "cpu"])
async def test_bad_requests_raise_and_change_nothing(kind: str) -> None:
    tier: DeviceTier | CpuTier
    if kind == "cpu":
        tier = await CpuTier(SMALL, NUM_BLOCKS).__aenter__()
    else:
        tier, _ = make_device_tier(kind)
    before = torch.empty(NUM_BLOCKS, BB, dtype=torch.uint8)
    await tier.read_into(range(NUM_BLOCKS), [b""] * NUM_BLOCKS, before)
    good = rand_bytes(2, BB)
    bad_calls = {
        "out of range": ([1, NUM_BLOCKS], keys_for([1, 2]), good),
        "out of range ": ([-1, 2], keys_for([1, 2]), good),
        "2 slots but 1 keys": ([1, 2], [b"k"], good),
        "buffer must be uint8": ([1, 2], keys_for([1, 2]), good.view(torch.int16)),
        "buffer must be uint8 ": ([1, 2], keys_for([1, 2]), good[:, :100]),
        "buffer must be uint8  ": ([1, 2, 3], keys_for([1, 2, 3]), good),
        "slots must be integers": ([1.0, 2], keys_for([1, 2]), good),
        "expected a tensor": ([1, 2], keys_for([1, 2]), good.tolist()),
    }
    for message, (slots, keys, buffer) in bad_calls.items():
        for call in (tier.read_into, tier.write_from):
            with pytest.raises(InvalidRequestError, match=message.strip()):
                await call(slots, keys, buffer)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="appears twice"):
        await tier.write_from([3, 4, 3], keys_for([3, 4, 3]), rand_bytes(3, BB))
    after = torch.empty(NUM_BLOCKS, BB, dtype=torch.uint8)
    await tier.read_into(range(NUM_BLOCKS), [b""] * NUM_BLOCKS, after)
    assert torch.equal(before, after)
    await tier.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", [*KINDS, "cpu"])
async def test_closed_tiers_refuse_everything(kind: str) -> None:
    tier: DeviceTier | CpuTier
    if kind == "cpu":
        tier = CpuTier(SMALL, 4)
    else:
        tier, _ = make_device_tier(kind)
    async with tier as entered:
        assert entered is tier
        assert await tier.recover() == []
        await tier.discard([0, 1])
        async with tier:  # re-entering an open tier is harmless
            pass
    assert tier.closed
    await tier.aclose()  # idempotent
    buffer = torch.empty(1, BB, dtype=torch.uint8)
    with pytest.raises(ClosedError):
        await tier.read_into([0], [b""], buffer)
    with pytest.raises(ClosedError):
        await tier.write_from([0], [b""], buffer)
    with pytest.raises(ClosedError):
        await tier.discard([0])
    with pytest.raises(ClosedError):
        await tier.recover()
    with pytest.raises(ClosedError):
        await tier.__aenter__()
    if isinstance(tier, CpuTier):
        with pytest.raises(ClosedError):
            tier.slot_view([0])
        assert "closed" in repr(tier)


@pytest.mark.asyncio
async def test_cpu_tier_must_be_opened_first() -> None:
    tier = CpuTier(SMALL, 4, pin_memory=False, device="cpu")
    assert (tier.closed, tier.pinned) == (False, False)
    with pytest.raises(ClosedError, match="not open"):
        await tier.read_into([0], [b""], torch.empty(1, BB, dtype=torch.uint8))
    with pytest.raises(ClosedError, match="not open"):
        tier.slot_view([0])
    await tier.aclose()
    assert tier.closed
    with pytest.raises(ClosedError):
        await tier.__aenter__()


def test_device_tier_constructor_validation() -> None:
    good = per_layer_cache(num_blocks=4)
    three = BlockLayout(num_layers=3, block_size=4, num_kv_heads=2, head_size=8)
    hnd = torch.randn(4, 2, 4, 8).half().transpose(1, 2)  # [blocks, tokens, heads, d], HND memory
    cases: list[tuple[object, object, str]] = [
        (good[:3], SMALL, "need 2 \\* num_layers = 4 tensors"),
        ([*good[:3], "x"], SMALL, "must be a torch.Tensor"),
        ([*good[:3], torch.zeros(5, 4, 2, 8).half()], SMALL, "has shape \\[5, 4, 2, 8\\]"),
        ([*good[:3], torch.zeros(4, 4, 2, 9).half()], SMALL, "has shape"),
        ([torch.zeros(0, 4, 2, 8).half()] * 4, SMALL, "num_blocks > 0"),
        ([torch.zeros(4, 4, 2, 8)] * 4, SMALL, "dtype torch.float32"),
        ([*good[:3], torch.zeros(4, 4, 2, 8, device="meta").half()], SMALL, "is on meta"),
        ([hnd] * 4, SMALL, "contiguous"),
        (good, "layout", "must be a BlockLayout"),
        (42, SMALL, "must be a tensor \\(cross-layer\\) or a sequence"),
        (torch.zeros(4, 2, 2, 4, 2, 8), SMALL, "dtype"),
        (torch.zeros(4, 2, 2, 4, 2, 7).half(), SMALL, "bytes per block"),
        (torch.zeros(4).half(), SMALL, "num_blocks"),
        (torch.zeros(4, 2, 3, 4, 2, 8).half(), three, "not the canonical"),
        (torch.zeros(2, 4, 2, 4, 2, 8).half().transpose(0, 1), SMALL, "contiguous"),
    ]
    for caches, layout, message in cases:
        with pytest.raises(ConfigError, match=message):
            DeviceTier(caches, layout)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="name"):
        DeviceTier(good, SMALL, name="")
    with pytest.raises(ConfigError, match="staging_bytes"):
        DeviceTier(good, SMALL, staging_bytes=-1)
    DeviceTier(torch.zeros(4, 3, 2, 4, 2, 8).half(), three)  # canonical: accepted


def test_device_tiers_whose_blocks_share_memory_are_refused() -> None:
    pool = per_layer_cache(num_blocks=5)[0]  # [5, tokens, heads, d]
    good = per_layer_cache(num_blocks=4)
    with pytest.raises(ConfigError, match="share memory without being the same tensor"):
        DeviceTier([pool[:4], pool[1:], *good[2:]], SMALL)  # V0 is K0 one block on
    flat = cross_layer_cache(num_blocks=4).view(-1)
    squeezed = flat.as_strided((4, 2, 2, 4, 2, 8), (BB // 4, 128, 64, 16, 8, 1))
    with pytest.raises(
        ConfigError, match=r"its blocks share memory \(512 bytes each, one every 256"
    ):
        DeviceTier(squeezed, SMALL)


@pytest.mark.asyncio
async def test_a_tensor_listed_twice_and_interleaved_k_v_views_are_accepted() -> None:
    # Layers 0 and 1 share one KV cache (one K and one V tensor listed twice).
    shared = per_layer_cache(num_blocks=4)[:2]
    sharing = DeviceTier([*shared, *shared], SMALL)
    block = torch.cat([page.reshape(4, -1).view(torch.uint8)[2] for page in shared]).repeat(2)
    await sharing.write_from([1], keys_for([1]), block[None])
    out = torch.empty(1, BB, dtype=torch.uint8)
    await sharing.read_into([1], keys_for([1]), out)
    assert torch.equal(out[0], block)
    # K and V of each layer interleaved in one [blocks, 2, tokens, heads, d] tensor.
    layers = [torch.randn(4, 2, 4, 2, 8).half() for _ in range(2)]
    views = [layer[:, half] for layer in layers for half in (0, 1)]
    tier = DeviceTier(views, SMALL)
    rows = torch.empty(4, BB, dtype=torch.uint8)
    await tier.read_into([0, 1, 2, 3], keys_for(range(4)), rows)
    assert torch.equal(rows, canonical(views, range(4)))


def test_cpu_tier_constructor_validation() -> None:
    with pytest.raises(ConfigError, match="num_slots"):
        CpuTier(SMALL, 0)
    with pytest.raises(ConfigError, match="num_slots"):
        CpuTier(SMALL, True)
    with pytest.raises(ConfigError, match="BlockLayout"):
        CpuTier("layout", 4)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="name"):
        CpuTier(SMALL, 4, name="")
    with pytest.raises(ConfigError, match="offload_min_bytes"):
        CpuTier(SMALL, 4, offload_min_bytes=-5)
    with pytest.raises(ConfigError, match="not a torch device"):
        CpuTier(SMALL, 4, device="warp-drive")
    if not CUDA:
        with pytest.raises(ConfigError, match="needs CUDA"):
            CpuTier(SMALL, 4, pin_memory=True)
        assert not CpuTier(SMALL, 4).pinned


async def loop_turns_during(call: Awaitable[None]) -> int:
    """How many times another task ran on the event loop while ``call`` ran."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.sleep(0)

    async with anyio.create_task_group() as group:
        group.start_soon(ticker)
        await anyio.sleep(0)
        before = ticks
        await call
        during = ticks - before
        group.cancel_scope.cancel()
    return during


@pytest.mark.asyncio
async def test_offloaded_copies_let_other_tasks_run() -> None:
    tier, cache = make_device_tier("cross-layer", offload_min_bytes=0)
    out = torch.empty(NUM_BLOCKS, BB, dtype=torch.uint8)
    turns = 0
    for _ in range(5):
        turns += await loop_turns_during(tier.read_into(range(NUM_BLOCKS), [b""] * NUM_BLOCKS, out))
    assert turns >= 1
    assert torch.equal(out, canonical(cache, range(NUM_BLOCKS)))


# -- CUDA: streams, events, pinned memory --------------------------------------------


@pytest_asyncio.fixture
async def pinned_tier() -> AsyncIterator[CpuTier]:
    async with CpuTier(SMALL, NUM_BLOCKS) as tier:
        yield tier


def cuda_tier(
    kind: str, staging_bytes: int = STAGING_BYTES
) -> tuple[DeviceTier, torch.Tensor | list[torch.Tensor]]:
    cache: torch.Tensor | list[torch.Tensor]
    if kind == "per-layer":
        cache = per_layer_cache(device="cuda")
    else:
        cache = cross_layer_cache(device="cuda")
    return DeviceTier(cache, SMALL, staging_bytes=staging_bytes), cache


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 16, 512])
@pytest.mark.parametrize("staging_bytes", [64 << 20, 5 * BB])
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
async def test_cuda_round_trip_through_pinned_memory(
    kind: str, n: int, staging_bytes: int, pinned_tier: CpuTier
) -> None:
    assert pinned_tier.pinned
    view = pinned_tier.slot_view(range(n))
    assert view is not None
    assert view.is_pinned()
    tier, cache = cuda_tier(kind, staging_bytes=staging_bytes)
    assert tier.device.type == "cuda"
    slots = random.Random(n).sample(range(NUM_BLOCKS), n)
    original = canonical(cache, slots)
    await tier.read_into(slots, keys_for(slots), view)  # D2H on the tier's stream
    assert torch.equal(view, original)
    await tier.write_from(
        slots, keys_for(slots), torch.zeros(n, BB, dtype=torch.uint8, device="cuda")
    )
    assert not canonical(cache, slots).any()
    await tier.write_from(slots, keys_for(slots), view)  # H2D from pinned memory
    assert torch.equal(canonical(cache, slots), original)
    await tier.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
async def test_cuda_pageable_strided_and_device_buffers(kind: str) -> None:
    tier, cache = cuda_tier(kind, staging_bytes=2 * BB)
    slots = [5, 99, 6, 7, 400]
    buffers = [
        torch.empty(5, BB, dtype=torch.uint8),  # pageable
        torch.empty(5, BB + 32, dtype=torch.uint8).pin_memory()[:, 16 : 16 + BB],  # strided pinned
        torch.empty(BB, 5, dtype=torch.uint8).t(),  # transposed
        torch.empty(5, BB, dtype=torch.uint8, device="cuda"),  # same device
        torch.empty(10, BB, dtype=torch.uint8, device="cuda")[::2],  # strided device
    ]
    original = canonical(cache, slots)
    for out in buffers:
        await tier.read_into(slots, keys_for(slots), out)
        assert torch.equal(out.cpu(), original)
        await tier.write_from(slots[::-1], keys_for(slots), out)
        assert torch.equal(canonical(cache, slots[::-1]), original)
        await tier.write_from(slots, keys_for(slots), out)


@pytest.mark.asyncio
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
async def test_cuda_copies_see_work_queued_on_the_current_stream() -> None:
    big = BlockLayout(num_layers=8, block_size=16, num_kv_heads=8, head_size=128)
    cache = torch.zeros(256, 8, 2, 16, 8, 128, dtype=torch.float16, device="cuda")
    tier = DeviceTier(cache, big)
    cache.fill_(3.0)  # queued on the current stream, maybe still running
    out = torch.empty(256, big.block_bytes, dtype=torch.uint8).pin_memory()
    await tier.read_into(range(256), [b""] * 256, out)
    assert torch.all(out.view(torch.float16) == 3.0)
    await tier.aclose()


@pytest.mark.asyncio
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
async def test_cpu_tier_exchanges_with_cuda_buffers(pinned_tier: CpuTier) -> None:
    data = rand_bytes(6, BB, device="cuda")
    await pinned_tier.write_from([1, 8, 3, 4, 5, 0], keys_for(range(6)), data)
    out = torch.empty(6, BB, dtype=torch.uint8, device="cuda")
    await pinned_tier.read_into([1, 8, 3, 4, 5, 0], keys_for(range(6)), out)
    assert torch.equal(out, data)


@pytest.mark.asyncio
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
async def test_pinning_is_exact_and_released_on_close() -> None:
    tier = CpuTier(SMALL, 1000, device="cuda")
    async with tier:
        view = tier.slot_view(range(1000))
        assert view is not None
        assert (tier.pinned, view.is_pinned()) == (True, True)
        assert view.data_ptr() == view.untyped_storage().data_ptr()
        part = tier.slot_view([500, 501])
        assert part is not None
        assert part.is_pinned()
    assert (tier.pinned, view.is_pinned()) == (False, False)
    unpinned = CpuTier(SMALL, 4, device="cpu")
    async with unpinned:
        assert not unpinned.pinned
