"""Paged attention of gpt-oss (sinks, GQA, optional sliding window) over a varlen batch.

Cache layout (COMMON.md): key_cache / value_cache [num_blocks, block_size, K, D]; slot =
block * block_size + offset. Sequence b's logical block j lives in physical block
block_tables[b, j]:

    block_tables[b] = [ 7 | 2 | -1 | ... ]      block_size = 4
    positions         0..3  4..7
    slots             28..31 8..11

The new tokens of sequence b are q[query_start_loc[b] : query_start_loc[b+1]] and sit at
positions seq_lens[b] - n_b .. seq_lens[b] - 1; their k/v are already in the cache
(`write_kv`). Query i sees key j when j <= i and, with a window W, i - W < j. Block-table
entries wholly before the first query's window are never read (they may be -1).

Public: `paged_attention`, `write_kv`, `AttentionTiling`, and the fp32 torch reference
`paged_attention_reference` at the bottom.
"""

import functools
from dataclasses import dataclass

import torch
import triton

from tandem.kernels._attention_triton import (
    LOG2E,
    _merge_splits_kernel,
    _paged_attention_kernel,
    _write_kv_kernel,
)


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


SMALL_WINDOW = 256
"""Sliding windows up to this many keys take no key splits in decode (see for_batch)."""


@dataclass(frozen=True)
class AttentionTiling:
    """Work split of `paged_attention`."""

    block_m: int
    # rows per program: query tokens x the query heads of one kv head (padded to a power of 2)
    block_n: int
    # key positions per inner step
    num_splits: int
    # pieces the key range of each query tile is cut into (1: no split, no merge kernel)
    num_warps: int = 4
    # warps per program of the attention kernel
    num_stages: int = 3
    # software-pipelining depth of the key loop

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or not _is_power_of_two(value):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if not _is_power_of_two(self.num_splits):
            raise ValueError(f"num_splits must be a power of two >= 1, got {self.num_splits}")
        if not _is_power_of_two(self.num_warps) or self.num_warps > 16:
            raise ValueError(f"num_warps must be a power of two <= 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")

    @staticmethod
    def for_batch(num_tokens: int, num_seqs: int, num_heads: int, num_kv_heads: int,
                  device: torch.device, sliding_window: int | None = None) -> "AttentionTiling":
        """Decode (one token per sequence): the smallest tile, and enough key splits that
        sequences x kv heads x splits fill the GPU twice over, except under a window of at
        most SMALL_WINDOW keys: there each program walks a few key blocks alone, cheaper than
        the merge kernel a split needs (a launch a layer). Prefill: 128-row tiles over
        8 warps, two stages: best of 48 tilings at gpt-oss shapes on an H100 (2k full
        180 against 198 us with 64-row tiles, 4 warps, 3 stages; 2k window 128 47 against
        52; 8k full 2118 against 2420)."""
        group = num_heads // num_kv_heads
        if num_tokens > num_seqs:
            return AttentionTiling(block_m=max(128, triton.next_power_of_2(group)), block_n=64,
                                   num_splits=1, num_warps=8, num_stages=2)
        splits = 1
        small_window = sliding_window is not None and sliding_window <= SMALL_WINDOW
        if device.type == "cuda" and not small_window:
            programs = max(num_seqs * num_kv_heads, 1)
            target = 2 * _multiprocessors(device.index if device.index is not None
                                          else torch.cuda.current_device())
            while splits < 16 and programs * splits * 2 <= target:
                splits *= 2
        return AttentionTiling(block_m=max(16, triton.next_power_of_2(group)), block_n=64,
                               num_splits=splits)


def _check_cache(name: str, cache: torch.Tensor) -> None:
    if cache.dim() != 4 or cache.stride(3) != 1:
        raise ValueError(f"{name} must be [num_blocks, block_size, K, D] with unit stride in D")


def paged_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, sinks: torch.Tensor, scale: float,
                    sliding_window: int | None,
                    tiling: AttentionTiling | None = None) -> torch.Tensor:
    """Causal attention of the new tokens over their paged context. Returns [T, H, D] like q.

    q [T, H, D]; key_cache, value_cache [NB, BS, K, D]; block_tables [B, MB] int32;
    seq_lens [B] int32; query_start_loc [B + 1] int32; sinks [H] (logits, unscaled).
    """
    num_tokens, num_heads, head_dim = q.shape
    _check_cache("key_cache", key_cache)
    _check_cache("value_cache", value_cache)
    _, block_size, num_kv_heads, cache_dim = key_cache.shape
    if value_cache.shape != key_cache.shape or cache_dim != head_dim:
        raise ValueError(f"caches {tuple(key_cache.shape)} / {tuple(value_cache.shape)} do not "
                         f"match q {tuple(q.shape)}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of K ({num_kv_heads})")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens),
                    ("query_start_loc", query_start_loc)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    num_seqs = seq_lens.numel()
    if query_start_loc.numel() != num_seqs + 1 or block_tables.shape[0] != num_seqs:
        raise ValueError("query_start_loc must have B + 1 entries and block_tables B rows")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")

    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    tiling = tiling or AttentionTiling.for_batch(num_tokens, num_seqs, num_heads, num_kv_heads,
                                                 q.device, sliding_window)
    if group > tiling.block_m:
        raise ValueError(f"block_m ({tiling.block_m}) must hold the {group} heads of a kv group")
    if q.stride(2) != 1:
        q = q.contiguous()
    block_q = tiling.block_m // group
    head_block = triton.next_power_of_2(head_dim)
    splits = tiling.num_splits
    if splits > 1:
        part_acc = torch.empty((num_tokens, num_heads, splits, head_block), dtype=torch.float32,
                               device=q.device)
        part_max = torch.empty((num_tokens, num_heads, splits), dtype=torch.float32,
                               device=q.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_acc = part_max = part_sum = out  # unused by the kernel when NUM_SPLITS == 1

    grid = (num_tokens // block_q + num_seqs, num_kv_heads, splits)
    _paged_attention_kernel[grid](
        out, part_acc, part_max, part_sum,
        q, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
        sinks.contiguous(),  # any float dtype: the kernel reads it as fp32
        num_seqs, float(scale) * LOG2E, sliding_window or 0, group, head_dim,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0),
        CACHE_BLOCK=block_size, BLOCK_M=tiling.block_m, BLOCK_Q=block_q,
        BLOCK_N=tiling.block_n, HEAD_D=head_block, NUM_SPLITS=splits,
        USE_WINDOW=sliding_window is not None,
        DOT_FP32=q.device.type == "cpu",  # the Triton interpreter: no bf16 matmul in numpy
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=tiling.num_warps, num_stages=tiling.num_stages,
    )
    if splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out, part_acc, part_max, part_sum, num_heads, head_dim,
            out.stride(0), out.stride(1),
            NUM_SPLITS=splits, HEAD_D=head_block,
        )
    return out


def write_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key_cache.view(-1, K, D)[slot_mapping[t]] = key[t] (same for value); slot -1 skips.

    key, value [T, K, D]; caches [NB, BS, K, D] with each slot's [K, D] contiguous;
    slot_mapping [T] int64.
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        _check_cache(name, cache)
        if (cache.shape[2:] != key.shape[1:] or cache.stride(2) != head_dim
                or cache.stride(0) != cache.shape[1] * cache.stride(1)):
            raise ValueError(f"{name} {tuple(cache.shape)} must be [NB, BS, K, D] for key "
                             f"{tuple(key.shape)} with slots evenly strided")
    if value.shape != key.shape or slot_mapping.shape != (num_tokens,):
        raise ValueError("value must match key and slot_mapping must be [T]")
    if num_tokens == 0:
        return
    key = key.reshape(num_tokens, -1)      # [T, K * D]
    value = value.reshape(num_tokens, -1)
    row_elems = num_kv_heads * head_dim
    _write_kv_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        row_elems, key.stride(0), value.stride(0), key_cache.stride(1), value_cache.stride(1),
        BLOCK=triton.next_power_of_2(row_elems),
    )


# ---------------------------------------------------------------------------------------
# Reference: plain fp32 torch, one sequence at a time.
# ---------------------------------------------------------------------------------------

def paged_attention_reference(q: torch.Tensor, key_cache: torch.Tensor,
                              value_cache: torch.Tensor, block_tables: torch.Tensor,
                              seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                              sinks: torch.Tensor, scale: float,
                              sliding_window: int | None) -> torch.Tensor:
    """fp32 reference of `paged_attention`. Returns fp32 [T, H, D]."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros((num_tokens, num_heads, head_dim), dtype=torch.float32, device=q.device)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        first, last = starts[b], starts[b + 1]
        if first == last:
            continue
        query_pos = torch.arange(seq_len - (last - first), seq_len, device=q.device)   # [n]
        # Keys from the first query's window on; earlier block-table entries may be -1.
        lo = 0 if sliding_window is None else max(0, int(query_pos[0]) - sliding_window + 1)
        key_pos = torch.arange(lo, seq_len, device=q.device)                             # [L]
        blocks = block_tables[b, key_pos // block_size].long()
        k = key_cache[blocks, key_pos % block_size].float()                              # [L, K, D]
        v = value_cache[blocks, key_pos % block_size].float()
        k = k.repeat_interleave(group, dim=1)                                            # [L, H, D]
        v = v.repeat_interleave(group, dim=1)
        logits = torch.einsum("nhd,lhd->hnl", q[first:last].float(), k) * scale          # [H, n, L]
        visible = key_pos[None, :] <= query_pos[:, None]                                 # [n, L]
        if sliding_window is not None:
            visible &= key_pos[None, :] > query_pos[:, None] - sliding_window
        logits = logits.masked_fill(~visible, float("-inf"))
        sink = sinks.float()[:, None, None].expand(-1, last - first, 1)                 # [H, n, 1]
        probs = torch.softmax(torch.cat((logits, sink), dim=-1), dim=-1)[..., :-1]
        out[first:last] = torch.einsum("hnl,lhd->nhd", probs, v)
    return out
