"""Triton code of paged attention and of the KV-cache write (private; see kernels/attention.py).

One program owns a tile of BLOCK_Q consecutive new tokens of one sequence and the G query
heads that share one kv head, stacked as BLOCK_M = BLOCK_Q * G (padded) rows:

    row r  ->  query token q_lo + r // G, query head kv_head * G + r % G

so a decode step (one token) still fills the matrix unit with G heads, and each key/value
tile is read once for the whole group. Programs are numbered over all sequences without
host help: sequence b owns programs [qsl[b] // BLOCK_Q + b, qsl[b+1] // BLOCK_Q + b + 1),
which is at least cdiv(n_b, BLOCK_Q) of them; the surplus ones return at once.

Keys are walked in tiles of BLOCK_N positions; each position finds its physical slot via
the block table (one entry per cache block, gathered per key). Only positions inside the
tile's causal window are looked up, so block-table entries the engine released (-1) in
front of a sliding window are never read.

Softmax is online, in fp32 and base 2. The sink enters as the initial running maximum with
a running sum of 1 (exp(S - m) with m = S), i.e. an extra column with no value. With
NUM_SPLITS > 1 the key range is cut into contiguous pieces whose partial (m, l, acc) go to
scratch and a second kernel merges them; the sink then rides in split 0's partial.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
# Finite stand-in for -inf as the running max of a split with no keys: keeps exp2 free of
# (-inf) - (-inf).
_EMPTY_MAX = tl.constexpr(-1.0e30)


@triton.jit
def _find_sequence(query_start_loc_ptr, num_seqs, program, BLOCK_Q: tl.constexpr):
    """Largest b with query_start_loc[b] // BLOCK_Q + b <= program (binary search)."""
    lo: tl.int32 = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= program:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def _paged_attention_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    sinks_ptr,
    num_seqs, qk_scale_log2, sliding_window, group_size, head_dim,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    CACHE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
    USE_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    program = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = _find_sequence(query_start_loc_ptr, num_seqs, program, BLOCK_Q)
    seq_q_start = tl.load(query_start_loc_ptr + seq)
    num_new = tl.load(query_start_loc_ptr + seq + 1) - seq_q_start
    q_lo = (program - (seq_q_start // BLOCK_Q + seq)) * BLOCK_Q   # first new token of tile
    if q_lo >= num_new:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_start = seq_len - num_new                 # position of the first new token

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_lo + rows // group_size                 # [BM] new-token index in the sequence
    heads = kv_head * group_size + rows % group_size  # [BM] query head
    row_valid = (rows < BLOCK_Q * group_size) & (q_idx < num_new)
    tokens = (seq_q_start + q_idx).to(tl.int64)
    positions = context_start + q_idx                 # [BM]
    dims = tl.arange(0, HEAD_D)
    dim_valid = dims < head_dim
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=row_valid[:, None] & dim_valid[None, :], other=0.0)   # [BM, D]
    if DOT_FP32:
        q = q.to(tl.float32)

    # Keys the tile needs: [kv_lo, kv_hi), the union of its rows' windows.
    q_last = tl.minimum(q_lo + BLOCK_Q, num_new) - 1
    kv_hi = context_start + q_last + 1
    if USE_WINDOW:
        kv_lo = tl.maximum(context_start + q_lo - sliding_window + 1, 0)
    else:
        kv_lo = 0
    tile_lo = kv_lo // BLOCK_N * BLOCK_N
    num_tiles = tl.cdiv(kv_hi - tile_lo, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, num_tiles)

    sink = tl.load(sinks_ptr + heads, mask=row_valid, other=0.0).to(tl.float32) * _LOG2E
    if split == 0:
        m_i = sink                                    # running max, base 2
        l_i = tl.full((BLOCK_M,), 1.0, tl.float32)    # exp2(sink - m_i)
    else:
        m_i = tl.full((BLOCK_M,), _EMPTY_MAX, tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_D), tl.float32)

    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile in range(tile_begin, tile_end):
        keys = tile_lo + tile * BLOCK_N + tl.arange(0, BLOCK_N)         # [BN] positions
        key_valid = (keys >= kv_lo) & (keys < kv_hi)
        block = tl.load(bt_row + keys // CACHE_BLOCK, mask=key_valid, other=0).to(tl.int64)
        in_block = keys % CACHE_BLOCK
        kv_mask = key_valid[:, None] & dim_valid[None, :]
        k = tl.load(k_cache_ptr + (block * stride_kb + in_block * stride_ks
                                   + kv_head * stride_kh)[:, None] + dims[None, :],
                    mask=kv_mask, other=0.0)                             # [BN, D]
        v = tl.load(v_cache_ptr + (block * stride_vb + in_block * stride_vs
                                   + kv_head * stride_vh)[:, None] + dims[None, :],
                    mask=kv_mask, other=0.0)                             # [BN, D]
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2  # [BM, BN]
        visible = key_valid[None, :] & (keys[None, :] <= positions[:, None])
        if USE_WINDOW:
            visible = visible & (keys[None, :] > positions[:, None] - sliding_window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        correction = tl.exp2(m_i - m_new)
        l_i = l_i * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        out_ptrs = (out_ptr + tokens[:, None] * stride_ot + heads[:, None] * stride_oh
                    + dims[None, :])
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty),
                 mask=row_valid[:, None] & dim_valid[None, :])
    else:
        # Scratch [T, H, NUM_SPLITS] for m and l, [T, H, NUM_SPLITS, HEAD_D] for acc.
        num_heads = tl.num_programs(1) * group_size
        part = (tokens * num_heads + heads) * NUM_SPLITS + split        # [BM]
        tl.store(part_max_ptr + part, m_i, mask=row_valid)
        tl.store(part_sum_ptr + part, l_i, mask=row_valid)
        tl.store(part_acc_ptr + part[:, None] * HEAD_D + dims[None, :], acc,
                 mask=row_valid[:, None])


@triton.jit
def _merge_splits_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, num_heads, head_dim,
    stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, HEAD_D: tl.constexpr,
):
    """out[t, h] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, M = max_s m_s."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_D)
    part = (token * num_heads + head) * NUM_SPLITS + splits           # [S]
    m = tl.load(part_max_ptr + part)
    l_sum = tl.load(part_sum_ptr + part)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_D + dims[None, :])  # [S, D]
    weight = tl.exp2(m - tl.max(m, axis=0))
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l_sum * weight, axis=0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims,
             out.to(out_ptr.dtype.element_ty), mask=dims < head_dim)


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    row_elems, stride_kt, stride_vt, stride_kc_slot, stride_vc_slot,
    BLOCK: tl.constexpr,
):
    """Copy token t's [K * D] key and value rows into cache slot slot_mapping[t] (if >= 0).

    The cache is addressed as [num_blocks * block_size, K * D]: slot = block * bs + offset.
    """
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:
        return
    offs = tl.arange(0, BLOCK)
    mask = offs < row_elems
    k = tl.load(key_ptr + token * stride_kt + offs, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + offs, mask=mask)
    tl.store(k_cache_ptr + slot * stride_kc_slot + offs, k.to(k_cache_ptr.dtype.element_ty),
             mask=mask)
    tl.store(v_cache_ptr + slot * stride_vc_slot + offs, v.to(v_cache_ptr.dtype.element_ty),
             mask=mask)
