"""Triton code of the MXFP4 MoE's small-batch path (private; the public entry is kernels/moe.py).

Two GEMV families replace the grouped GEMMs of kernels/_moe_triton.py when a batch has a
handful of (token, slot) pairs: the bit-placement GEMV (any dtype, the CPU interpreter
included) and the tensor-core GEMV (bf16/fp16 activations on CUDA). The packed weight row
layout is the checkpoint's, as described there.
"""

import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------
# Small batches (decode): one program per (token, slot) pair and output tile, no grouping.
#
# With a handful of pairs each expert has about one row, so the grouped GEMMs spend
# most of a 16-row tile on padding and launch few programs per SM. Here a program owns one
# pair and BLOCK_N outputs: it streams its expert's packed rows once, multiplying them by
# the one activation row in registers (no tl.dot), so the launch is pairs x N / BLOCK_N
# programs of pure weight streaming, and routing needs no sort.
# ---------------------------------------------------------------------------------------


# Powers of two of the bit-placement decode (see _row_dot_mxfp4).
_TWO_POW_64 = tl.constexpr(18446744073709551616.0)
_TWO_POW_62 = tl.constexpr(4611686018427387904.0)


@triton.jit
def _row_dot_mxfp4(vec_ptr, blocks_ptr, scales_ptr, rows, row_mask, K, groups,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum_k W[rows, k] * vec[k] in fp32 -> [BLOCK_N]; vec is one contiguous row of K.

    The E2M1 codes become floats by bit placement alone, and each group's scale is applied
    once to its partial sum instead of to every weight (1.3x faster at T = 1..4 on an H100
    than the table lookup, int-to-float conversion and per-weight scale of the GEMMs' fp32
    path, which made the GEMV ALU-bound).

    A code's three magnitude bits placed at fp32 bits 22-24 (its sign at bit 31) read as
    the code's value times 2^-126: exponent bits 23-24 hold E2M1's exponent and bit 22 its
    mantissa, and the zero-exponent code 0.5 lands on an fp32 subnormal, which the FMA
    takes exactly. The activations are pre-scaled by 2^64 so the products stay normal;
    a group's partial sum is then multiplied by 2^(s - 127) and by 2^62 (= 2^(126 - 64)).
    Every scaling is an exact power of two, so only the order of the fp32 sums differs
    from the reference. Tiles are [rows, groups, 16 bytes]: a group's bytes are one
    thread's 16-byte load and its sum needs no exchange between threads.
    """
    KG: tl.constexpr = BLOCK_K // 32
    group_offs = tl.arange(0, KG)                                            # [KG]
    byte_offs = tl.arange(0, 16)                                             # [16]
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        group = k0 // 32 + group_offs                                        # [KG]
        g_valid = group < groups
        byte = group[:, None] * 16 + byte_offs[None, :]                      # [KG, 16]
        packed = tl.load(blocks_ptr + rows[:, None, None] * (groups * 16) + byte[None, :, :],
                         mask=row_mask[:, None, None] & g_valid[None, :, None],
                         other=0).to(tl.int32)                               # [BN, KG, 16]
        even = 2 * byte                                                      # [KG, 16] inputs
        vec_even = tl.load(vec_ptr + even, mask=g_valid[:, None], other=0.0).to(tl.float32)
        vec_odd = tl.load(vec_ptr + even + 1, mask=g_valid[:, None], other=0.0).to(tl.float32)
        w_even = (((packed & 7) << 22) | ((packed & 8) << 28)).to(tl.float32, bitcast=True)
        w_odd = (((packed & 0x70) << 18) | ((packed & 0x80) << 24)).to(tl.float32, bitcast=True)
        partial = tl.sum(w_even * (vec_even * _TWO_POW_64)[None, :, :]
                         + w_odd * (vec_odd * _TWO_POW_64)[None, :, :], axis=2)  # [BN, KG]
        scale_byte = tl.load(scales_ptr + rows[:, None] * groups + group[None, :],
                             mask=row_mask[:, None] & g_valid[None, :], other=0)
        scale = (scale_byte.to(tl.int32) << 23).to(tl.float32, bitcast=True)   # 2^(s - 127)
        acc += tl.sum(partial * scale * _TWO_POW_62, axis=1)
    return acc


@triton.jit
def _gate_up_program(experts_ptr, d_ff, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's pair, token and weight rows: act columns j of tile program_id(1) are
    weight rows 2j (gate) and 2j + 1 (up), adjacent, so it reads 2 * BLOCK_N consecutive
    rows and splits the sums afterwards."""
    pair = tl.program_id(0).to(tl.int64)
    expert = tl.load(experts_ptr + pair).to(tl.int64)
    local = tl.program_id(1) * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)   # [2BN] interleaved
    row_valid = local < 2 * d_ff
    return pair, pair // TOP_K, expert * 2 * d_ff + local, row_valid


@triton.jit
def _swiglu(acc, bias_ptr, rows, row_valid, swiglu_limit, alpha, BLOCK_N: tl.constexpr):
    """[2 * BLOCK_N] interleaved gate/up sums + bias -> [BLOCK_N] clamped SwiGLU, fp32."""
    acc += tl.load(bias_ptr + rows, mask=row_valid, other=0.0).to(tl.float32)
    gate, up = tl.split(tl.reshape(acc, (BLOCK_N, 2)))       # [BN] each
    gate = tl.minimum(gate, swiglu_limit)
    up = tl.minimum(tl.maximum(up, -swiglu_limit), swiglu_limit)
    return (up + 1.0) * gate * tl.sigmoid(alpha * gate)


@triton.jit
def _gate_up_swiglu_gemv_kernel(
    x_ptr, blocks_ptr, scales_ptr, bias_ptr, act_ptr, experts_ptr,
    d_model, d_ff, row_bytes, groups, stride_x, stride_act, swiglu_limit, alpha,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """act[pair, j] for BLOCK_N columns j (see _gate_up_program)."""
    pair, token, rows, row_valid = _gate_up_program(experts_ptr, d_ff, TOP_K, BLOCK_N)
    acc = _row_dot_mxfp4(x_ptr + token * stride_x, blocks_ptr, scales_ptr, rows, row_valid,
                         d_model, groups, 2 * BLOCK_N, BLOCK_K)
    act = _swiglu(acc, bias_ptr, rows, row_valid, swiglu_limit, alpha, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(act_ptr + pair * stride_act + cols, act.to(act_ptr.dtype.element_ty),
             mask=cols < d_ff)


@triton.jit
def _down_program(experts_ptr, d_model, BLOCK_N: tl.constexpr):
    """This program's pair, model dims (tile program_id(1)) and their weight rows."""
    pair = tl.program_id(0).to(tl.int64)
    expert = tl.load(experts_ptr + pair).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return pair, cols, expert * d_model + cols, cols < d_model


@triton.jit
def _store_down(acc, bias_ptr, route_weight_ptr, y_ptr, pair, cols, rows, col_valid,
                stride_y):
    """y[pair, cols] = w_pair * (acc + b2[rows]), fp32."""
    bias = tl.load(bias_ptr + rows, mask=col_valid, other=0.0).to(tl.float32)
    y = (acc + bias) * tl.load(route_weight_ptr + pair)
    tl.store(y_ptr + pair * stride_y + cols, y, mask=col_valid)


@triton.jit
def _down_gemv_kernel(
    act_ptr, blocks_ptr, scales_ptr, bias_ptr, route_weight_ptr, experts_ptr, y_ptr,
    d_model, d_ff, row_bytes, groups, stride_act, stride_y,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[pair, n] = w_pair * (act[pair] . W2[e, n] + b2[e, n]) for BLOCK_N model dims n."""
    pair, cols, rows, col_valid = _down_program(experts_ptr, d_model, BLOCK_N)
    acc = _row_dot_mxfp4(act_ptr + pair * stride_act, blocks_ptr, scales_ptr, rows, col_valid,
                         d_ff, groups, BLOCK_N, BLOCK_K)
    _store_down(acc, bias_ptr, route_weight_ptr, y_ptr, pair, cols, rows, col_valid, stride_y)


# ---------------------------------------------------------------------------------------
# Small batches on tensor cores (bf16/fp16 activations on CUDA).
#
# The GEMV above spends ~4 integer operations a weight turning nibbles into fp32 and is
# ALU-bound at about a third of the bandwidth. Here each 32-bit word (8 nibbles) becomes
# four f16x2 registers in 15 integer operations, and one mma.sync per word does the
# multiplies and the fp32 sums. The trick that spares any layout conversion: a program's
# weight tile is [rows, 4] 32-bit words, one MXFP4 group per row, loaded one word per lane
# so that lane 4m + q holds word q of row m (a quad of lanes holds a row's whole group).
# Those registers are the A fragment of an m16n8k16 MMA as they stand: A's row m takes
# the even elements of the quad's four words, row m + 8 the odd ones; the B fragment of a
# lane in an even column n carries the even elements' activations, of an odd column the
# odd ones. Then D[m, 2q] + D[m + 8, 2q + 1] of lane 4m + q is row m's dot product with
# the group, in fp32 (the products are exact: E2M1 in f16 and f16 activations).
#
# Activations go in as f16 pairs in that order, each 32-group with its own power-of-two
# exponent so that any bf16 value fits f16 exactly (_pack_f16_pairs below).
# ---------------------------------------------------------------------------------------

# E2M1 codes placed at f16 bits 9-11 (sign at 15) read as the value times 2^-14, the
# zero-exponent code 0.5 landing on an f16 subnormal. Word bits: byte b holds element 2b
# (low nibble) and 2b + 1 (high). r0 = (e0, e4), r1 = (e2, e6), r2 = (e1, e5),
# r3 = (e3, e7); A = {r0, r2, r1, r3}: rows m get the even elements, rows m + 8 the odd.
_F16_GROUP_DOT_ASM = tl.constexpr("""
{
.reg .b32 t0, t1, r0, r1, r2, r3;
.reg .f32 d0, d1, d2, d3;
shl.b32 t0, $1, 9; and.b32 t0, t0, 0x0E000E00;
shl.b32 t1, $1, 12; and.b32 t1, t1, 0x80008000; or.b32 r0, t0, t1;
shl.b32 t0, $1, 1; and.b32 t0, t0, 0x0E000E00;
shl.b32 t1, $1, 4; and.b32 t1, t1, 0x80008000; or.b32 r1, t0, t1;
shl.b32 t0, $1, 5; and.b32 t0, t0, 0x0E000E00;
shl.b32 t1, $1, 8; and.b32 t1, t1, 0x80008000; or.b32 r2, t0, t1;
shr.b32 t0, $1, 3; and.b32 t0, t0, 0x0E000E00;
and.b32 t1, $1, 0x80008000; or.b32 r3, t0, t1;
mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {d0, d1, d2, d3}, {r0, r2, r1, r3},
    {$2, $3}, {0f00000000, 0f00000000, 0f00000000, 0f00000000};
add.f32 $0, d0, d3;
}
""")


@triton.jit
def _f16_group_dot(words, x_pairs):
    """Per lane: the dot product of its quad's row with one group (see the section note)."""
    x_lo = (x_pairs & 0xFFFFFFFF).to(tl.int32)
    x_hi = (x_pairs >> 32).to(tl.int32)
    return tl.inline_asm_elementwise(_F16_GROUP_DOT_ASM, "=r,r,r,r", [words, x_lo, x_hi],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _f16_pairs(h):
    """h [W, 8] int64 f16 bit patterns of W words' elements -> [W, 2] int64: column 0 the
    pairs (e0, e4) | (e2, e6) << 32 (the B fragment of an even MMA column), column 1
    (e1, e5) | (e3, e7) << 32 (an odd column); the first element of a pair in the low half."""
    W: tl.constexpr = h.shape[0]
    parts = tl.reshape(h, (W, 2, 2, 2))                        # element 4a + 2b + c
    a = tl.arange(0, 2)[None, :, None, None]
    b = tl.arange(0, 2)[None, None, :, None]
    return tl.sum(tl.sum(parts << (16 * a + 32 * b), axis=2), axis=1)


@triton.jit
def _scaled_f16_bits(x, exp):
    """int64 bit patterns of x * 2^-exp in f16 (exp broadcasts against x)."""
    scaled = x * ((127 - exp) << 23).to(tl.float32, bitcast=True)
    return scaled.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int64) & 0xFFFF


@triton.jit
def _pack_groups(x):
    """x [R, 32] fp32, one MXFP4-sized group a row -> (pairs [R, 2, 4] int64: the group's 4
    words' pairs for even and odd MMA columns, exps [R] int32): the group is scaled by
    2^-exp, exp = floor(log2(max |x|)) - 14, so every value is below 2^15 and bf16's 8
    significant bits fit f16's 11 down to 2^-28 of the group's largest (exact for bf16
    inputs in practice; smaller values keep f16's absolute resolution)."""
    R: tl.constexpr = x.shape[0]
    amax_bits = tl.max(tl.abs(x), axis=1).to(tl.int32, bitcast=True)
    exp = tl.minimum(tl.maximum(((amax_bits >> 23) & 0xFF) - 141, -100), 113)  # [R]
    h = _scaled_f16_bits(x, exp[:, None])
    pairs = tl.reshape(_f16_pairs(tl.reshape(h, (R * 4, 8))), (R, 4, 2))       # [R, q, c]
    return tl.permute(pairs, (0, 2, 1)), exp


@triton.jit
def _store_packed(xq_ptr, xe_ptr, offs, valid, pairs, exp):
    """Packed groups to xq (int64, 8 per group) and xe at group offsets offs [R]."""
    slot = tl.arange(0, 8)[None, :]
    tl.store(xq_ptr + offs[:, None] * 8 + slot, tl.reshape(pairs, (pairs.shape[0], 8)),
             mask=valid[:, None])
    tl.store(xe_ptr + offs, exp, mask=valid)


@triton.jit
def _pack_f16_pairs_kernel(x_ptr, xq_ptr, xe_ptr, groups, stride_x, BLOCK_G: tl.constexpr):
    """x [T, groups * 32] -> xq [T, groups, 2, 4] int64, xe [T, groups] int32 (_pack_groups);
    xq and xe contiguous."""
    token = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_valid = group < groups
    x = tl.load(x_ptr + token * stride_x + group[:, None] * 32 + tl.arange(0, 32)[None, :],
                mask=g_valid[:, None], other=0.0).to(tl.float32)              # [BG, 32]
    pairs, exp = _pack_groups(x)
    _store_packed(xq_ptr, xe_ptr, token * groups + group, g_valid, pairs, exp)


@triton.jit
def _load_words_step(w_ptrs, x_ptrs, g0, groups, row_valid):
    """The weight words and activation pairs of groups g0 .. g0 + 3 ([BN, 4] each)."""
    m0 = row_valid[:, None] & (g0 < groups)
    m1 = row_valid[:, None] & (g0 + 1 < groups)
    m2 = row_valid[:, None] & (g0 + 2 < groups)
    m3 = row_valid[:, None] & (g0 + 3 < groups)
    return (tl.load(w_ptrs + g0 * 4, mask=m0, other=0),
            tl.load(w_ptrs + (g0 + 1) * 4, mask=m1, other=0),
            tl.load(w_ptrs + (g0 + 2) * 4, mask=m2, other=0),
            tl.load(w_ptrs + (g0 + 3) * 4, mask=m3, other=0),
            tl.load(x_ptrs + g0 * 8, mask=m0, other=0),
            tl.load(x_ptrs + (g0 + 1) * 8, mask=m1, other=0),
            tl.load(x_ptrs + (g0 + 2) * 8, mask=m2, other=0),
            tl.load(x_ptrs + (g0 + 3) * 8, mask=m3, other=0))


@triton.jit
def _step_scale(s_ptrs, xe_ptr, x_exp, zero, g0, groups, row_valid, odd, q,
                GROUP_EXPS: tl.constexpr):
    """[BN, 4]: lane q's scale of group g0 + q: 2^(s - 127) * 2^xe * 2^14 (the decode's
    2^-14); products out of fp32's range flush."""
    g_valid = g0 + q < groups
    exp = tl.load(s_ptrs + g0, mask=row_valid[:, None] & g_valid, other=0).to(tl.int32)
    if GROUP_EXPS:
        exp += tl.load(xe_ptr + zero + g0 + q + 0 * odd, mask=g_valid, other=0)
    else:
        exp += x_exp
    return (tl.minimum(tl.maximum(exp + 14, 0), 254) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _mma_step(acc, w0, w1, w2, w3, x0, x1, x2, x3, scale, q):
    """acc + four groups' dot products, lane q taking the scale of group q of the step."""
    acc += _f16_group_dot(w0, x0) * tl.where(q == 0, scale, 0.0)
    acc += _f16_group_dot(w1, x1) * tl.where(q == 1, scale, 0.0)
    acc += _f16_group_dot(w2, x2) * tl.where(q == 2, scale, 0.0)
    acc += _f16_group_dot(w3, x3) * tl.where(q == 3, scale, 0.0)
    return acc


@triton.jit
def _row_dot_f16_mma(xq_ptr, xe_ptr, x_exp, words_ptr, scales_ptr, rows, row_valid, groups,
                     zero, BLOCK_N: tl.constexpr, GROUP_EXPS: tl.constexpr,
                     STEP: tl.constexpr):
    """sum_k W[rows, k] * x[k] in fp32 -> [BLOCK_N] (BLOCK_N a multiple of 8).

    xq_ptr/xe_ptr: this activation row packed by _pack_f16_pairs_kernel; without
    GROUP_EXPS every group has the exponent x_exp. Every tile is [BLOCK_N, 4] with the 4
    contiguous in memory; `zero` (0, never specialised) hides the alignment the coalescer
    would vectorise with, so each lane loads one element and lane 4m + q holds column q of
    row m (tests/test_kernel_moe.py compiles for sm_90 and checks that layout). Lane q of
    a quad applies the scales of groups g = q (mod 4). A lane reads 4 bytes a group, so
    one warp keeps few bytes in flight: every load of STEP groups (4, 8 or 16) is issued
    before their MMAs."""
    q = tl.arange(0, 4)[None, :]
    odd = (tl.arange(0, BLOCK_N) % 2)[:, None]              # the lane's MMA column parity
    w_ptrs = words_ptr + zero + rows[:, None] * (groups * 4) + q
    x_ptrs = xq_ptr + zero + odd * 4 + q
    s_ptrs = scales_ptr + zero + rows[:, None] * groups + q
    acc = tl.zeros((BLOCK_N, 4), dtype=tl.float32)
    for g0 in range(0, groups, STEP):
        a0, a1, a2, a3, ax0, ax1, ax2, ax3 = _load_words_step(w_ptrs, x_ptrs, g0, groups,
                                                              row_valid)
        sa = _step_scale(s_ptrs, xe_ptr, x_exp, zero, g0, groups, row_valid, odd, q,
                         GROUP_EXPS)
        if STEP >= 8:
            b0, b1, b2, b3, bx0, bx1, bx2, bx3 = _load_words_step(w_ptrs, x_ptrs, g0 + 4,
                                                                  groups, row_valid)
            sb = _step_scale(s_ptrs, xe_ptr, x_exp, zero, g0 + 4, groups, row_valid, odd, q,
                             GROUP_EXPS)
        if STEP >= 16:
            c0, c1, c2, c3, cx0, cx1, cx2, cx3 = _load_words_step(w_ptrs, x_ptrs, g0 + 8,
                                                                  groups, row_valid)
            sc = _step_scale(s_ptrs, xe_ptr, x_exp, zero, g0 + 8, groups, row_valid, odd, q,
                             GROUP_EXPS)
            d0, d1, d2, d3, dx0, dx1, dx2, dx3 = _load_words_step(w_ptrs, x_ptrs, g0 + 12,
                                                                  groups, row_valid)
            sd = _step_scale(s_ptrs, xe_ptr, x_exp, zero, g0 + 12, groups, row_valid, odd, q,
                             GROUP_EXPS)
        acc = _mma_step(acc, a0, a1, a2, a3, ax0, ax1, ax2, ax3, sa, q)
        if STEP >= 8:
            acc = _mma_step(acc, b0, b1, b2, b3, bx0, bx1, bx2, bx3, sb, q)
        if STEP >= 16:
            acc = _mma_step(acc, c0, c1, c2, c3, cx0, cx1, cx2, cx3, sc, q)
            acc = _mma_step(acc, d0, d1, d2, d3, dx0, dx1, dx2, dx3, sd, q)
    return tl.sum(acc, axis=1)


@triton.jit(do_not_specialize=["zero"])
def _gate_up_swiglu_gemv_mma_kernel(
    xq_ptr, xe_ptr, words_ptr, scales_ptr, bias_ptr, actq_ptr, experts_ptr,
    d_ff, groups, stride_xq, stride_xe, stride_actq, act_exp, swiglu_limit, alpha, zero,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, STEP: tl.constexpr,
):
    """The tensor-core GEMV 1: act columns [BLOCK_N * pid, + BLOCK_N) of one pair, written
    straight in the packed form GEMV 2 reads (scaled by 2^-act_exp: |act| is bounded by the
    SwiGLU clamp, so one exponent serves every group)."""
    pair, token, rows, row_valid = _gate_up_program(experts_ptr, d_ff, TOP_K, BLOCK_N)
    acc = _row_dot_f16_mma(xq_ptr + token * stride_xq, xe_ptr + token * stride_xe, 0,
                           words_ptr, scales_ptr, rows, row_valid, groups, zero, 2 * BLOCK_N,
                           True, STEP)
    act = _swiglu(acc, bias_ptr, rows, row_valid, swiglu_limit, alpha, BLOCK_N)
    h = _scaled_f16_bits(act, act_exp)
    pairs = _f16_pairs(tl.reshape(h, (BLOCK_N // 8, 8)))                 # [W, 2]
    word = tl.program_id(1) * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)[:, None]  # act word
    c = tl.arange(0, 2)[None, :]
    tl.store(actq_ptr + pair * stride_actq + (word // 4) * 8 + c * 4 + word % 4, pairs,
             mask=word * 8 < d_ff)


@triton.jit(do_not_specialize=["zero"])
def _down_gemv_mma_kernel(
    actq_ptr, words_ptr, scales_ptr, bias_ptr, route_weight_ptr, experts_ptr, y_ptr,
    d_model, groups, stride_actq, stride_y, act_exp, zero, BLOCK_N: tl.constexpr,
    STEP: tl.constexpr,
):
    """The tensor-core GEMV 2: y[pair, n] = w_pair * (act[pair] . W2[e, n] + b2[e, n])."""
    pair, cols, rows, col_valid = _down_program(experts_ptr, d_model, BLOCK_N)
    acc = _row_dot_f16_mma(actq_ptr + pair * stride_actq, actq_ptr, act_exp, words_ptr,
                           scales_ptr, rows, col_valid, groups, zero, BLOCK_N, False,
                           STEP)
    _store_down(acc, bias_ptr, route_weight_ptr, y_ptr, pair, cols, rows, col_valid, stride_y)
