"""How many KV blocks each group gets: from a token count, or from the GPU's free memory.

A request's full-attention blocks grow with its context; a sliding-window layer keeps only
its window plus one step's chunk per sequence, so the sliding group is capped at
max_num_seqs such windows and never holds more blocks than the full group:

    full blocks     F = ceil(kv_cache_tokens / block_size)
    sliding blocks  min(F, max_num_seqs * (ceil((window + max_num_batched_tokens) / bs) + 1))

Sized from memory (like vLLM's gpu_memory_utilization): the engine may hold `utilization`
of the GPU's memory; what the weights already hold, what a step's activations peak at
(measured with one throwaway prefill of max_num_batched_tokens tokens) and the CUDA graphs'
logits buffers are taken off, and the KV cache gets the rest: the largest F whose blocks
fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from tandem.workers.model.config import GptOssConfig


def blocks_per_group(
    config: GptOssConfig, full_blocks: int, block_size: int, max_num_seqs: int,
    max_num_batched_tokens: int,
) -> list[int]:
    """Blocks of each KV group (config.kv_groups order) for F = full_blocks."""
    blocks = []
    for spec in config.kv_groups:
        if spec.sliding_window is None:
            blocks.append(full_blocks)
        else:
            per_seq = math.ceil((spec.sliding_window + max_num_batched_tokens) / block_size) + 1
            blocks.append(min(full_blocks, max_num_seqs * per_seq))
    return blocks


def bytes_per_block(config: GptOssConfig, block_size: int, dtype: torch.dtype) -> list[int]:
    """Bytes of one block (key and value, every layer of the group), per KV group."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_layer = 2 * block_size * config.num_key_value_heads * config.head_dim * itemsize
    return [len(spec.layers) * per_layer for spec in config.kv_groups]


def full_blocks_for_budget(
    config: GptOssConfig, budget_bytes: int, block_size: int, dtype: torch.dtype,
    max_num_seqs: int, max_num_batched_tokens: int,
) -> int:
    """The largest F whose blocks (every group, as blocks_per_group lays them out) take at
    most budget_bytes; 0 when not even one block of each group fits."""
    sizes = bytes_per_block(config, block_size, dtype)

    def total(f: int) -> int:
        counts = blocks_per_group(config, f, block_size, max_num_seqs, max_num_batched_tokens)
        return sum(n * b for n, b in zip(counts, sizes, strict=True))

    # total() is non-decreasing in F: bisect.
    lo, hi = 0, max(1, budget_bytes // min(sizes))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total(mid) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def activation_peak_bytes(
    model, block_size: int, max_num_batched_tokens: int, device: torch.device,
    dtype: torch.dtype,
) -> int:
    """Peak memory of one eager prefill step of max_num_batched_tokens tokens beyond what
    was allocated before it (activations, logits of the sampled row, workspace)."""
    from tandem.workers.engine.runner import ModelRunner, _throwaway_step

    blocks = math.ceil(max_num_batched_tokens / block_size) + 1
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner = ModelRunner(model, [blocks] * len(model.config.kv_groups), block_size, device,
                         dtype, cuda_graph_sizes=())
    runner.execute(_throwaway_step([max_num_batched_tokens], block_size, runner.num_groups))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del runner
    torch.cuda.empty_cache()
    return peak


def kv_cache_tokens_from_memory(
    model, utilization: float, block_size: int, max_num_seqs: int,
    max_num_batched_tokens: int, graph_sizes: Sequence[int], device: torch.device,
    dtype: torch.dtype, say: Callable[[str], None],
) -> int:
    """kv_cache_tokens (a multiple of block_size) that fills `utilization` of the GPU with
    the weights already loaded. Raises ValueError when nothing is left for the KV cache."""
    config = model.config
    activations = activation_peak_bytes(model, block_size, max_num_batched_tokens, device, dtype)
    free, total = torch.cuda.mem_get_info(device)
    # Each captured graph keeps its own fp32 logits [size, vocab]; the decode activations
    # of the largest one live in the graph pool (well under a prefill step's).
    graphs = sum(graph_sizes) * config.vocab_size * 4
    budget = int(utilization * total) - (total - free) - activations - graphs
    full = full_blocks_for_budget(config, budget, block_size, dtype, max_num_seqs,
                                  max_num_batched_tokens)
    if full < 1:
        raise ValueError(
            f"gpu_memory_utilization {utilization}: no memory left for the KV cache "
            f"({(total - free) / 2**30:.1f} GiB in use, {activations / 2**30:.1f} GiB of "
            f"activations, {total / 2**30:.1f} GiB in all)"
        )
    say(f"kv cache: {full * block_size} tokens from {budget / 2**30:.1f} GiB "
        f"({utilization:.0%} of {total / 2**30:.1f} GiB; weights and others "
        f"{(total - free) / 2**30:.1f} GiB, activations {activations / 2**30:.2f} GiB, "
        f"graph logits {graphs / 2**30:.2f} GiB)")
    return full * block_size
