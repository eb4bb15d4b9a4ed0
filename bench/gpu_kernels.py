"""GPU check and first timings of the Triton kernels at gpt-oss-20b shapes.

    python3 bench/gpu_kernels.py            # on a CUDA machine
    python3 bench/gpu_kernels.py --sweep    # first: candidate tilings, profile
    python3 bench/gpu_kernels.py --smoke    # tiny shapes, CPU interpreter

Checks every kernel against its fp32 torch reference with bf16 bounds, then times them
(CUDA events, median after warm-up; L2 flushed between runs by triton's do_bench) and
prints each time beside its floor: max(bytes / bandwidth, FLOPs / matrix rate) with the
H100 figures measured here (3.0 TB/s copy, ~790 TFLOP/s dense bf16). Ratio = floor / time,
for plain calls and for CUDA-graph replays (which hide the launch gaps of the small torch
ops around the kernels: routing, grouping, combine).
With $OUT set, the rows are also written to $OUT/gpu_kernels.json.
"""

import argparse
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

from tandem.kernels.attention import (  # noqa: E402
    AttentionTiling,
    paged_attention,
    paged_attention_reference,
    write_kv,
)
from tandem.kernels.gemv import gemv, gemv_reference  # noqa: E402
from tandem.kernels.moe import MoETiling, moe_mxfp4, moe_mxfp4_reference, route  # noqa: E402
from tandem.kernels.rmsnorm import rmsnorm, rmsnorm_reference  # noqa: E402

BANDWIDTH = 3.0e12   # bytes/s, H100 device-to-device copy measured on this workplace
MATMUL_RATE = 790e12  # FLOP/s, dense bf16 on random data
BF16_MAX_ERR, BF16_RMS_ERR = 2e-2, 1e-2


@dataclass(frozen=True)
class Shapes:
    """Model dimensions the bench runs at."""

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    window: int


GPT_OSS_20B = Shapes(d_model=2880, d_ff=2880, num_experts=32, top_k=4, num_heads=64,
                     num_kv_heads=8, head_dim=64, block_size=16, window=128)
SMOKE = Shapes(d_model=64, d_ff=64, num_experts=5, top_k=2, num_heads=4, num_kv_heads=2,
               head_dim=16, block_size=8, window=8)


@dataclass
class Row:
    """One timed case."""

    kernel: str
    case: str
    time_us: float
    graph_us: float  # the same call replayed from a CUDA graph: no launch gaps
    floor_us: float
    bound: str       # "memory" or "compute": which floor is larger
    bytes: float
    flops: float

    @property
    def ratio(self) -> float:
        return self.floor_us / self.time_us


def errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max abs error / max |expected|, rms error / rms expected); NaN -> inf."""
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return math.inf, math.inf
    diff = a - e
    return ((diff.abs().max() / e.abs().max()).item(),
            (diff.pow(2).mean().sqrt() / e.pow(2).mean().sqrt()).item())


def check(name: str, actual: torch.Tensor, expected: torch.Tensor) -> bool:
    max_err, rms_err = errors(actual, expected)
    ok = max_err < BF16_MAX_ERR and rms_err < BF16_RMS_ERR
    print(f"check {name:<44} max {max_err:.2e} rms {rms_err:.2e} {'ok' if ok else 'FAIL'}")
    return ok


def median_us(fn: Callable[[], object], device: torch.device) -> float:
    if device.type != "cuda":  # smoke run: one call, wall clock, just to exercise the table
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def graph_median_us(fn: Callable[[], object], device: torch.device) -> float:
    """Median of CUDA-graph replays (the L2 is not flushed between them)."""
    if device.type != "cuda":
        return math.nan
    import triton.testing
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median") * 1e3
    except RuntimeError as error:  # a capture failure is worth a line, not the whole run
        print(f"graph capture failed: {error}")
        return math.nan


def row(kernel: str, case: str, fn: Callable[[], object], device: torch.device,
        bytes_moved: float, flops: float) -> Row:
    memory_us, compute_us = bytes_moved / BANDWIDTH * 1e6, flops / MATMUL_RATE * 1e6
    bound = "memory" if memory_us >= compute_us else "compute"
    return Row(kernel, case, median_us(fn, device), graph_median_us(fn, device),
               max(memory_us, compute_us), bound, bytes_moved, flops)


# ----------------------------------------------------------------------------- MoE

def random_moe_weights(s: Shapes, device: torch.device) -> dict[str, torch.Tensor]:
    """Packed like the checkpoint: every nibble value, scales near gpt-oss's (2^-9..2^-5)."""
    gen = torch.Generator(device=device).manual_seed(0)

    def packed(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (s.num_experts, rows, cols // 32)
        blocks = torch.randint(0, 256, (*shape, 16), generator=gen, device=device,
                               dtype=torch.uint8)
        return blocks, torch.randint(118, 123, shape, generator=gen, device=device,
                                     dtype=torch.uint8)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * std).to(torch.bfloat16)

    gate_up_blocks, gate_up_scales = packed(2 * s.d_ff, s.d_model)
    down_blocks, down_scales = packed(s.d_model, s.d_ff)
    return {
        "router_weight": normal(s.num_experts, s.d_model, std=s.d_model ** -0.5),
        "router_bias": normal(s.num_experts, std=0.1),
        "gate_up_blocks": gate_up_blocks, "gate_up_scales": gate_up_scales,
        "gate_up_bias": normal(s.num_experts, 2 * s.d_ff, std=0.1),
        "down_blocks": down_blocks, "down_scales": down_scales,
        "down_bias": normal(s.num_experts, s.d_model, std=0.1),
    }


def moe_floor(s: Shapes, w: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[float, float]:
    """(bytes, FLOPs): each used expert's packed weights read once, x read, out written."""
    _, experts = route(x, w["router_weight"], w["router_bias"], s.top_k)
    used = torch.unique(experts).numel()
    per_expert = sum(w[name][0].numel() * w[name].element_size()
                     for name in ("gate_up_blocks", "gate_up_scales", "gate_up_bias",
                                  "down_blocks", "down_scales", "down_bias"))
    tokens = x.shape[0]
    bytes_moved = used * per_expert + 2 * x.numel() * x.element_size()
    flops = 2.0 * tokens * s.top_k * (s.d_model * 2 * s.d_ff + s.d_ff * s.d_model)
    return bytes_moved, flops


def bench_moe(s: Shapes, device: torch.device, token_counts: list[int],
              check_counts: list[int]) -> tuple[list[Row], bool]:
    w = random_moe_weights(s, device)
    ok = True
    for tokens in check_counts:
        x = torch.randn(tokens, s.d_model, device=device).to(torch.bfloat16)
        ok &= check(f"moe_mxfp4 T={tokens}", moe_mxfp4(x, **w, top_k=s.top_k).float(),
                    moe_mxfp4_reference(x, **w, top_k=s.top_k))
    rows = []
    for tokens in token_counts:
        x = torch.randn(tokens, s.d_model, device=device).to(torch.bfloat16)
        bytes_moved, flops = moe_floor(s, w, x)
        rows.append(row("moe_mxfp4", f"T={tokens}", lambda x=x: moe_mxfp4(x, **w, top_k=s.top_k),
                        device, bytes_moved, flops))
    return rows, ok


# ----------------------------------------------------------------------------- attention

def paged_batch(s: Shapes, device: torch.device, context: int, num_seqs: int, num_new: int,
                window: int | None) -> tuple:
    """num_seqs sequences of `context` tokens, the last num_new of them new this step.
    Physical blocks shuffled; with a window, entries in front of it are -1."""
    gen = torch.Generator(device=device).manual_seed(context + num_seqs)
    blocks_per_seq = -(-context // s.block_size)
    num_blocks = num_seqs * blocks_per_seq
    shape = (num_blocks, s.block_size, s.num_kv_heads, s.head_dim)
    key_cache = torch.randn(shape, generator=gen, device=device).to(torch.bfloat16)
    value_cache = torch.randn(shape, generator=gen, device=device).to(torch.bfloat16)
    perm = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32)
    block_tables = perm.view(num_seqs, blocks_per_seq).clone()
    if window is not None:
        released = max(context - num_new - window + 1, 0) // s.block_size
        block_tables[:, :released] = -1
    seq_lens = torch.full((num_seqs,), context, dtype=torch.int32, device=device)
    query_start_loc = torch.arange(num_seqs + 1, dtype=torch.int32, device=device) * num_new
    q = torch.randn(num_seqs * num_new, s.num_heads, s.head_dim, generator=gen,
                    device=device).to(torch.bfloat16)
    sinks = torch.randn(s.num_heads, generator=gen, device=device)
    return (q, key_cache, value_cache, block_tables, seq_lens, query_start_loc, sinks,
            s.head_dim ** -0.5, window)


def attention_cost(s: Shapes, context: int, num_seqs: int, num_new: int,
                   window: int | None) -> tuple[float, float]:
    """(bytes, FLOPs): visible keys/values read once per sequence, q read, out written."""
    positions = range(context - num_new, context)
    visible = [p + 1 if window is None else min(p + 1, window) for p in positions]
    first = context - num_new
    keys_read = context if window is None else context - max(first - window + 1, 0)
    kv_bytes = num_seqs * keys_read * s.num_kv_heads * s.head_dim * 2 * 2
    qo_bytes = 2 * num_seqs * num_new * s.num_heads * s.head_dim * 2
    flops = num_seqs * 4.0 * s.num_heads * s.head_dim * sum(visible)
    return kv_bytes + qo_bytes, flops


def bench_attention(s: Shapes, device: torch.device,
                    cases: list[tuple[str, int, int, int, int | None]]) -> tuple[list[Row], bool]:
    ok, rows = True, []
    for name, context, num_seqs, num_new, window in cases:
        args = paged_batch(s, device, context, num_seqs, num_new, window)
        ok &= check(f"paged_attention {name}", paged_attention(*args).float(),
                    paged_attention_reference(*args))
        rows.append(row("paged_attention", name, lambda args=args: paged_attention(*args),
                        device, *attention_cost(s, context, num_seqs, num_new, window)))
    # write_kv: one decode step of 64 sequences, exact copy.
    q, key_cache, value_cache = args[0], args[1], args[2]
    tokens = min(64, q.shape[0])
    key = torch.randn(tokens, s.num_kv_heads, s.head_dim, device=device).to(torch.bfloat16)
    slots = torch.randperm(key_cache.shape[0] * s.block_size, device=device)[:tokens]
    write_kv(key, key, key_cache, value_cache, slots)
    flat = key_cache.view(-1, s.num_kv_heads, s.head_dim)
    exact = torch.equal(flat[slots], key)
    print(f"check {'write_kv exact copy':<44} {'ok' if exact else 'FAIL'}")
    return rows, ok and exact


# ----------------------------------------------------------------------------- rmsnorm

def bench_rmsnorm(s: Shapes, device: torch.device, token_counts: list[int]) -> tuple[list[Row],
                                                                                     bool]:
    ok, rows = True, []
    weight = (1 + 0.1 * torch.randn(s.d_model, device=device)).to(torch.bfloat16)
    for tokens in token_counts:
        x = torch.randn(tokens, s.d_model, device=device).to(torch.bfloat16)
        residual = torch.randn(tokens, s.d_model, device=device).to(torch.bfloat16)
        y, _ = rmsnorm(x, weight, 1e-5, residual)
        ok &= check(f"rmsnorm+residual T={tokens}", y.float(),
                    rmsnorm_reference(x, weight, 1e-5, residual)[0])
        rows.append(row("rmsnorm+residual", f"T={tokens}",
                        lambda x=x, r=residual: rmsnorm(x, weight, 1e-5, r), device,
                        4.0 * x.numel() * 2, 0.0))
    return rows, ok


def bench_gemv(s: Shapes, device: torch.device, vocab: int) -> tuple[list[Row], bool]:
    """One-token projections of a decode step: q/k/v, o_proj and lm_head (no bias)."""
    ok, rows = True, []
    q_width = s.num_heads * s.head_dim
    cases = (("q/k/v", q_width + 2 * s.num_kv_heads * s.head_dim, s.d_model, True),
             ("o_proj", s.d_model, q_width, True), ("lm_head", vocab, s.d_model, False))
    for name, num_out, width, has_bias in cases:
        weight = (torch.randn(num_out, width, device=device) * width ** -0.5).to(torch.bfloat16)
        bias = torch.randn(num_out, device=device).to(torch.bfloat16) if has_bias else None
        x = torch.randn(1, width, device=device).to(torch.bfloat16)
        ok &= check(f"gemv {name}", gemv(x, weight, bias).float(),
                    gemv_reference(x, weight, bias))
        rows.append(row("gemv", f"{name} {num_out}x{width}",
                        lambda x=x, w=weight, b=bias: gemv(x, w, b), device,
                        weight.numel() * 2.0, 2.0 * weight.numel()))
    return rows, ok


# ----------------------------------------------------------------------------- tile sweep

def _moe_candidates(tokens: int) -> list[MoETiling]:
    if tokens <= 64:
        return [MoETiling(16, bn, bk, warps) for bn in (16, 32, 64) for bk in (128, 256, 512)
                for warps in (4, 8)]
    if tokens <= 256:
        return [MoETiling(bm, bn, bk) for bm in (16, 32, 64) for bn in (64, 128)
                for bk in (64, 128)]
    return [MoETiling(bm, bn, bk, warps) for bm in (64, 128) for bn in (64, 128)
            for bk in (64, 128) for warps in (4, 8)]


def _print_best(name: str, timed: list[tuple[float, object]]) -> None:
    timed.sort(key=lambda pair: pair[0])
    print(f"sweep {name}: " + "; ".join(f"{t:.1f}us {c}" for t, c in timed[:3]))


def sweep(s: Shapes, device: torch.device, context: int, prompt: int, moe_tokens: list[int],
          attention: bool) -> bool:
    """Graph-replay time of each candidate tiling (each one checked first); best three."""
    ok = True
    w = random_moe_weights(s, device)
    for tokens in moe_tokens:
        x = torch.randn(tokens, s.d_model, device=device).to(torch.bfloat16)
        expected = moe_mxfp4_reference(x, **w, top_k=s.top_k)
        timed = []
        for tiling in _moe_candidates(tokens):
            run = functools.partial(moe_mxfp4, x, **w, top_k=s.top_k, tiling=tiling)
            max_err, rms_err = errors(run().float(), expected)
            if not (max_err < BF16_MAX_ERR and rms_err < BF16_RMS_ERR):
                print(f"FAIL moe T={tokens} {tiling}: {max_err:.2e} {rms_err:.2e}")
                ok = False
            timed.append((graph_median_us(run, device), tiling))
        _print_best(f"moe T={tokens}", timed)
    for name, ctx, num_seqs, num_new, window, candidates in () if not attention else (
        ("decode B=1 full", context, 1, 1, None,
         [AttentionTiling(16, bn, sp) for bn in (32, 64, 128) for sp in (4, 8, 16, 32)]),
        ("decode B=64 full", context, 64, 1, None,
         [AttentionTiling(16, bn, sp, wp) for bn in (32, 64, 128) for sp in (1, 2)
          for wp in (2, 4)]),
        ("prefill full", prompt, 1, prompt, None,
         [AttentionTiling(bm, bn, 1, wp) for bm in (64, 128) for bn in (32, 64, 128)
          for wp in (4, 8)]),
        ("prefill window", prompt, 1, prompt, s.window,
         [AttentionTiling(bm, bn, 1, wp) for bm in (64, 128) for bn in (32, 64)
          for wp in (4, 8)]),
    ):
        args = paged_batch(s, device, ctx, num_seqs, num_new, window)
        expected = paged_attention_reference(*args)
        timed = []
        for tiling in candidates:
            run = functools.partial(paged_attention, *args, tiling=tiling)
            max_err, rms_err = errors(run().float(), expected)
            if not (max_err < BF16_MAX_ERR and rms_err < BF16_RMS_ERR):
                print(f"FAIL attention {name} {tiling}: {max_err:.2e} {rms_err:.2e}")
                ok = False
            timed.append((graph_median_us(run, device), tiling))
        _print_best(name, timed)
    return ok


def profile_moe(s: Shapes, device: torch.device, tokens: int) -> None:
    """Per-kernel device times of one MoE call (routing, grouping, GEMMs, combine)."""
    w = random_moe_weights(s, device)
    x = torch.randn(tokens, s.d_model, device=device).to(torch.bfloat16)
    for _ in range(3):
        moe_mxfp4(x, **w, top_k=s.top_k)
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(10):
            moe_mxfp4(x, **w, top_k=s.top_k)
        torch.cuda.synchronize()
    print(f"profile moe T={tokens} (10 calls)")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14,
                                    max_name_column_width=50))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes through the CPU interpreter (checks the script)")
    parser.add_argument("--sweep", action="store_true",
                        help="also try candidate tilings (GPU) and profile the MoE")
    parser.add_argument("--sweep-moe-tokens", default="1,8,64,256,2048",
                        help="token counts of the MoE sweep, comma-separated")
    parser.add_argument("--sweep-skip-attention", action="store_true")
    options = parser.parse_args()
    smoke = options.smoke
    device = torch.device("cpu" if smoke else "cuda")
    s = SMOKE if smoke else GPT_OSS_20B
    if options.sweep:
        if not smoke:
            for tokens in (1, 2048):
                profile_moe(s, device, tokens)
        moe_tokens = [int(t) for t in options.sweep_moe_tokens.split(",")]
        if not sweep(s, device, context=24 if smoke else 1024, prompt=20 if smoke else 2048,
                     moe_tokens=moe_tokens, attention=not options.sweep_skip_attention):
            print("SOME SWEEP CHECKS FAILED")
    if smoke:
        moe_tokens, moe_checks, norm_tokens = [1, 8], [3], [4]
        attention_cases = [("decode B=2 ctx=24 full", 24, 2, 1, None),
                           ("decode B=2 ctx=24 window", 24, 2, 1, s.window),
                           ("prefill 20", 20, 1, 20, None)]
    else:
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
        moe_tokens, moe_checks, norm_tokens = [1, 4, 8, 64, 256, 2048], [1, 4, 64, 256], [1, 2048]
        attention_cases = [
            ("decode B=1 ctx=1k full", 1024, 1, 1, None),
            ("decode B=1 ctx=1k window128", 1024, 1, 1, s.window),
            ("decode B=64 ctx=1k full", 1024, 64, 1, None),
            ("decode B=64 ctx=1k window128", 1024, 64, 1, s.window),
            ("prefill 2k full", 2048, 1, 2048, None),
            ("prefill 2k window128", 2048, 1, 2048, s.window),
        ]
    rows, ok = [], True
    for part, args in ((bench_moe, (moe_tokens, moe_checks)),
                       (bench_attention, (attention_cases,)), (bench_rmsnorm, (norm_tokens,)),
                       (bench_gemv, (512 if smoke else 201088,))):
        part_rows, part_ok = part(s, device, *args)
        rows += part_rows
        ok &= part_ok

    print(f"\n{'kernel':<17} {'case':<29} {'time us':>9} {'graph us':>9} {'floor us':>9} "
          f"{'bound':>8} {'ratio':>6} {'graph':>6}")
    for r in rows:
        print(f"{r.kernel:<17} {r.case:<29} {r.time_us:9.1f} {r.graph_us:9.1f} "
              f"{r.floor_us:9.1f} {r.bound:>8} {r.ratio:6.1%} {r.floor_us / r.graph_us:6.1%}")
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_kernels.json"), "w") as f:
            json.dump({"device": "cpu" if smoke else torch.cuda.get_device_name(),
                       "checks_passed": ok,
                       "rows": [asdict(r) | {"ratio": r.ratio} for r in rows]}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
