"""Replay an offload-step workload through vLLM v1's ``SimpleCPUOffloadScheduler`` (peer side).

This worker is not part of kvtier and never imports it. ``benchmarks/offload_step.py``
generates a deterministic step-by-step workload (requests arriving, prefill chunks,
decode tokens, requests finishing), pickles it, and runs this script under a separate
throwaway venv that has vLLM installed (CPU only; see ``../shared/tools/setup-vllm-peer``),
so that kvtier's ``OffloadManager`` and vLLM's scheduler-side offload manager plan the
same steps in one run.

Per step, exactly as kvtier's side does: finished requests are reported to the
scheduler (``request_finished_all_groups``, which queues vLLM's finish-time flush of
their unstored blocks) and their device blocks are freed tail first; arriving requests
are created; every scheduled request gets the device blocks its new tokens need from
vLLM's own ``BlockPool``, whose newly full blocks are entered into the prefix cache with
``BlockPool.cache_full_blocks``; requests scheduled for the first time go to
``update_state_after_alloc`` (no external tokens). Then the timed call:
``build_connector_meta(scheduler_output)``, where the ``SchedulerOutput`` lists the
requests' block ids (``NewRequestData.block_ids`` for first-time requests,
``CachedRequestData.new_block_ids`` for the others). After it, untimed: the requests'
``num_computed_tokens`` advance (vLLM's ``_update_after_schedule``), sampled tokens are
appended, and the step's store event is reported complete by every worker through
``update_connector_output``.

Input: a pickle written by ``offload_step.py`` (see its ``Workload``).
Output: one JSON object on stdout; vLLM's log output goes to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ["VLLM_LOGGING_STREAM"] = "ext://sys.stderr"  # stdout carries only the JSON

import torch
import vllm
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock, get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
)
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import Request
from vllm.v1.simple_kv_offload.manager import SimpleCPUOffloadScheduler
from vllm.v1.simple_kv_offload.metadata import SimpleCPUOffloadWorkerMetadata

# The OPT config.json that ``setup-vllm-peer`` writes next to the venv.
DEFAULT_MODEL_DIR = Path(sys.prefix) / "tinyopt"
TINY_OPT_CONFIG = {
    "architectures": ["OPTForCausalLM"],
    "model_type": "opt",
    "hidden_size": 768,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "ffn_dim": 3072,
    "max_position_embeddings": 2048,
    "vocab_size": 50272,
    "word_embed_proj_dim": 768,
    "torch_dtype": "float16",
    "do_layer_norm_before": True,
    "pad_token_id": 1,
    "bos_token_id": 2,
    "eos_token_id": 2,
}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def make_vllm_config(model_dir: Path, num_requests: int, max_batched_tokens: int) -> VllmConfig:
    model = ModelConfig(
        model=str(model_dir),
        tokenizer=str(model_dir),
        skip_tokenizer_init=True,
        dtype="float16",
        seed=0,
    )
    scheduler = SchedulerConfig(
        max_num_seqs=num_requests,
        max_num_batched_tokens=max_batched_tokens,
        max_model_len=model.max_model_len,
        enable_chunked_prefill=True,
        is_encoder_decoder=False,
    )
    return VllmConfig(
        scheduler_config=scheduler,
        model_config=model,
        cache_config=CacheConfig(
            block_size=16, gpu_memory_utilization=0.9, enable_prefix_caching=True
        ),
        kv_transfer_config=KVTransferConfig(
            kv_connector="SimpleCPUOffloadConnector", kv_role="kv_both"
        ),
        device_config=DeviceConfig("cpu"),
    )


def make_scheduler(
    config: VllmConfig, workload: dict[str, Any], lazy: bool
) -> tuple[SimpleCPUOffloadScheduler, BlockPool]:
    """One full-attention group over a tiny layout, bound to a fresh device pool."""
    block_size: int = workload["block_size"]
    layout = workload["layout"]
    num_gpu_blocks: int = workload["gpu_blocks"]
    num_cpu_blocks: int = workload["cpu_blocks"]
    spec = FullAttentionSpec(
        block_size=block_size,
        num_kv_heads=layout["num_kv_heads"],
        head_size=layout["head_size"],
        dtype=getattr(torch, layout["dtype"]),
    )
    layers = [f"model.layers.{i}.attn" for i in range(layout["num_layers"])]
    page = spec.page_size_bytes
    kv_cache_config = KVCacheConfig(
        num_blocks=num_gpu_blocks,
        kv_cache_tensors=[
            KVCacheTensor(
                size=page * num_gpu_blocks * len(layers),
                layers=layers,
                layer_stride=page * num_gpu_blocks,
                block_stride=page,
            )
        ],
        kv_cache_groups=[KVCacheGroupSpec(layers, spec)],
    )
    scheduler = SimpleCPUOffloadScheduler(
        config,
        kv_cache_config,
        cpu_capacity_bytes=page * len(layers) * num_cpu_blocks,
        scheduler_block_size=block_size,
        hash_block_size=block_size,
        lazy_offload=lazy,
        num_cpu_blocks=num_cpu_blocks,
    )
    pool = BlockPool(num_gpu_blocks=num_gpu_blocks, enable_caching=True, hash_block_size=block_size)
    scheduler.bind_gpu_block_pool(pool)
    return scheduler, pool


def replay(
    config: VllmConfig, workload: dict[str, Any], lazy: bool
) -> tuple[dict[str, Any], str | None]:
    """Run every step; returns (result, error or None)."""
    block_size: int = workload["block_size"]
    scheduler, pool = make_scheduler(config, workload, lazy)
    target = workload["lazy_target"] if lazy else 0
    if scheduler._target_free != target:
        return {}, f"vLLM lazy target is {scheduler._target_free} blocks, expected {target}"
    hasher = get_request_block_hasher(block_size, sha256)
    params = SamplingParams(max_tokens=1)
    requests: dict[str, Request] = {}
    blocks: dict[str, list[KVCacheBlock]] = {}
    step_ns: list[int] = []
    stored: list[int] = []
    workers = scheduler._expected_worker_count
    gc.collect()
    for step in workload["steps"]:
        finished: list[str] = step["finished"]
        for rid in finished:
            request = requests.pop(rid)
            held = blocks.pop(rid)
            scheduler.request_finished_all_groups(request, ([b.block_id for b in held],))
            pool.free_blocks(reversed(held))
        for rid, tokens in step["arrivals"]:
            requests[rid] = Request(
                request_id=rid,
                prompt_token_ids=tokens,
                sampling_params=params,
                pooling_params=None,
                block_hasher=hasher,
            )
        new_reqs: list[NewRequestData] = []
        cached_ids: list[str] = []
        cached_new: list[tuple[list[int], ...] | None] = []
        cached_computed: list[int] = []
        num_scheduled: dict[str, int] = {}
        for rid, count in step["scheduled"]:
            request = requests[rid]
            computed = request.num_computed_tokens
            first = rid not in blocks
            held = blocks.setdefault(rid, [])
            need = cdiv(computed + count, block_size) - len(held)
            fresh = pool.get_new_blocks(need) if need > 0 else []
            held.extend(fresh)
            full = (computed + count) // block_size
            pool.cache_full_blocks(request, held, computed // block_size, full, block_size, 0)
            num_scheduled[rid] = count
            if first:
                scheduler.update_state_after_alloc(request, KVCacheBlocks((held,)), 0)
                new_reqs.append(
                    NewRequestData(
                        req_id=rid,
                        prompt_token_ids=None,
                        mm_features=[],
                        sampling_params=None,
                        pooling_params=None,
                        block_ids=([b.block_id for b in held],),
                        num_computed_tokens=computed,
                        lora_request=None,
                    )
                )
            else:
                cached_ids.append(rid)
                cached_new.append(([b.block_id for b in fresh],) if fresh else None)
                cached_computed.append(computed)
        output = SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=CachedRequestData(
                req_ids=cached_ids,
                resumed_req_ids=set(),
                new_token_ids=[[] for _ in cached_ids],
                all_token_ids={},
                new_block_ids=cached_new,
                num_computed_tokens=cached_computed,
                num_output_tokens=[len(requests[r].output_token_ids) for r in cached_ids],
            ),
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            scheduled_spec_decode_tokens={},
            scheduled_encoder_inputs={},
            num_common_prefix_blocks=[],
            preempted_req_ids=set(),
            finished_req_ids=set(finished),
            free_encoder_mm_hashes=[],
        )
        start = time.perf_counter_ns()
        meta = scheduler.build_connector_meta(output)
        step_ns.append(time.perf_counter_ns() - start)
        stored.append(len(meta.store_gpu_blocks))
        for rid, count in step["scheduled"]:
            requests[rid].num_computed_tokens += count
        for rid, token in step["sampled"]:
            requests[rid].append_output_token_ids(token)
        if meta.store_event >= 0:
            scheduler.update_connector_output(
                KVConnectorOutput(
                    kv_connector_worker_meta=SimpleCPUOffloadWorkerMetadata(
                        completed_store_events={meta.store_event: workers}
                    )
                )
            )
    cpu_cache = scheduler.cpu_block_pool.cached_block_hash_to_block
    hashed = [b.block_hash for b in pool.blocks if b.block_hash is not None]
    unstored = sum(cpu_cache.get_one_block(h) is None for h in hashed)
    return {
        "step_ns": step_ns,
        "stored": stored,
        "device_hashed_end": len(hashed),
        "unstored_end": unstored,
        "free_cached_end": sum(
            1 for b in pool.blocks if b.block_hash is not None and b.ref_cnt == 0
        ),
        "target_free": scheduler._target_free,
        "cpu_blocks": scheduler.num_cpu_blocks,
    }, None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--mode", choices=["eager", "lazy"], action="append")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="a directory holding only an OPT config.json (default: the venv's tinyopt/)",
    )
    args = parser.parse_args(argv)
    with open(args.input, "rb") as f:
        workload: dict[str, Any] = pickle.load(f)
    init_none_hash(sha256)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir: Path = args.model_dir or DEFAULT_MODEL_DIR
        if not (model_dir / "config.json").is_file():  # write one like setup-vllm-peer's
            model_dir = Path(tmp)
            (model_dir / "config.json").write_text(json.dumps(TINY_OPT_CONFIG))
        config = make_vllm_config(
            model_dir, workload["num_requests"], workload["max_batched_tokens"]
        )
        report: dict[str, Any] = {"impl": "vllm", "version": vllm.__version__, "modes": {}}
        for mode in args.mode or ["eager", "lazy"]:
            result, error = replay(config, workload, lazy=mode == "lazy")
            if error is not None:
                print(f"offload_step_peer: {error}", file=sys.stderr)
                return 1
            report["modes"][mode] = result
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
