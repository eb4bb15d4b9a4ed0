"""Top-k / top-p / min-p sampling of one token per row, without sorting the vocabulary.

Semantics (vLLM's order, those of workers/engine/sampler.py), per row of fp32 logits x [V]:

    temperature 0:  argmax x (first index among ties); the row's noise is never read
    otherwise:      s = x / temperature
                    top-k   keep s >= the k-th largest s                (0 < k < V; else off)
                    top-p   keep the most likely tokens, in order, up to and including the
                            one whose cumulative probability (among the top-k survivors)
                            first reaches top_p                          (top_p < 1; else off)
                    min-p   keep prob >= min_p * the largest prob                (0: off)
                    token = argmax over kept v of prob_v / max(E_v, tiny)   (first index)

E [B, V] is the caller's Exp(1) noise, drawn row by row from each row's own generator
(workers/engine/sampler.py: `exponential_noise`); the kernel only reads it, so seeds and batch
invariance stay where they were. Ties: every token equal to a threshold value is kept (the
k-th largest s, the smallest probability of the nucleus), exactly as the sort-based torch
path keeps them.

Why a threshold search instead of a sort: every step above keeps {v : value_v >= t} for one
threshold t per step, so it suffices to find t. The kernel searches t over the integer keys
of fp32 values (exact: it ends on a value of the row, ties included), testing 16 probes per
pass over the row; a pass reads the V logits once, and a search takes 8 passes. A segmented
sort of 201k keys with their indices moves several times the bytes of one such pass per
radix digit, and needs a cumulative sum and a gather after it. Without top-k and top-p the
kernel reads the logits twice (max, race); the noise is read only where a token is kept.
Rows are cut into chunks of 8192 so a batch of one still spreads over ~25 programs; the
price is one launch per pass: 3, plus 8 per truncation step any row asks for, a number
fixed on the host without a sync.
Details: kernels/_sampling_triton.py.

Agreement with the torch path: top-k and greedy are exact (the same correctly rounded
fp32 division, integer counts). top-p and min-p compare sums and ratios that the torch path
computes in another order (a sorted cumulative sum, a softmax), and the race scores
e_v / E_v with e_v = exp(s_v - max s), i.e. prob_v / E_v before the common division by the
row's sum; so the two choose the same token except where fp32 rounding itself decides: a
nucleus boundary whose cumulative mass lies within a few ulps of top_p, a probability within
ulps of the min-p threshold, or two race scores within ulps. Rows whose logits are all -inf,
or hold NaN, have no defined token.

Batch invariance: programs never mix rows, and a row's sums run in an order fixed by the
tiling and V alone, never by the batch.

Public: `sample_tokens`, `SamplingTiling`, and the fp32 torch reference
`sample_tokens_reference` at the bottom.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton

from tandem.kernels._sampling_triton import (
    _merge_kernel,
    _race_kernel,
    _search_kernel,
    _stats_kernel,
)

# Widest key intervals a search can start from (inclusive counts of int32 keys): top-k
# spans key(-inf) .. key(+inf) of s, top-p spans the bits of e in [0.0, 1.0].
_TOP_K_KEYS = 0x7F800000 + 0x7F800001 + 1
_TOP_P_KEYS = 0x3F800000 + 1


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


def search_passes(keys: int, probes: int) -> int:
    """Passes a P-probe search needs to narrow `keys` candidate keys down to one."""
    passes = 0
    while keys > 1:
        keys = -(-keys // probes)
        passes += 1
    return passes


@dataclass(frozen=True)
class SamplingTiling:
    """Work split of `sample_tokens`. It fixes the order of a row's sums, so it must not
    depend on the batch (batch invariance); the default suits any batch size."""

    chunk: int = 8192
    # vocabulary entries per program (a row of V runs on cdiv(V, chunk) programs)
    block: int = 1024
    # entries per step inside a chunk; divides chunk
    probes: int = 16
    # keys a search pass tests at once (power of two >= 2): 16 resolve 32 bits in 8 passes
    num_warps: int = 8
    # warps per program

    def __post_init__(self) -> None:
        for name in ("chunk", "block"):
            value = getattr(self, name)
            if value < 16 or not _is_power_of_two(value):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.block > self.chunk:
            raise ValueError(f"block ({self.block}) must not exceed chunk ({self.chunk})")
        if self.probes < 2 or not _is_power_of_two(self.probes):
            raise ValueError(f"probes must be a power of two >= 2, got {self.probes}")
        if not _is_power_of_two(self.num_warps) or self.num_warps > 32:
            raise ValueError(f"num_warps must be a power of two <= 32, got {self.num_warps}")


def _check_rows(name: str, t: torch.Tensor | None, dtype: torch.dtype, batch: int,
                device: torch.device) -> None:
    if t is None:
        return
    if t.shape != (batch,) or t.dtype != dtype or t.device != device:
        raise ValueError(f"{name} must be a [{batch}] {dtype} tensor on {device}, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device}")


def sample_tokens(logits: torch.Tensor, noise: torch.Tensor, temperature: torch.Tensor,
                  top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None,
                  min_p: torch.Tensor | None = None,
                  tiling: SamplingTiling | None = None) -> torch.Tensor:
    """One token per row -> [B] int64. Never synchronises with the device.

    logits [B, V] fp32 and noise [B, V] fp32 Exp(1) draws (unit stride along V); per row:
    temperature [B] fp32 (0: greedy, else > 0), top_k [B] int32 (<= 0 or >= V: off),
    top_p [B] fp32 in (0, 1] (1: off), min_p [B] fp32 in [0, 1] (0: off). A None tensor
    switches that step off for every row and drops its launches. Values are not checked
    here (that would synchronise); SamplingParams validated them.
    """
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"logits must be a [B, V] float32 tensor with unit stride along V, "
                         f"got {logits.dtype} {tuple(logits.shape)}")
    if noise.shape != logits.shape or noise.dtype != torch.float32 or noise.stride(1) != 1:
        raise ValueError(f"noise must be a float32 tensor shaped like logits "
                         f"{tuple(logits.shape)} with unit stride, got {noise.dtype} "
                         f"{tuple(noise.shape)}")
    batch, vocab = logits.shape
    device = logits.device
    if noise.device != device:
        raise ValueError(f"noise is on {noise.device}, logits on {device}")
    _check_rows("temperature", temperature, torch.float32, batch, device)
    _check_rows("top_k", top_k, torch.int32, batch, device)
    _check_rows("top_p", top_p, torch.float32, batch, device)
    _check_rows("min_p", min_p, torch.float32, batch, device)
    if not 1 <= vocab < 2**31:
        raise ValueError(f"vocabulary size must be in [1, 2**31), got {vocab}")

    tiling = tiling or SamplingTiling()
    out = torch.empty(batch, dtype=torch.int64, device=device)
    if batch == 0:
        return out
    probes = tiling.probes
    num_chunks = triton.cdiv(vocab, tiling.chunk)
    grid = (batch, num_chunks)
    f32, i32, i64 = torch.float32, torch.int32, torch.int64
    stats = torch.empty((batch, num_chunks, 2), dtype=f32, device=device)
    k_passes = search_passes(_TOP_K_KEYS, probes) if top_k is not None else 0
    p_passes = search_passes(_TOP_P_KEYS, probes) if top_p is not None else 0
    k_state = torch.empty((max(k_passes, 1), batch, 2), dtype=i64, device=device)
    k_shares = torch.empty((max(k_passes, 1), batch, num_chunks, probes), dtype=i32,
                           device=device)
    p_state = torch.empty((max(p_passes, 1), batch, 2), dtype=i64, device=device)
    p_shares = torch.empty((max(p_passes, 1), batch, num_chunks, probes), dtype=f32,
                           device=device)
    best = torch.empty((batch, num_chunks), dtype=f32, device=device)
    best_index = torch.empty((batch, num_chunks), dtype=i32, device=device)
    # An unused per-row tensor is never read; any tensor stands in for its pointer.
    top_k_arg = temperature if top_k is None else top_k
    top_p_arg = temperature if top_p is None else top_p
    min_p_arg = temperature if min_p is None else min_p
    common = dict(CHUNK=tiling.chunk, BLOCK=tiling.block,
                  IEEE_MATH=device.type == "cuda",  # the interpreter's numpy is IEEE already
                  # libdevice keeps subnormal results, as torch's expf does
                  enable_reflect_ftz=False, num_warps=tiling.num_warps)
    chunks_pow2 = triton.next_power_of_2(num_chunks)

    _stats_kernel[grid](logits, temperature, stats, vocab, logits.stride(0), **common)
    for mass, passes, state, shares in ((False, k_passes, k_state, k_shares),
                                        (True, p_passes, p_state, p_shares)):
        for pass_index in range(passes):
            _search_kernel[grid](
                logits, temperature, top_k_arg, top_p_arg, stats, k_state, k_shares,
                state, shares, pass_index, k_passes, vocab, logits.stride(0),
                MASS=mass, HAS_TOP_K=top_k is not None, CHUNKS=chunks_pow2, PROBES=probes,
                **common,
            )
    _race_kernel[grid](
        logits, noise, temperature, top_k_arg, top_p_arg, min_p_arg, stats, k_state,
        k_shares, p_state, p_shares, best, best_index, k_passes, p_passes, vocab,
        logits.stride(0), noise.stride(0),
        HAS_TOP_K=top_k is not None, HAS_TOP_P=top_p is not None, HAS_MIN_P=min_p is not None,
        CHUNKS=chunks_pow2, PROBES=probes, **common,
    )
    _merge_kernel[(batch,)](best, best_index, out, num_chunks, CHUNKS=chunks_pow2)
    return out


# ---------------------------------------------------------------------------------------
# Reference: plain fp32 torch, one row at a time, with full sorts.
# ---------------------------------------------------------------------------------------

def sample_tokens_reference(logits: torch.Tensor, noise: torch.Tensor,
                            temperature: torch.Tensor, top_k: torch.Tensor | None = None,
                            top_p: torch.Tensor | None = None,
                            min_p: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 torch reference of `sample_tokens` (same arguments, no tiling) -> [B] int64."""
    tokens = []
    for row in range(logits.shape[0]):
        x = logits[row].float()  # [V]
        t = temperature[row].item()
        if t == 0.0:
            tokens.append(x.argmax())
            continue
        s = x / t
        k = 0 if top_k is None else int(top_k[row].item())
        if 0 < k < s.numel():
            kth = s.sort(descending=True).values[k - 1]
            s = s.masked_fill(s < kth, -torch.inf)
        p = 1.0 if top_p is None else top_p[row].item()
        if p < 1.0:
            probs = s.softmax(dim=0)
            ordered = probs.sort(descending=True).values  # [V]
            mass_before = F.pad(ordered.cumsum(dim=0)[:-1], (1, 0))  # exclusive prefix sums
            kept = int((mass_before < p).sum().item())
            s = s.masked_fill(probs < ordered[kept - 1], -torch.inf)
        m = 0.0 if min_p is None else min_p[row].item()
        if m > 0.0:
            probs = s.softmax(dim=0)
            s = s.masked_fill(probs < m * probs.max(), -torch.inf)
        draws = noise[row].clamp_min(torch.finfo(torch.float32).tiny)
        tokens.append((s.softmax(dim=0) / draws).argmax())
    return torch.stack(tokens).to(torch.int64) if tokens else torch.empty(0, dtype=torch.int64)
