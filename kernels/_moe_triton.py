"""Triton code of the MXFP4 mixture-of-experts (private; the public entry is kernels/moe.py).

Two grouped GEMMs over token/expert pairs sorted by expert. A program owns one block of
BLOCK_M sorted pairs (all of one expert, padding rows marked by the sentinel pair id
`num_pairs`) and BLOCK_N output columns. For small batches, two GEMV kernels replace them
(one program per pair, no grouping: kernels/_moe_gemv_triton.py). Around them, one launch
each: routing (router GEMM, top-k, softmax), the two grouping passes, and the combine over
the k slots. Weights are
read as packed MXFP4 bytes plus E8M0 scales and decoded in registers just before use:
nothing dequantised ever reaches device memory.

Packed weight row (one output row n of expert e, K inputs, G = K / 32 groups):

    blocks[e, n]: | g0: 16 bytes | g1: 16 bytes | ... |   byte b: low nibble = elem 2b,
    scales[e, n]: | s0 | s1 | ...                    |           high nibble = elem 2b+1

A tile of BLOCK_K inputs is BLOCK_K / 2 bytes per row. Rather than interleaving the low
and high nibbles back into one [N, BLOCK_K] weight tile, each K step splits the (smaller)
activation tile into even and odd inputs and does two dots: even inputs against the low
nibbles, odd inputs against the high ones. That is the fp32 path; bf16 and fp16 activations
(SCALED_FORMAT) hand the packed bytes and scales to tl.dot_scaled instead, which decodes
them itself and was 1.1-1.2x faster on an H100 at T = 64..2048 (the register decode was
about half the old path's time at T = 64, a third at T = 2048: measured by stubbing it out).
Putting the weights on the MMA's M side instead ("swap AB", weights as dot_scaled's left
operand) measured 2-3x slower at every batch size (bench/RESULTS.md).
"""

import triton
import triton.language as tl

from tandem.kernels._moe_gemv_triton import _pack_groups, _store_packed

# Doubled E2M1 magnitudes [0, 0.5, 1, 1.5, 2, 3, 4, 6] * 2 = [0, 1, 2, 3, 4, 6, 8, 12],
# one per 4-bit lane: a 16-entry table lookup becomes a shift and a mask.
_E2M1_DOUBLED_LUT = tl.constexpr(0xC8643210)


@triton.jit
def _decode_e2m1(nibble):
    """E2M1 code (int32, 0..15) -> fp32 value times 2 (exact)."""
    lut = tl.full(nibble.shape, _E2M1_DOUBLED_LUT, tl.uint32)
    magnitude2 = (lut >> ((nibble & 7) * 4).to(tl.uint32)) & 15
    bits = magnitude2.to(tl.float32).to(tl.int32, bitcast=True) | ((nibble & 8) << 28)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _load_mxfp4_tile(blocks_ptr, scales_ptr, rows, row_mask, k0, row_bytes, groups,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Decoded weights of `rows` x inputs [k0, k0 + BLOCK_K): (even inputs, odd inputs), fp32.

    rows: [BN] int64 global row indices (expert * rows_per_expert + n). row_bytes = K / 2 and
    groups = K / 32 are passed from the tensors' strides so that Triton sees their
    divisibility and vectorises the byte loads.
    """
    byte_offs = k0 // 2 + tl.arange(0, BLOCK_K // 2)                      # [KH]
    packed = tl.load(blocks_ptr + rows[:, None] * row_bytes + byte_offs[None, :],
                     mask=row_mask[:, None] & (byte_offs < row_bytes)[None, :],
                     other=0).to(tl.int32)                                  # [BN, KH]
    group_offs = k0 // 32 + tl.arange(0, BLOCK_K // 32)                    # [KG]
    scale_byte = tl.load(scales_ptr + rows[:, None] * groups + group_offs[None, :],
                         mask=row_mask[:, None] & (group_offs < groups)[None, :],
                         other=1).to(tl.int32)                              # [BN, KG]
    # 2^(s - 128) built from its exponent bits: it undoes the doubled LUT. Scale bytes 0 and
    # 1 (values under 2^-126) flush to zero, far below anything bf16 activations resolve.
    scale = (tl.maximum(scale_byte - 1, 0) << 23).to(tl.float32, bitcast=True)
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, BLOCK_K // 32, 16)),
                       (BLOCK_N, BLOCK_K // 2))                             # 16 bytes per group
    even = _decode_e2m1(packed & 15) * scale
    odd = _decode_e2m1(packed >> 4) * scale
    return even, odd


@triton.jit
def _dot_scaled_mxfp4(acc, a, blocks_ptr, scales_ptr, rows, row_mask, k0, row_bytes, groups,
                      A_FORMAT: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + a @ W[rows, k0 : k0 + BLOCK_K]^T with W given as packed MXFP4 (tl.dot_scaled).

    a: activations [BM, BK] (bf16 or fp16, named by A_FORMAT). The packed bytes [BN, BK/2]
    transposed are the E2M1 right operand packed along K, as dot_scaled expects, and the
    scale bytes [BN, BK/32] its E8M0 scales: Triton decodes them next to the MMA, which
    measured 1.1-1.2x faster than decoding them here (see the module docstring). fast_math
    drops the NaN select of scale byte 255, which the checkpoint loader rejects: 7-25%
    faster on an H100 (bench/RESULTS.md), the same results otherwise.
    """
    byte_offs = k0 // 2 + tl.arange(0, BLOCK_K // 2)                      # [KH]
    packed = tl.load(blocks_ptr + rows[:, None] * row_bytes + byte_offs[None, :],
                     mask=row_mask[:, None] & (byte_offs < row_bytes)[None, :],
                     other=0)                                               # [BN, KH] uint8
    group_offs = k0 // 32 + tl.arange(0, BLOCK_K // 32)                    # [KG]
    scale_byte = tl.load(scales_ptr + rows[:, None] * groups + group_offs[None, :],
                         mask=row_mask[:, None] & (group_offs < groups)[None, :],
                         other=0)                                           # [BN, KG] uint8
    return tl.dot_scaled(a, None, A_FORMAT, tl.trans(packed), scale_byte, "e2m1", acc,
                         fast_math=True)


@triton.jit
def _load_rows(ptr, rows, row_mask, stride, k0, K, BLOCK_K: tl.constexpr):
    """Activations [rows, k0 : k0 + BLOCK_K], zero outside the rows and past K."""
    offs = k0 + tl.arange(0, BLOCK_K)
    return tl.load(ptr + rows[:, None] * stride + offs[None, :],
                   mask=row_mask[:, None] & (offs < K)[None, :], other=0.0)   # [BM, BK]


@triton.jit
def _load_even_odd(ptr, rows, row_mask, stride, k0, K, BLOCK_M: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """Activations [rows, k0 : k0 + BLOCK_K] read contiguously, split into (even, odd) inputs."""
    offs = k0 + tl.arange(0, BLOCK_K)
    a = tl.load(ptr + rows[:, None] * stride + offs[None, :],
                mask=row_mask[:, None] & (offs < K)[None, :], other=0.0)    # [BM, BK]
    return tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))


@triton.jit
def _dot(a, b_t, acc, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b_t^T. b_t holds fp32 weights; a holds activations (bf16, fp16 or fp32).

    E2M1 times a power of two is exact in bf16, so casting the weights to a's dtype loses
    nothing. DOT_FP32 runs the dot on fp32 copies instead: the CPU interpreter cannot
    multiply bf16 (numpy has no such type); the values, and so the result, are the same.
    """
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), tl.trans(b_t), acc, input_precision=DOT_PRECISION)
    return tl.dot(a, tl.trans(b_t.to(a.dtype)), acc, input_precision=DOT_PRECISION)


@triton.jit
def _gate_up_swiglu_kernel(
    x_ptr, blocks_ptr, scales_ptr, bias_ptr, act_ptr,
    pair_ids_ptr, block_expert_ptr,
    num_pairs, d_model, d_ff, row_bytes, groups, stride_x, stride_act,
    swiglu_limit, alpha,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, SCALED_FORMAT: tl.constexpr,
):
    """act[pair, j] = swiglu(x[token] . W1[e, 2j] + b1[e, 2j], x[token] . W1[e, 2j+1] + ...)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return  # beyond the last padded block of the last expert
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(pair_ids_ptr + rows)                      # [BM] flat (token, slot) ids
    row_valid = pairs < num_pairs
    tokens = (pairs // TOP_K).to(tl.int64)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)            # [BN] activation columns j
    col_valid = cols < d_ff
    gate_rows = expert.to(tl.int64) * 2 * d_ff + 2 * cols      # even weight rows: gate
    up_rows = gate_rows + 1                                   # odd weight rows: up
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d_model, BLOCK_K):
        if SCALED_FORMAT != "":
            x_tile = _load_rows(x_ptr, tokens, row_valid, stride_x, k0, d_model, BLOCK_K)
            acc_gate = _dot_scaled_mxfp4(acc_gate, x_tile, blocks_ptr, scales_ptr, gate_rows,
                                         col_valid, k0, row_bytes, groups, SCALED_FORMAT,
                                         BLOCK_K)
            acc_up = _dot_scaled_mxfp4(acc_up, x_tile, blocks_ptr, scales_ptr, up_rows,
                                       col_valid, k0, row_bytes, groups, SCALED_FORMAT, BLOCK_K)
        else:
            x_even, x_odd = _load_even_odd(x_ptr, tokens, row_valid, stride_x, k0, d_model,
                                           BLOCK_M, BLOCK_K)                # [BM, BK/2] each
            g_even, g_odd = _load_mxfp4_tile(blocks_ptr, scales_ptr, gate_rows, col_valid, k0,
                                             row_bytes, groups, BLOCK_N, BLOCK_K)
            u_even, u_odd = _load_mxfp4_tile(blocks_ptr, scales_ptr, up_rows, col_valid, k0,
                                             row_bytes, groups, BLOCK_N, BLOCK_K)
            acc_gate = _dot(x_even, g_even, acc_gate, DOT_FP32, DOT_PRECISION)
            acc_gate = _dot(x_odd, g_odd, acc_gate, DOT_FP32, DOT_PRECISION)
            acc_up = _dot(x_even, u_even, acc_up, DOT_FP32, DOT_PRECISION)
            acc_up = _dot(x_odd, u_odd, acc_up, DOT_FP32, DOT_PRECISION)

    gate = acc_gate + tl.load(bias_ptr + gate_rows, mask=col_valid, other=0.0).to(tl.float32)[
        None, :]
    up = acc_up + tl.load(bias_ptr + up_rows, mask=col_valid, other=0.0).to(tl.float32)[None, :]
    gate = tl.minimum(gate, swiglu_limit)
    up = tl.minimum(tl.maximum(up, -swiglu_limit), swiglu_limit)
    act = (up + 1.0) * gate * tl.sigmoid(alpha * gate)
    # Padding rows are written too (finite: swiglu of the bias); the down GEMM ignores them.
    out = act_ptr + rows.to(tl.int64)[:, None] * stride_act + cols[None, :]
    tl.store(out, act.to(act_ptr.dtype.element_ty), mask=col_valid[None, :])


@triton.jit
def _down_kernel(
    act_ptr, blocks_ptr, scales_ptr, bias_ptr, route_weight_ptr, y_ptr,
    pair_ids_ptr, block_expert_ptr,
    num_pairs, d_model, d_ff, row_bytes, groups, stride_act, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, SCALED_FORMAT: tl.constexpr,
):
    """y[pair, n] = w_pair * (act[pair] . W2[e, n] + b2[e, n]), one row per (token, slot)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(pair_ids_ptr + rows)
    row_valid = pairs < num_pairs
    act_rows = rows.to(tl.int64)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)            # [BN] model dims
    col_valid = cols < d_model
    w_rows = expert.to(tl.int64) * d_model + cols
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d_ff, BLOCK_K):
        if SCALED_FORMAT != "":
            a_tile = _load_rows(act_ptr, act_rows, row_valid, stride_act, k0, d_ff, BLOCK_K)
            acc = _dot_scaled_mxfp4(acc, a_tile, blocks_ptr, scales_ptr, w_rows, col_valid, k0,
                                    row_bytes, groups, SCALED_FORMAT, BLOCK_K)
        else:
            a_even, a_odd = _load_even_odd(act_ptr, act_rows, row_valid, stride_act, k0, d_ff,
                                           BLOCK_M, BLOCK_K)
            w_even, w_odd = _load_mxfp4_tile(blocks_ptr, scales_ptr, w_rows, col_valid, k0,
                                             row_bytes, groups, BLOCK_N, BLOCK_K)
            acc = _dot(a_even, w_even, acc, DOT_FP32, DOT_PRECISION)
            acc = _dot(a_odd, w_odd, acc, DOT_FP32, DOT_PRECISION)

    bias = tl.load(bias_ptr + w_rows, mask=col_valid, other=0.0).to(tl.float32)
    route_weight = tl.load(route_weight_ptr + pairs, mask=row_valid, other=0.0)
    y = (acc + bias[None, :]) * route_weight[:, None]
    out = y_ptr + pairs.to(tl.int64)[:, None] * stride_y + cols[None, :]
    tl.store(out, y, mask=row_valid[:, None] & col_valid[None, :])


# ---------------------------------------------------------------------------------------
# Routing, grouping and combine: the small steps around the GEMMs, one launch each.
# ---------------------------------------------------------------------------------------


@triton.jit
def _router_partial_kernel(
    x_ptr, w_ptr, partial_ptr, num_tokens, d_model, num_experts, split_len, stride_x,
    stride_w,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    FP32_DOT: tl.constexpr, PACK: tl.constexpr, xq_ptr, xe_ptr,
):
    """partial[split, t, e] = x[t, K-range of split] . W[e, same range] for BLOCK_T tokens.

    PACK: also write the tile's groups packed for the tensor-core GEMVs (xq [T, d / 32, 2, 4],
    xe [T, d / 32], contiguous; see _pack_groups), sparing them a launch of their own.

    The router GEMM split along K over a second grid axis, so a decode step's handful of
    tokens still spreads over many programs (one program walking all of K alone took
    ~9-12 us). The sums are fp32 sums of exact products either way: bf16 x bf16 products
    fit an fp32 mantissa, so bf16 inputs use the tensor cores with fp32 accumulation;
    FP32_DOT (fp32 inputs, or mixed dtypes) uses exact fp32 dots.
    """
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_valid = tokens < num_tokens
    experts = tl.arange(0, BLOCK_E)
    e_valid = experts < num_experts
    split = tl.program_id(1)
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k0 in range(split * split_len, (split + 1) * split_len, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        k_valid = offs < d_model
        x = tl.load(x_ptr + tokens.to(tl.int64)[:, None] * stride_x + offs[None, :],
                    mask=t_valid[:, None] & k_valid[None, :], other=0.0)      # [BT, BK]
        w = tl.load(w_ptr + experts[:, None] * stride_w + offs[None, :],
                    mask=e_valid[:, None] & k_valid[None, :], other=0.0)      # [BE, BK]
        if FP32_DOT:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc,
                         input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)                                   # [BT, BE]
        if PACK:
            groups = d_model // 32
            pairs, exp = _pack_groups(tl.reshape(x.to(tl.float32), (BLOCK_T * BLOCK_K // 32, 32)))
            group = k0 // 32 + tl.arange(0, BLOCK_K // 32)[None, :]                # [1, KG]
            offs = tokens.to(tl.int64)[:, None] * groups + group                   # [BT, KG]
            valid = t_valid[:, None] & (group < groups)
            _store_packed(xq_ptr, xe_ptr, tl.reshape(offs, (BLOCK_T * BLOCK_K // 32,)),
                          tl.reshape(valid, (BLOCK_T * BLOCK_K // 32,)), pairs, exp)
    out = (split * num_tokens + tokens.to(tl.int64))[:, None] * BLOCK_E + experts[None, :]
    tl.store(partial_ptr + out, acc, mask=t_valid[:, None])


@triton.jit
def _route_kernel(
    partial_ptr, b_ptr, route_weight_ptr, experts_ptr, num_tokens, num_experts, num_splits,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, SLOTS: tl.constexpr,
):
    """Top-k experts of BLOCK_T tokens and the softmax of their logits, all in fp32.

    The logits are the router GEMM's split partial sums added in split order (the same
    order whatever the batch) plus the bias. Slot 0 holds the largest logit; ties go to
    the lower expert index. SLOTS = TOP_K rounded up to a power of two (tensor shapes
    must be).
    """
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_valid = tokens < num_tokens
    experts = tl.arange(0, BLOCK_E)
    e_valid = experts < num_experts
    logits = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for split in range(0, num_splits):
        at = (split * num_tokens + tokens.to(tl.int64))[:, None] * BLOCK_E + experts[None, :]
        logits += tl.load(partial_ptr + at, mask=t_valid[:, None], other=0.0)
    logits += tl.load(b_ptr + experts, mask=e_valid, other=0.0).to(tl.float32)[None, :]
    logits = tl.where(e_valid[None, :], logits, float("-inf"))

    slots = tl.arange(0, SLOTS)
    chosen_logits = tl.full((BLOCK_T, SLOTS), float("-inf"), dtype=tl.float32)
    chosen = tl.zeros((BLOCK_T, SLOTS), dtype=tl.int32)
    for slot in tl.static_range(TOP_K):
        best = tl.max(logits, axis=1)                                           # [BT]
        # Lowest index among the maxima: deterministic under ties.
        index = tl.min(tl.where(logits == best[:, None], experts[None, :], BLOCK_E), axis=1)
        chosen_logits = tl.where(slots[None, :] == slot, best[:, None], chosen_logits)
        chosen = tl.where(slots[None, :] == slot, index[:, None], chosen)
        logits = tl.where(experts[None, :] == index[:, None], float("-inf"), logits)
    exps = tl.exp(chosen_logits - tl.max(chosen_logits, axis=1)[:, None])
    weights = exps / tl.sum(exps, axis=1)[:, None]
    out = tokens.to(tl.int64)[:, None] * TOP_K + slots[None, :]
    mask = t_valid[:, None] & (slots < TOP_K)[None, :]
    tl.store(route_weight_ptr + out, weights, mask=mask)
    tl.store(experts_ptr + out, chosen, mask=mask)


@triton.jit
def _count_kernel(experts_ptr, counts_ptr, ranks_ptr, num_pairs, num_experts,
                  BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per chunk of BLOCK_P pairs: its count of pairs per expert, and each pair's rank among
    the chunk's pairs of the same expert (stable: in pair order)."""
    chunk = tl.program_id(0)
    pairs = chunk * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = pairs < num_pairs
    expert = tl.load(experts_ptr + pairs, mask=valid, other=-1)
    one_hot = (expert[:, None] == tl.arange(0, BLOCK_E)[None, :]).to(tl.int32)   # [BP, BE]
    running = tl.cumsum(one_hot, axis=0)
    tl.store(ranks_ptr + pairs, tl.sum(one_hot * running, axis=1) - 1, mask=valid)
    experts = tl.arange(0, BLOCK_E)
    tl.store(counts_ptr + chunk * num_experts + experts, tl.sum(one_hot, axis=0),
             mask=experts < num_experts)


@triton.jit
def _scatter_kernel(experts_ptr, counts_ptr, ranks_ptr, pair_ids_ptr, block_expert_ptr,
                    offsets_ptr, num_pairs, num_experts, num_chunks, num_blocks,
                    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr):
    """Sorted, padded slot of every pair of this chunk; program 0 also writes the padding
    sentinels, the block -> expert table and the unpadded expert offsets.

    Slot of a pair of expert e = padded start of e + pairs of e in earlier chunks + rank.
    """
    chunk = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    e_valid = experts < num_experts
    total = tl.zeros((BLOCK_E,), dtype=tl.int32)
    before = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c in range(0, num_chunks):
        counts = tl.load(counts_ptr + c * num_experts + experts, mask=e_valid, other=0)
        total += counts
        before += tl.where(c < chunk, counts, 0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_start = tl.cumsum(padded, axis=0) - padded                           # [BE]

    pairs = chunk * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = pairs < num_pairs
    expert = tl.load(experts_ptr + pairs, mask=valid, other=0)
    one_hot = expert[:, None] == experts[None, :]                               # [BP, BE]
    base = tl.sum(tl.where(one_hot, (padded_start + before)[None, :], 0), axis=1)
    slot = base + tl.load(ranks_ptr + pairs, mask=valid, other=0)
    tl.store(pair_ids_ptr + slot, pairs, mask=valid)

    if chunk == 0:
        # Padding slots of each expert: [start + count, start + padded), disjoint from the
        # slots written above, so no ordering between programs is needed.
        offs = tl.arange(0, BLOCK_M)
        pad = padded_start[:, None] + total[:, None] + offs[None, :]            # [BE, BT]
        pad_mask = e_valid[:, None] & (total[:, None] + offs[None, :] < padded[:, None])
        tl.store(pair_ids_ptr + pad, num_pairs, mask=pad_mask)
        used_blocks = tl.sum(padded, axis=0) // BLOCK_M
        block_end = (padded_start + padded) // BLOCK_M                         # [BE]
        for b0 in range(0, num_blocks, BLOCK_P):
            blocks = b0 + tl.arange(0, BLOCK_P)
            owner = tl.sum((blocks[:, None] >= block_end[None, :]).to(tl.int32), axis=1)
            owner = tl.where(blocks < used_blocks, owner, -1)
            tl.store(block_expert_ptr + blocks, owner, mask=blocks < num_blocks)
            slots = blocks[:, None] * BLOCK_M + offs[None, :]                  # [BP, BT]
            unused = (blocks >= used_blocks) & (blocks < num_blocks)
            tl.store(pair_ids_ptr + slots, num_pairs, mask=unused[:, None])
        tl.store(offsets_ptr + 1 + experts, tl.cumsum(total, axis=0), mask=e_valid)
        tl.store(offsets_ptr + experts, 0, mask=experts == 0)


@triton.jit
def _combine_kernel(y_ptr, out_ptr, d_model, stride_y, stride_out,
                    TOP_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = sum over slots of y[t * k + slot] (fp32, slot order), cast to out's dtype."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < d_model
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (token * TOP_K + slot) * stride_y + cols, mask=mask, other=0.0)
    tl.store(out_ptr + token * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)
