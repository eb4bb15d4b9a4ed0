"""KV memory per token of context for the gpt-oss-20b shape, measured on the real block
manager: the full-attention group grows with the context, the sliding group does not.

The figures in README.md ("KV cache footprint") come from this test's arithmetic.
"""

from __future__ import annotations

from tandem.workers.engine.request import Request
from tandem.workers.engine.scheduler import Scheduler, SchedulerConfig
from tandem.workers.kv.cache_manager import KVCacheManager, KVGroup

# gpt-oss-20b: 24 layers alternating sliding (window 128) and full; 8 kv heads of 64, bf16.
LAYERS_PER_GROUP = 12
BYTES_PER_TOKEN_PER_LAYER = 2 * 8 * 64 * 2  # k and v, 8 heads, head_dim 64, 2 bytes
BLOCK = 16
WINDOW = 128


def test_gpt_oss_20b_kv_bytes_per_token():
    kv = KVCacheManager(
        [KVGroup("full", None), KVGroup("sliding", WINDOW)], BLOCK, [400, 400]
    )
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512,
                                          block_size=BLOCK), kv)
    request = Request("r", list(range(2000)), max_tokens=2000)
    scheduler.add(request)
    held_full, held_sliding_decode = [], []
    while not request.status.is_finished:
        out = scheduler.schedule()
        [step] = out.scheduled
        scheduler.update_after_step(out, {"r": 7} if step.needs_sample else {})
        if request.status.is_finished:
            break
        full = sum(b >= 0 for b in kv.block_table(request, 0))
        sliding = sum(b >= 0 for b in kv.block_table(request, 1))
        held_full.append((request.num_computed_tokens, full))
        if step.num_new_tokens == 1:
            held_sliding_decode.append(sliding)
    # Full group: exactly one block per 16 tokens of context, always.
    for computed, blocks in held_full:
        assert blocks == -(-(computed + 1) // BLOCK) or blocks == -(-computed // BLOCK)
    # Sliding group while decoding: at most ceil(127 / 16) + 1 = 9 blocks (144 positions),
    # whatever the context length (here 2,000 to 4,000 tokens).
    assert max(held_sliding_decode) == 9
    full_bytes_per_token = LAYERS_PER_GROUP * BYTES_PER_TOKEN_PER_LAYER
    sliding_bytes_per_sequence = 9 * BLOCK * LAYERS_PER_GROUP * BYTES_PER_TOKEN_PER_LAYER
    assert full_bytes_per_token == 24_576
    assert sliding_bytes_per_sequence == 3_538_944  # ideal (128 positions): 3,145,728
