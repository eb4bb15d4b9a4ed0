"""KV cache sizing (workers/engine/kv_sizing.py): blocks per group from a token count, and
the largest cache a byte budget holds, at gpt-oss-20b's KV shape."""

from __future__ import annotations

import pytest
import torch

from tandem.workers.engine.kv_sizing import (
    blocks_per_group,
    bytes_per_block,
    full_blocks_for_budget,
)
from tandem.workers.engine.llm_engine import EngineConfig
from tandem.workers.model.config import FULL, SLIDING
from tandem.workers.synthetic.checkpoint_writer import tiny_config

CONFIG = tiny_config(num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8,
                     head_dim=64, sliding_window=128,
                     layer_types=tuple(SLIDING if i % 2 == 0 else FULL for i in range(24)))


def total_bytes(full: int, seqs: int, chunk: int) -> int:
    counts = blocks_per_group(CONFIG, full, 16, seqs, chunk)
    return sum(n * b for n, b in zip(counts, bytes_per_block(CONFIG, 16, torch.bfloat16),
                                     strict=True))


def test_bytes_per_block_at_20b_shape():
    # 12 layers x 2 (k, v) x 16 positions x 8 heads x 64 x 2 bytes; PERFORMANCE.md: 24,576 B
    # a token for the 12 full layers.
    assert bytes_per_block(CONFIG, 16, torch.bfloat16) == [16 * 24576, 16 * 24576]


@pytest.mark.parametrize("budget_gib", [0.001, 1.0, 20.0, 54.0])
@pytest.mark.parametrize("seqs", [1, 256])
def test_largest_cache_that_fits(budget_gib, seqs):
    budget = int(budget_gib * 2**30)
    full = full_blocks_for_budget(CONFIG, budget, 16, torch.bfloat16, seqs, 8192)
    assert total_bytes(full, seqs, 8192) <= budget < total_bytes(full + 1, seqs, 8192)
    sliding_cap = seqs * (-(-(128 + 8192) // 16) + 1)
    assert blocks_per_group(CONFIG, full, 16, seqs, 8192) == [
        full if spec.sliding_window is None else min(full, sliding_cap)
        for spec in CONFIG.kv_groups
    ]


def test_engine_config_sizes_from_memory_only_when_tokens_unset():
    assert EngineConfig(kv_cache_tokens=None).gpu_memory_utilization == 0.9
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(kv_cache_tokens=None, gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        EngineConfig(kv_cache_tokens=8, block_size=16)
