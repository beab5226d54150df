"""Random engine schedules against the prefix cache, checking its invariants.

After every step: ref counts match the holders (requests and touches) and are
never negative; a block is in the free queue exactly when its ref count is 0;
the queue's links agree both ways and its length equals its count; the hash
index and the blocks' hashes agree; every cached block a request holds carries
that request's hash for its position (so a hit is never wrong data); a failed
allocation changes nothing; new blocks come from the queue's head; freed blocks
join it in the documented order; once nothing is held, every block is free.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kvtier import BlockHasher, KVCacheBlock, KVCacheConfig, KVCacheManager, Request
from kvtier.hashing import make_block_hash_with_group_id
from tests import strategies


def _ids(blocks: list[KVCacheBlock]) -> list[int]:
    return [b.block_id for b in blocks]


class PrefixCacheMachine(RuleBasedStateMachine):
    """A model of an engine driving KVCacheManager."""

    def __init__(self) -> None:
        super().__init__()
        self.running: dict[str, Request] = {}
        self.finished: list[Request] = []
        self.touched: list[KVCacheBlock] = []
        self.counter = 0

    @initialize(num_blocks=st.integers(2, 24), block_size=st.sampled_from([1, 2, 4]))
    def setup(self, num_blocks: int, block_size: int) -> None:
        config = KVCacheConfig.full_attention(num_blocks, block_size)
        self.manager = KVCacheManager(config, 64, log_stats=True, enable_kv_cache_events=True)
        self.pool = self.manager.block_pool
        self.hasher = BlockHasher(block_size, seed="machine")
        self.block_size = block_size

    # -- helpers -----------------------------------------------------------------

    def snapshot(self) -> tuple[object, ...]:
        return (
            [b.ref_cnt for b in self.pool.blocks],
            [b.block_hash for b in self.pool.blocks],
            _ids(self.pool.free_block_queue.get_all_free_blocks()),
            {k: list(v) for k, v in self.manager.group_managers[0].req_to_blocks.items()},
        )

    def held(self, request: Request) -> list[KVCacheBlock]:
        return self.manager.group_managers[0].req_to_blocks.get(request.request_id, [])

    def free_request(self, request: Request) -> None:
        blocks = list(self.held(request))
        queue_before = _ids(self.pool.free_block_queue.get_all_free_blocks())
        dropping = [b for b in reversed(blocks) if b.ref_cnt == 1]
        head = [b.block_id for b in dropping if b.block_hash is None]
        tail = [b.block_id for b in dropping if b.block_hash is not None]
        self.manager.free(request)
        assert _ids(self.pool.free_block_queue.get_all_free_blocks()) == head + queue_before + tail
        del self.running[request.request_id]
        self.finished.append(request)

    # -- rules -------------------------------------------------------------------

    @rule(prefix=strategies.prefixes, tail=strategies.tails)
    def new_request(self, prefix: tuple[int, ...], tail: list[int]) -> None:
        tokens = [*prefix, *tail] or [0]
        self.counter += 1
        request = Request(f"r{self.counter}", tokens, self.hasher)
        computed, num_computed = self.manager.get_computed_blocks(request)
        assert num_computed % self.block_size == 0
        assert num_computed < request.num_tokens
        assert num_computed == len(computed.blocks[0]) * self.block_size
        hit_ids = _ids(list(computed.blocks[0]))
        queue_before = _ids(self.pool.free_block_queue.get_all_free_blocks())
        before = self.snapshot()
        new = self.manager.allocate_slots(
            request, request.num_tokens - num_computed, num_computed, computed
        )
        if new is None:
            assert self.snapshot() == before
            return
        expected = [i for i in queue_before if i not in hit_ids][: len(new.blocks[0])]
        assert _ids(list(new.blocks[0])) == expected
        assert _ids(self.held(request)) == hit_ids + expected
        request.num_computed_tokens = request.num_tokens
        self.running[request.request_id] = request

    @precondition(lambda self: self.running)
    @rule(data=st.data(), tokens=strategies.decode_tokens)
    def decode(self, data: st.DataObject, tokens: list[int]) -> None:
        request = self.running[data.draw(st.sampled_from(sorted(self.running)))]
        if request.num_tokens + len(tokens) > self.manager.max_model_len:
            self.free_request(request)  # at its length limit: finished, as a scheduler would
            return
        request.append_output_token_ids(tokens)
        before = self.snapshot()
        new = self.manager.allocate_slots(request, len(tokens))
        if new is None:
            assert self.snapshot() == before
            self.free_request(request)  # preempted, as a scheduler would
            return
        request.num_computed_tokens = request.num_tokens

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        self.free_request(self.running[data.draw(st.sampled_from(sorted(self.running)))])

    @rule(data=st.data())
    def free_again(self, data: st.DataObject) -> None:
        request = (
            data.draw(st.sampled_from(self.finished))
            if self.finished
            else Request("unknown", [1, 2, 3])
        )
        before = self.snapshot()
        self.manager.free(request)
        assert self.snapshot() == before

    @rule(data=st.data())
    def touch_cached_free_block(self, data: st.DataObject) -> None:
        candidates = [b for b in self.pool.free_block_queue if b.block_hash is not None]
        if not candidates:
            return
        block = data.draw(st.sampled_from(candidates))
        self.pool.touch([block])
        assert block.ref_cnt == 1
        self.touched.append(block)

    @precondition(lambda self: self.touched)
    @rule()
    def release_touched(self) -> None:
        self.pool.free_blocks(reversed(self.touched))
        self.touched = []

    @rule()
    def reset(self) -> None:
        idle = not self.running and not self.touched
        assert self.manager.reset_prefix_cache() == idle
        if idle:
            assert len(self.pool.cached_block_hash_to_block) == 0
            assert all(b.block_hash is None for b in self.pool.blocks)

    # -- invariants --------------------------------------------------------------

    @invariant()
    def ref_counts_match_holders(self) -> None:
        if not hasattr(self, "pool"):
            return
        expected: Counter[int] = Counter()
        for request in self.running.values():
            expected.update(_ids(self.held(request)))
        expected.update(_ids(self.touched))
        for block in self.pool.blocks[1:]:
            assert block.ref_cnt >= 0
            assert block.ref_cnt == expected[block.block_id]

    @invariant()
    def free_queue_is_consistent(self) -> None:
        if not hasattr(self, "pool"):
            return
        queue = self.pool.free_block_queue
        seen = []
        prev = queue.fake_free_list_head
        block = prev.next_free_block
        while block is not queue.fake_free_list_tail:
            assert block is not None
            assert block.prev_free_block is prev
            seen.append(block)
            prev, block = block, block.next_free_block
        assert queue.fake_free_list_tail.prev_free_block is prev
        assert len(seen) == queue.num_free_blocks == len(set(map(id, seen)))
        free = {b.block_id for b in self.pool.blocks[1:] if b.ref_cnt == 0}
        assert {b.block_id for b in seen} == free
        null = self.pool.null_block
        assert null.prev_free_block is None
        assert null.block_hash is None
        if not self.running and not self.touched:
            assert queue.num_free_blocks == self.pool.num_gpu_blocks - 1

    @invariant()
    def hash_index_agrees_with_blocks(self) -> None:
        if not hasattr(self, "pool"):
            return
        index = self.pool.cached_block_hash_to_block
        entries = 0
        for key in index:
            for block in index.get_blocks(key):
                assert block.block_hash == key
                entries += 1
        assert entries == sum(b.block_hash is not None for b in self.pool.blocks)
        for request in self.running.values():
            for position, block in enumerate(self.held(request)):
                if block.block_hash is not None:
                    assert block.block_hash == make_block_hash_with_group_id(
                        request.block_hashes[position], 0
                    )


TestPrefixCacheMachine = PrefixCacheMachine.TestCase


@pytest.mark.soak
def test_prefix_cache_machine_soak() -> None:
    run_state_machine_as_test(PrefixCacheMachine, settings=settings.get_profile("soak"))
