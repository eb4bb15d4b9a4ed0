"""Triton code of top-k / top-p / min-p sampling (private; the public entry is kernels/sampling.py).

Every kernel runs on a grid of (row, chunk): a row of V logits is cut into C = cdiv(V, CHUNK)
chunks, so even a batch of one spreads over C programs. A chunk is walked in BLOCK-wide
steps. Launches, in order (each reads only what the earlier ones wrote):

    _stats_kernel            chunk max and min of s = logits / temperature       [B, C, 2]
    _search_kernel x KP      top-k: one search pass each (counts)              [KP, B, C, P]
    _search_kernel x PP      top-p: one search pass each (masses)              [PP, B, C, P]
    _race_kernel             chunk winner of the race (or of the argmax)         [B, C]
    _merge_kernel            the row's winner                                    [B]

A search finds the largest integer key t in [lo, hi] with F(t) >= target, for an F that
never increases with t, given F(lo) >= target. A pass evaluates F at P probes
lo, lo + step, ..., lo + (P - 1) step (step = cdiv(hi - lo + 1, P)) over the whole row:
each chunk writes its share of F at every probe, and the next launch adds the C shares and
keeps the piece [lo + j step, lo + (j + 1) step - 1] of the last probe that reached the
target. Every program of that launch derives the same interval from the same numbers; the
row's chunk 0 also stores it (`state`), so a launch reads one pass back, never the whole
history. Keys are integers, so the search ends on an exact value of the row:

    top-k: key = ordered bits of s (s_a < s_b <=> key_a < key_b), over [key(min), key(max)];
           F(t) = #{key >= t}, target k              -> key of the k-th largest s
    top-p: key = bits of e = exp(s - max) (e >= 0, so its bits are already ordered), over
           [0, bits of 1.0], among the top-k survivors; F(t) = sum of e over {key >= t},
           target top_p * F(0)  (pass 0's probe 0 is lo = 0: the survivors' whole mass)
           -> the smallest e whose strictly larger ones hold less than top_p of the mass

Kept tokens are {key >= t}: every token tied with the threshold value is kept. P-ary
splitting resolves a 32-bit key range in 8 passes for P = 16. The host launches a fixed
number of passes; a row that asks for no search returns at once, one whose interval is down
to a single key skips reading its chunk, and the shares of such a pass are never read.

Sums run over a row in an order fixed by CHUNK, BLOCK and V only (within a chunk step by
step, then the chunks' shares in one tree): a row's result never depends on the batch.

On the GPU `/` in Triton is the approximate div.full.f32 and tl.exp an ex2.approx; IEEE_MATH
switches to the correctly rounded division and libdevice's expf (launched without its
flush-to-zero), so s equals torch's `logits / temperature` bit for bit and e is as close to
torch's softmax numerator as an independent implementation gets. The interpreter's numpy
math is IEEE already.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

# torch.finfo(torch.float32).tiny: the race's draws are clamped to it, as in
# workers/engine/sampler.py.
_TINY = tl.constexpr(1.1754943508222875e-38)
# Bits of 1.0f, the largest e = exp(s - max) can be.
_ONE_BITS = tl.constexpr(0x3F800000)
# Below every key a token can have (the key of -inf is 0x807FFFFF): padding never counts.
_NO_KEY = tl.constexpr(-2147483648)


@triton.jit
def _ordered_key(s):
    """fp32 -> int32 in the order of the floats (NaN excluded; -0.0 must be folded first)."""
    bits = s.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _row_block(row_ptr, start, vocab, temperature, row_max, BLOCK: tl.constexpr,
               IEEE_MATH: tl.constexpr):
    """One step of a row: (offsets, valid, s = logits / temperature (-inf past the row),
    ordered key of s, e = exp(s - row_max)). Values a caller does not use cost nothing once
    compiled; the helpers are inlined here because every call of a jit function is costly
    in the interpreter."""
    offs = start + tl.arange(0, BLOCK)
    valid = offs < vocab
    x = tl.load(row_ptr + offs, mask=valid, other=float("-inf"))
    if IEEE_MATH:
        s = tl.math.div_rn(x, temperature)
    else:
        s = x / temperature
    # -0.0 and 0.0 compare equal, so they must share a key.
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    if IEEE_MATH:
        e = libdevice.exp(s - row_max)
    else:
        e = tl.exp(s - row_max)
    return offs, valid, s, key, e


@triton.jit
def _row_range(stats_ptr, row, num_chunks, CHUNKS: tl.constexpr):
    """(max, min) of the row's s from the chunk stats [B, C, 2]."""
    chunks = tl.arange(0, CHUNKS)
    base = stats_ptr + row * num_chunks * 2 + chunks * 2
    inside = chunks < num_chunks
    row_max = tl.max(tl.load(base, mask=inside, other=float("-inf")), axis=0)
    row_min = tl.min(tl.load(base + 1, mask=inside, other=float("inf")), axis=0)
    return row_max, row_min


@triton.jit
def _probes(lo, hi, PROBES: tl.constexpr):
    """The P probes of [lo, hi] (int64) and their spacing."""
    step = (hi - lo + PROBES) // PROBES
    return lo + tl.arange(0, PROBES).to(tl.int64) * step, step


@triton.jit
def _pass_total(shares_ptr, pass_index, row, batch, num_chunks, CHUNKS: tl.constexpr,
                PROBES: tl.constexpr):
    """F at each probe of one pass: the C chunk shares [PP, B, C, P] added up -> [P]."""
    chunks = tl.arange(0, CHUNKS)
    probe_ids = tl.arange(0, PROBES)
    base = shares_ptr + ((pass_index * batch + row) * num_chunks) * PROBES
    shares = tl.load(base + chunks[:, None] * PROBES + probe_ids[None, :],
                     mask=(chunks < num_chunks)[:, None], other=0)  # [CHUNKS, P]
    return tl.sum(shares, axis=0)


@triton.jit
def _interval(state_ptr, shares_ptr, pass_index, row, batch, num_chunks, first_lo, first_hi,
              target, CHUNKS: tl.constexpr, PROBES: tl.constexpr):
    """The interval pass `pass_index` probes (pass_index = number of passes: the result)."""
    lo = first_lo.to(tl.int64)
    hi = first_hi.to(tl.int64)
    if pass_index > 0:
        prev = pass_index - 1
        lo = tl.load(state_ptr + (prev * batch + row) * 2)
        hi = tl.load(state_ptr + (prev * batch + row) * 2 + 1)
        probes, step = _probes(lo, hi, PROBES)
        reached = _pass_total(shares_ptr, prev, row, batch, num_chunks, CHUNKS, PROBES)
        # F never increases with t, so the probes reaching the target are a prefix; probe
        # 0 is lo, which reaches it by the invariant (and a one-key interval stays put
        # whatever its unread shares hold).
        passed = (reached >= target) & (probes <= hi)
        j = tl.max(tl.where(passed, tl.arange(0, PROBES), 0), axis=0)
        lo = lo + j.to(tl.int64) * step
        hi = tl.minimum(hi, lo + step - 1)
    return lo, hi


@triton.jit
def _top_k_key(top_k_ptr, k_state_ptr, k_shares_ptr, k_passes, row, batch, vocab, num_chunks,
               row_max, row_min, HAS_TOP_K: tl.constexpr, CHUNKS: tl.constexpr,
               PROBES: tl.constexpr):
    """Smallest kept key of s after top-k (key of the row minimum: top-k off)."""
    k_key = _ordered_key(row_min)
    if HAS_TOP_K:
        top_k = tl.load(top_k_ptr + row)
        if (top_k > 0) & (top_k < vocab):
            lo = _interval(k_state_ptr, k_shares_ptr, k_passes, row, batch, num_chunks,
                           k_key, _ordered_key(row_max), top_k, CHUNKS, PROBES)[0]
            k_key = lo.to(tl.int32)
    return k_key


@triton.jit
def _stats_kernel(logits_ptr, temperature_ptr, stats_ptr, vocab, stride_logits,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr, IEEE_MATH: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    temperature = tl.load(temperature_ptr + row)
    if temperature != 0.0:
        row_ptr = logits_ptr + row * stride_logits
        top = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        bottom = tl.full([BLOCK], float("inf"), dtype=tl.float32)
        for start in range(chunk * CHUNK, (chunk + 1) * CHUNK, BLOCK):
            # row_max +inf: e is unused here, and exp(s - inf) = 0 raises no overflow.
            block = _row_block(row_ptr, start, vocab, temperature, float("inf"), BLOCK,
                               IEEE_MATH)
            valid, s = block[1], block[2]
            top = tl.maximum(top, s)
            bottom = tl.minimum(bottom, tl.where(valid, s, float("inf")))
        out = stats_ptr + (row * tl.num_programs(1) + chunk) * 2
        tl.store(out, tl.max(top, axis=0))
        tl.store(out + 1, tl.min(bottom, axis=0))


@triton.jit
def _search_kernel(logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, stats_ptr,
                   k_state_ptr, k_shares_ptr, state_ptr, shares_ptr,
                   pass_index, k_passes, vocab, stride_logits,
                   MASS: tl.constexpr, HAS_TOP_K: tl.constexpr, CHUNK: tl.constexpr,
                   CHUNKS: tl.constexpr, BLOCK: tl.constexpr, PROBES: tl.constexpr,
                   IEEE_MATH: tl.constexpr):
    """One pass of the top-k search (MASS False) or of the top-p search (MASS True)."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    batch = tl.num_programs(0)
    num_chunks = tl.num_programs(1)
    temperature = tl.load(temperature_ptr + row)
    active = temperature != 0.0
    if MASS:
        top_p = tl.load(top_p_ptr + row)
        active = active & (top_p < 1.0)
    else:
        top_k = tl.load(top_k_ptr + row)
        active = active & (top_k > 0) & (top_k < vocab)
    if active:
        row_max, row_min = _row_range(stats_ptr, row, num_chunks, CHUNKS)
        if MASS:
            k_key = _top_k_key(top_k_ptr, k_state_ptr, k_shares_ptr, k_passes, row, batch,
                               vocab, num_chunks, row_max, row_min, HAS_TOP_K, CHUNKS, PROBES)
            target = 0.0
            if pass_index > 0:
                target = top_p * tl.max(tl.where(tl.arange(0, PROBES) == 0, _pass_total(
                    shares_ptr, 0, row, batch, num_chunks, CHUNKS, PROBES), 0.0), axis=0)
            lo, hi = _interval(state_ptr, shares_ptr, pass_index, row, batch, num_chunks,
                               tl.zeros([], dtype=tl.int32),
                               tl.full([], _ONE_BITS, dtype=tl.int32), target, CHUNKS, PROBES)
        else:
            k_key = _ordered_key(row_min)
            lo, hi = _interval(state_ptr, shares_ptr, pass_index, row, batch, num_chunks,
                               k_key, _ordered_key(row_max), top_k, CHUNKS, PROBES)
        if chunk == 0:
            tl.store(state_ptr + (pass_index * batch + row) * 2, lo)
            tl.store(state_ptr + (pass_index * batch + row) * 2 + 1, hi)
        # The first top-p pass always runs ([0, bits of 1.0] is wide): its probe 0, lo = 0,
        # is the survivors' whole mass, which the later passes aim at a share of.
        if lo < hi:
            probes = _probes(lo, hi, PROBES)[0]
            # hi + 1 < 2**31 (hi is at most the key of +inf), so the clamp fits int32.
            probes = tl.minimum(probes, hi + 1).to(tl.int32)  # [P]
            if MASS:
                reached = tl.zeros([PROBES], dtype=tl.float32)
            else:
                reached = tl.zeros([PROBES], dtype=tl.int32)
            row_ptr = logits_ptr + row * stride_logits
            for start in range(chunk * CHUNK, (chunk + 1) * CHUNK, BLOCK):
                block = _row_block(row_ptr, start, vocab, temperature, row_max, BLOCK,
                                   IEEE_MATH)
                valid, s_key, e = block[1], block[3], block[4]
                if MASS:
                    survives = valid & (s_key >= k_key)
                    key = tl.where(survives, e.to(tl.int32, bitcast=True), _NO_KEY)
                    hit = key[:, None] >= probes[None, :]  # [BLOCK, P]
                    reached += tl.sum(tl.where(hit, e[:, None], 0.0), axis=0)
                else:
                    key = tl.where(valid, s_key, _NO_KEY)
                    hit = key[:, None] >= probes[None, :]  # [BLOCK, P]
                    reached += tl.sum(hit.to(tl.int32), axis=0)
            out = shares_ptr + ((pass_index * batch + row) * num_chunks + chunk) * PROBES
            tl.store(out + tl.arange(0, PROBES), reached)


@triton.jit
def _race_kernel(logits_ptr, noise_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr,
                 stats_ptr, k_state_ptr, k_shares_ptr, p_state_ptr, p_shares_ptr,
                 best_ptr, index_ptr, k_passes, p_passes, vocab, stride_logits, stride_noise,
                 HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr, HAS_MIN_P: tl.constexpr,
                 CHUNK: tl.constexpr, CHUNKS: tl.constexpr, BLOCK: tl.constexpr,
                 PROBES: tl.constexpr, IEEE_MATH: tl.constexpr):
    """Chunk winner: largest e / max(E, tiny) over kept tokens (masked ones score 0), or the
    largest logit for a greedy row; first index among equals."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    batch = tl.num_programs(0)
    num_chunks = tl.num_programs(1)
    row_ptr = logits_ptr + row * stride_logits
    temperature = tl.load(temperature_ptr + row)
    best = float("-inf")
    best_index = 0
    if temperature == 0.0:
        for start in range(chunk * CHUNK, (chunk + 1) * CHUNK, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + offs, mask=offs < vocab, other=float("-inf"))
            block_best = tl.max(x, axis=0)
            block_index = start + tl.argmax(x, axis=0, tie_break_left=True)
            # Strictly greater: an equal value later loses to the earlier index.
            best_index = tl.where(block_best > best, block_index, best_index)
            best = tl.maximum(best, block_best)
    else:
        row_max, row_min = _row_range(stats_ptr, row, num_chunks, CHUNKS)
        k_key = _top_k_key(top_k_ptr, k_state_ptr, k_shares_ptr, k_passes, row, batch, vocab,
                           num_chunks, row_max, row_min, HAS_TOP_K, CHUNKS, PROBES)
        p_key = tl.zeros([], dtype=tl.int32)
        if HAS_TOP_P:
            top_p = tl.load(top_p_ptr + row)
            if top_p < 1.0:
                target = top_p * tl.max(tl.where(tl.arange(0, PROBES) == 0, _pass_total(
                    p_shares_ptr, 0, row, batch, num_chunks, CHUNKS, PROBES), 0.0), axis=0)
                lo = _interval(p_state_ptr, p_shares_ptr, p_passes, row, batch, num_chunks,
                               p_key, tl.full([], _ONE_BITS, dtype=tl.int32), target,
                               CHUNKS, PROBES)[0]
                p_key = lo.to(tl.int32)
        # min-p keeps prob >= min_p * largest prob, and the largest e is exp(0) = 1.
        min_e = 0.0
        if HAS_MIN_P:
            min_e = tl.load(min_p_ptr + row)
        noise_row_ptr = noise_ptr + row * stride_noise
        for start in range(chunk * CHUNK, (chunk + 1) * CHUNK, BLOCK):
            block = _row_block(row_ptr, start, vocab, temperature, row_max, BLOCK, IEEE_MATH)
            offs, valid, s_key, e = block[0], block[1], block[3], block[4]
            kept = (valid & (s_key >= k_key) & (e.to(tl.int32, bitcast=True) >= p_key)
                    & (e >= min_e))
            # Only kept tokens of nonzero e read their draw (e = 0 scores 0 whatever the
            # draw); the clamp keeps 0 / 0 out, as in the reference.
            draws = tl.load(noise_row_ptr + offs, mask=kept & (e > 0.0), other=1.0)
            draws = tl.maximum(draws, _TINY)
            if IEEE_MATH:
                score = tl.math.div_rn(e, draws)
            else:
                score = e / draws
            score = tl.where(kept, score, 0.0)
            score = tl.where(valid, score, -1.0)  # padding never wins; masked tokens score 0
            block_best = tl.max(score, axis=0)
            block_index = start + tl.argmax(score, axis=0, tie_break_left=True)
            best_index = tl.where(block_best > best, block_index, best_index)
            best = tl.maximum(best, block_best)
    tl.store(best_ptr + row * num_chunks + chunk, best)
    tl.store(index_ptr + row * num_chunks + chunk, best_index)


@triton.jit
def _merge_kernel(best_ptr, index_ptr, out_ptr, num_chunks, CHUNKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunks = tl.arange(0, CHUNKS)
    inside = chunks < num_chunks
    best = tl.load(best_ptr + row * num_chunks + chunks, mask=inside, other=float("-inf"))
    # Chunks are in token order, so the first chunk among equals holds the first index.
    winner = tl.argmax(best, axis=0, tie_break_left=True)
    tl.store(out_ptr + row, tl.load(index_ptr + row * num_chunks + winner).to(tl.int64))
