"""A minimal engine scheduler loop on kvtier's device prefix cache.

Four chat users share a system prompt. Each round, every user's request is
scheduled (prefix hit + allocation), decodes a few tokens one step at a time,
and finishes; the next round's prompt is the conversation so far, so it hits
the blocks the previous round cached. Run it with ``python examples/engine_loop.py``.
"""

from __future__ import annotations

import random

from kvtier import BlockHasher, BlockStored, KVCacheConfig, KVCacheManager, Request

BLOCK_SIZE = 16
SYSTEM_PROMPT = list(range(1000, 1000 + 5 * BLOCK_SIZE + 3))  # 83 tokens


def main() -> None:
    manager = KVCacheManager(
        KVCacheConfig.full_attention(num_blocks=256, block_size=BLOCK_SIZE),
        max_model_len=4096,
        log_stats=True,
        enable_kv_cache_events=True,
    )
    hasher = BlockHasher(BLOCK_SIZE)
    rng = random.Random(0)
    history = {user: list(SYSTEM_PROMPT) for user in range(4)}

    for round_ in range(3):
        running: list[Request] = []
        for user, tokens in history.items():
            question = [rng.randrange(32000) for _ in range(rng.randrange(10, 40))]
            request = Request(f"u{user}-r{round_}", tokens + question, hasher)
            computed, num_computed = manager.get_computed_blocks(request)
            blocks = manager.allocate_slots(
                request, request.num_tokens - num_computed, num_computed, computed
            )
            if blocks is None:
                print(f"{request.request_id}: no room, stays queued")
                continue
            request.num_computed_tokens = request.num_tokens
            print(
                f"{request.request_id}: {request.num_tokens} prompt tokens, "
                f"{num_computed} from the prefix cache"
            )
            running.append(request)

        for _ in range(20):  # decode steps: one token per running request
            for request in running:
                request.append_output_token_ids(rng.randrange(32000))
                if manager.allocate_slots(request, 1) is None:
                    raise SystemExit("out of blocks while decoding")
                request.num_computed_tokens = request.num_tokens

        for request in running:
            history[int(request.request_id[1])] = list(request.all_token_ids)
            manager.free(request)

    stats = manager.make_prefix_cache_stats()
    assert stats is not None
    stored = sum(len(e.block_hashes) for e in manager.take_events() if isinstance(e, BlockStored))
    print(
        f"prefix cache: {stats.hits}/{stats.queries} tokens hit ({stats.hit_rate:.1%}); "
        f"{stored} blocks cached; usage now {manager.usage:.0%}"
    )


if __name__ == "__main__":
    main()
