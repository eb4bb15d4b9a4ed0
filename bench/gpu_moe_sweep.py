"""Where a serving step's time goes, and the MoE grouped GEMMs' tilings at serving sizes.

    python3 bench/gpu_moe_sweep.py                 # on a CUDA machine; writes $OUT/moe_sweep.json
    python3 bench/gpu_moe_sweep.py --parts sweep --budget-s 240

Parts (in this order, each bounded; results saved as each ends):
  profile  device time per kernel of one eager decode step at batch 256 and 512 (context
           1k) and one 8k-token prefill, gpt-oss-20b shape, random weights
  sweep    the two grouped GEMMs (gate/up + SwiGLU, down) timed apart, per tiling, at
           T = 256, 512 (decode batches), 8192 (a prefill chunk): each kernel alone,
           medians of `triton.testing.do_bench`; the whole MoE with the best pair then
           checked against the fp32 reference and timed against today's default
  bf16     large T only: experts dequantised to bf16 once per call, then plain bf16
           grouped GEMMs (the dequantisation included in the time)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl
import triton.testing

from tandem.kernels._moe_triton import (
    _decode_e2m1,
    _down_kernel,
    _gate_up_swiglu_kernel,
    _load_rows,
)
from tandem.kernels.moe import (
    MoETiling,
    _combine,
    default_tiling,
    group_by_expert,
    moe_mxfp4,
    moe_mxfp4_reference,
    route,
)


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(
        f"_bench_{name}", Path(__file__).with_name(f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_kern = _sibling("gpu_kernels")
SHAPES, random_moe_weights, errors = _kern.GPT_OSS_20B, _kern.random_moe_weights, _kern.errors
BF16_MAX_ERR, BF16_RMS_ERR = _kern.BF16_MAX_ERR, _kern.BF16_RMS_ERR


def bench_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median") * 1e3


# ----------------------------------------------------------------------------- profile


def profile(result: dict) -> None:
    e2e = _sibling("gpu_e2e")
    from tandem.workers.model.gpt_oss import GptOssModel
    from tandem.workers.model.triton_backends import TritonMoE, TritonPagedAttention

    plan = e2e.Plan(e2e.GPT_OSS_20B, torch.bfloat16, 16, 1024, (256, 512), (8192,), (), (), 3)
    model = GptOssModel(
        plan.config, plan.dtype, TritonPagedAttention(), TritonMoE(), torch.device("cuda")
    ).eval()
    e2e.fill_random_(model, seed=0)
    work = e2e.Workload(plan)
    runner = e2e.make_runner(model, work, torch.device("cuda"), graphs=False)
    steps = {
        f"decode B={b}": work.decode_step(b, e2e.random_ids(plan.config.vocab_size, b, b))
        for b in plan.decode_batches
    }
    steps["prefill 8192"] = work.prefill_step(e2e.random_ids(plan.config.vocab_size, 8192, 3))
    out = {}
    for name, step in steps.items():
        for _ in range(2):
            runner.execute(step)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            runner.execute(step)
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        total = sum(e.self_device_time_total for e in events)
        rows = [
            (e.key[:80], e.count, e.self_device_time_total / 1e3)
            for e in sorted(events, key=lambda e: -e.self_device_time_total)[:14]
        ]
        out[name] = {"kernels_ms": total / 1e3, "top": rows}
        print(f"profile {name}: {total / 1e3:.2f} ms of kernels", flush=True)
        for key, count, ms in rows:
            print(f"  {ms:8.3f} ms {count:5d}x {key}", flush=True)
    result["profile"] = out
    del runner, model
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- sweep


def _inputs(tokens: int, w: dict, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, SHAPES.d_model, generator=gen, device="cuda").to(torch.bfloat16)
    weights, experts = route(x, w["router_weight"], w["router_bias"], SHAPES.top_k)
    return x, weights, experts


def _gate_up(x, w, groups, act, bn, bk, warps, stages):
    d_ff = SHAPES.d_ff
    grid = (groups.block_expert.numel(), triton.cdiv(d_ff, bn))
    _gate_up_swiglu_kernel[grid](
        x,
        w["gate_up_blocks"],
        w["gate_up_scales"],
        w["gate_up_bias"],
        act,
        groups.pair_ids,
        groups.block_expert,
        groups.num_pairs,
        SHAPES.d_model,
        d_ff,
        w["gate_up_blocks"].stride(1),
        w["gate_up_scales"].stride(1),
        x.stride(0),
        act.stride(0),
        7.0,
        1.702,
        TOP_K=SHAPES.top_k,
        BLOCK_M=groups.block_m,
        BLOCK_N=bn,
        BLOCK_K=bk,
        DOT_FP32=False,
        DOT_PRECISION="tf32",
        SCALED_FORMAT="bf16",
        num_warps=warps,
        num_stages=stages,
    )


def _down(act, w, groups, route_w, y, bn, bk, warps, stages):
    d_model = SHAPES.d_model
    grid = (groups.block_expert.numel(), triton.cdiv(d_model, bn))
    _down_kernel[grid](
        act,
        w["down_blocks"],
        w["down_scales"],
        w["down_bias"],
        route_w,
        y,
        groups.pair_ids,
        groups.block_expert,
        groups.num_pairs,
        d_model,
        SHAPES.d_ff,
        w["down_blocks"].stride(1),
        w["down_scales"].stride(1),
        act.stride(0),
        y.stride(0),
        BLOCK_M=groups.block_m,
        BLOCK_N=bn,
        BLOCK_K=bk,
        DOT_FP32=False,
        DOT_PRECISION="tf32",
        SCALED_FORMAT="bf16",
        num_warps=warps,
        num_stages=stages,
    )


def _candidates(tokens: int):
    """(block_m, block_n, block_k, warps, stages) per kernel, likeliest first (earlier sweeps:
    block_k 64 and 4 warps won at T = 2048; 32-row blocks at T = 256)."""
    if tokens <= 1024:
        bms = (32, 64) if tokens <= 256 else (64, 32, 128)
        rest = ((64, 4, 3), (64, 4, 4), (128, 4, 3), (64, 8, 3))
        gate = [(bm, bn, *r) for bm in bms for bn in (64, 32, 128) for r in rest]
        down = [(bm, bn, *r) for bm in bms for bn in (64, 128, 256) for r in rest]
    else:
        gate = [
            (bm, bn, bk, wa, st)
            for bm in (64, 128)
            for bn in (64, 128)
            for bk in (64, 128)
            for wa, st in ((4, 3), (8, 3), (8, 4))
        ]
        down = [
            (bm, bn, bk, wa, st)
            for bm in (64, 128)
            for bn in (64, 128, 256)
            for bk in (64, 128)
            for wa, st in ((4, 3), (8, 3), (8, 4))
        ]
    return gate, down


def sweep(result: dict, token_counts: list[int], deadline: float) -> None:
    w = random_moe_weights(SHAPES, torch.device("cuda"))
    result.setdefault("sweep", {})
    for n, tokens in enumerate(token_counts):
        # Each T gets an equal share of what is left; gate/up and down half of it each.
        share = max(0.0, deadline - time.monotonic()) / (len(token_counts) - n)
        gate_deadline = time.monotonic() + share / 2
        down_deadline = time.monotonic() + share
        x, route_w, experts = _inputs(tokens, w, tokens)
        route_flat = route_w.reshape(-1).contiguous()
        gate_c, down_c = _candidates(tokens)
        groups_by_bm = {}
        gate_t, down_t = {}, {}
        for cfg in gate_c:
            if time.monotonic() > gate_deadline:
                break
            bm = cfg[0]
            if bm not in groups_by_bm:
                g = group_by_expert(experts, SHAPES.num_experts, bm)
                act = torch.empty(
                    (g.block_expert.numel() * bm, SHAPES.d_ff), dtype=torch.bfloat16, device="cuda"
                )
                groups_by_bm[bm] = (g, act)
            g, act = groups_by_bm[bm]
            try:
                gate_t[cfg] = bench_us(functools.partial(_gate_up, x, w, g, act, *cfg[1:]))
            except Exception as error:  # out of shared memory, say
                print(f"gate {cfg}: {error!r}"[:200], flush=True)
        y = torch.empty((tokens * SHAPES.top_k, SHAPES.d_model), dtype=torch.float32, device="cuda")
        for cfg in down_c:
            if time.monotonic() > down_deadline:
                break
            if cfg[0] not in groups_by_bm:
                continue
            g, act = groups_by_bm[cfg[0]]
            _gate_up(x, w, g, act, 64, 64, 4, 3)
            try:
                down_t[cfg] = bench_us(functools.partial(_down, act, w, g, route_flat, y, *cfg[1:]))
            except Exception as error:
                print(f"down {cfg}: {error!r}"[:200], flush=True)
        row = {
            "gate": sorted(((t, list(c)) for c, t in gate_t.items()))[:8],
            "down": sorted(((t, list(c)) for c, t in down_t.items()))[:8],
        }
        # Best pair sharing block_m (the grouping's padding is shared).
        best = None
        for bm in groups_by_bm:
            gs = [(t, c) for c, t in gate_t.items() if c[0] == bm]
            ds = [(t, c) for c, t in down_t.items() if c[0] == bm]
            if gs and ds:
                pair = (min(gs)[0] + min(ds)[0], min(gs)[1], min(ds)[1])
                best = pair if best is None or pair[0] < best[0] else best
        default = default_tiling(tokens, SHAPES.top_k, SHAPES.num_experts)
        row["default"] = str(default)
        if best is not None:
            _, gcfg, dcfg = best
            tiling = MoETiling(
                block_m=gcfg[0],
                block_n=gcfg[1],
                block_k=gcfg[2],
                num_warps=gcfg[3],
                num_stages=gcfg[4],
                down_block_n=dcfg[1],
                down_block_k=dcfg[2],
                down_num_warps=dcfg[3],
                down_num_stages=dcfg[4],
            )
            row["best"] = str(tiling)
            expected = moe_mxfp4_reference(x, **w, top_k=SHAPES.top_k)
            got = moe_mxfp4(x, **w, top_k=SHAPES.top_k, tiling=tiling).float()
            max_err, rms_err = errors(got, expected)
            row["check"] = {
                "max": max_err,
                "rms": rms_err,
                "ok": max_err < BF16_MAX_ERR and rms_err < BF16_RMS_ERR,
            }
            row["tiling"] = dataclasses.asdict(tiling)
            row["whole_best_us"] = (
                triton.testing.do_bench_cudagraph(
                    functools.partial(moe_mxfp4, x, **w, top_k=SHAPES.top_k, tiling=tiling),
                    rep=100,
                    return_mode="median",
                )
                * 1e3
            )
        row["whole_default_us"] = (
            triton.testing.do_bench_cudagraph(
                functools.partial(moe_mxfp4, x, **w, top_k=SHAPES.top_k),
                rep=100,
                return_mode="median",
            )
            * 1e3
        )
        result["sweep"][str(tokens)] = row
        print(
            f"sweep T={tokens}: default {row['whole_default_us']:.1f} us {default}; best "
            f"{row.get('whole_best_us', math.nan):.1f} us {row.get('best')} "
            f"check {row.get('check')}",
            flush=True,
        )
        print(f"  gate top: {row['gate'][:4]}", flush=True)
        print(f"  down top: {row['down'][:4]}", flush=True)


# ----------------------------------------------------------------------------- bf16 path


@triton.jit
def _dequant_kernel(
    blocks_ptr, scales_ptr, out_ptr, num_rows, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k0 = tl.program_id(1) * BLOCK_K
    rmask = rows < num_rows
    row64 = rows.to(tl.int64)
    byte_offs = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    packed = tl.load(
        blocks_ptr + row64[:, None] * (K // 2) + byte_offs[None, :], mask=rmask[:, None], other=0
    ).to(tl.int32)
    group_offs = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    sb = tl.load(
        scales_ptr + row64[:, None] * (K // 32) + group_offs[None, :], mask=rmask[:, None], other=1
    ).to(tl.int32)
    scale = (tl.maximum(sb - 1, 0) << 23).to(tl.float32, bitcast=True)
    scale = tl.reshape(
        tl.broadcast_to(scale[:, :, None], (BLOCK_R, BLOCK_K // 32, 16)), (BLOCK_R, BLOCK_K // 2)
    )
    even = _decode_e2m1(packed & 15) * scale
    odd = _decode_e2m1(packed >> 4) * scale
    vals = tl.reshape(tl.join(even, odd), (BLOCK_R, BLOCK_K))
    offs = k0 + tl.arange(0, BLOCK_K)
    tl.store(
        out_ptr + row64[:, None] * K + offs[None, :], vals.to(tl.bfloat16), mask=rmask[:, None]
    )


def dequant_bf16(blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
    num_rows = blocks.shape[0] * blocks.shape[1]
    K = blocks.shape[2] * 32
    _dequant_kernel[(triton.cdiv(num_rows, 32), K // 256)](
        blocks, scales, out, num_rows, K, BLOCK_R=32, BLOCK_K=256, num_warps=4
    )


@triton.jit
def _gate_up_bf16_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    act_ptr,
    pair_ids_ptr,
    block_expert_ptr,
    num_pairs,
    d_model,
    d_ff,
    stride_x,
    stride_act,
    swiglu_limit,
    alpha,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(pair_ids_ptr + rows)
    row_valid = pairs < num_pairs
    tokens = (pairs // TOP_K).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < d_ff
    gate_rows = expert.to(tl.int64) * 2 * d_ff + 2 * cols
    up_rows = gate_rows + 1
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d_model, BLOCK_K):
        x_tile = _load_rows(x_ptr, tokens, row_valid, stride_x, k0, d_model, BLOCK_K)
        offs = k0 + tl.arange(0, BLOCK_K)
        g = tl.load(
            w_ptr + gate_rows[:, None] * d_model + offs[None, :], mask=col_valid[:, None], other=0.0
        )
        u = tl.load(
            w_ptr + up_rows[:, None] * d_model + offs[None, :], mask=col_valid[:, None], other=0.0
        )
        acc_gate = tl.dot(x_tile, tl.trans(g), acc_gate)
        acc_up = tl.dot(x_tile, tl.trans(u), acc_up)
    gate = (
        acc_gate + tl.load(bias_ptr + gate_rows, mask=col_valid, other=0.0).to(tl.float32)[None, :]
    )
    up = acc_up + tl.load(bias_ptr + up_rows, mask=col_valid, other=0.0).to(tl.float32)[None, :]
    gate = tl.minimum(gate, swiglu_limit)
    up = tl.minimum(tl.maximum(up, -swiglu_limit), swiglu_limit)
    act = (up + 1.0) * gate * tl.sigmoid(alpha * gate)
    out = act_ptr + rows.to(tl.int64)[:, None] * stride_act + cols[None, :]
    tl.store(out, act.to(act_ptr.dtype.element_ty), mask=col_valid[None, :])


@triton.jit
def _down_bf16_kernel(
    act_ptr,
    w_ptr,
    bias_ptr,
    route_weight_ptr,
    y_ptr,
    pair_ids_ptr,
    block_expert_ptr,
    num_pairs,
    d_model,
    d_ff,
    stride_act,
    stride_y,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(pair_ids_ptr + rows)
    row_valid = pairs < num_pairs
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < d_model
    w_rows = expert.to(tl.int64) * d_model + cols
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d_ff, BLOCK_K):
        a = _load_rows(act_ptr, rows.to(tl.int64), row_valid, stride_act, k0, d_ff, BLOCK_K)
        offs = k0 + tl.arange(0, BLOCK_K)
        wt = tl.load(
            w_ptr + w_rows[:, None] * d_ff + offs[None, :], mask=col_valid[:, None], other=0.0
        )
        acc = tl.dot(a, tl.trans(wt), acc)
    bias = tl.load(bias_ptr + w_rows, mask=col_valid, other=0.0).to(tl.float32)
    route_weight = tl.load(route_weight_ptr + pairs, mask=row_valid, other=0.0)
    y = (acc + bias[None, :]) * route_weight[:, None]
    out = y_ptr + pairs.to(tl.int64)[:, None] * stride_y + cols[None, :]
    tl.store(out, y, mask=row_valid[:, None] & col_valid[None, :])


def moe_bf16(x, w, scratch, cfg_gate, cfg_down, bm):
    """The whole MoE through dequantised experts (timing and check only)."""
    route_w, experts = route(x, w["router_weight"], w["router_bias"], SHAPES.top_k)
    g = group_by_expert(experts, SHAPES.num_experts, bm)
    w1, w2 = scratch
    dequant_bf16(w["gate_up_blocks"], w["gate_up_scales"], w1)
    dequant_bf16(w["down_blocks"], w["down_scales"], w2)
    act = torch.empty((g.block_expert.numel() * bm, SHAPES.d_ff), dtype=x.dtype, device="cuda")
    bn, bk, wa, st = cfg_gate
    _gate_up_bf16_kernel[(g.block_expert.numel(), triton.cdiv(SHAPES.d_ff, bn))](
        x,
        w1,
        w["gate_up_bias"],
        act,
        g.pair_ids,
        g.block_expert,
        g.num_pairs,
        SHAPES.d_model,
        SHAPES.d_ff,
        x.stride(0),
        act.stride(0),
        7.0,
        1.702,
        TOP_K=SHAPES.top_k,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=wa,
        num_stages=st,
    )
    y = torch.empty((g.num_pairs, SHAPES.d_model), dtype=torch.float32, device="cuda")
    bn, bk, wa, st = cfg_down
    _down_bf16_kernel[(g.block_expert.numel(), triton.cdiv(SHAPES.d_model, bn))](
        act,
        w2,
        w["down_bias"],
        route_w.reshape(-1).contiguous(),
        y,
        g.pair_ids,
        g.block_expert,
        g.num_pairs,
        SHAPES.d_model,
        SHAPES.d_ff,
        act.stride(0),
        y.stride(0),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=wa,
        num_stages=st,
    )
    return _combine(y, x, SHAPES.top_k)


def bf16_path(result: dict, token_counts: list[int], deadline: float) -> None:
    w = random_moe_weights(SHAPES, torch.device("cuda"))
    e, d, f = SHAPES.num_experts, SHAPES.d_model, SHAPES.d_ff
    scratch = (
        torch.empty((e, 2 * f, d), dtype=torch.bfloat16, device="cuda"),
        torch.empty((e, d, f), dtype=torch.bfloat16, device="cuda"),
    )
    result.setdefault("bf16", {})
    dq = bench_us(
        lambda: (
            dequant_bf16(w["gate_up_blocks"], w["gate_up_scales"], scratch[0]),
            dequant_bf16(w["down_blocks"], w["down_scales"], scratch[1]),
        )
    )
    print(f"bf16 dequant of one layer's experts: {dq:.1f} us", flush=True)
    result["bf16"]["dequant_us"] = dq
    configs = [
        (bm, (bn, bk, wa, st), (dbn, bk, wa, st))
        for bm in (128,)
        for bn, dbn in ((64, 128), (128, 128), (64, 256))
        for bk in (64,)
        for wa, st in ((4, 3), (8, 3), (8, 4))
    ]
    for tokens in token_counts:
        x, _, _ = _inputs(tokens, w, tokens + 1)
        timed = []
        for bm, cg, cd in configs:
            if time.monotonic() > deadline:
                break
            try:
                timed.append(
                    (bench_us(functools.partial(moe_bf16, x, w, scratch, cg, cd, bm)), bm, cg, cd)
                )
            except Exception as error:
                print(f"bf16 {bm} {cg} {cd}: {error!r}"[:200], flush=True)
        if not timed:
            continue
        timed.sort()
        t, bm, cg, cd = timed[0]
        expected = moe_mxfp4_reference(x, **w, top_k=SHAPES.top_k)
        max_err, rms_err = errors(moe_bf16(x, w, scratch, cg, cd, bm).float(), expected)
        ours = bench_us(functools.partial(moe_mxfp4, x, **w, top_k=SHAPES.top_k))
        result["bf16"][str(tokens)] = {
            "best_us": t,
            "config": [bm, cg, cd],
            "default_mxfp4_us": ours,
            "max_err": max_err,
            "rms_err": rms_err,
            "top": [list(r) for r in timed[:5]],
        }
        print(
            f"bf16 path T={tokens}: {t:.1f} us {bm} {cg} {cd} (err max {max_err:.2e} rms "
            f"{rms_err:.2e}) vs mxfp4 default {ours:.1f} us",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="profile,sweep,bf16")
    parser.add_argument("--tokens", default="512,256,8192")
    parser.add_argument(
        "--budget-s", type=float, default=300.0, help="stop sweeping new tilings after this long"
    )
    parser.add_argument(
        "--write-tilings",
        default=None,
        help="write {T: tiling} of every T whose best pair checked ok and beat "
        "the default (for bench/serving.py --moe-tilings)",
    )
    args = parser.parse_args()
    result: dict = {"device": torch.cuda.get_device_name(), "triton": triton.__version__}
    out = os.environ.get("OUT")

    def save() -> None:
        if out:
            Path(out, "moe_sweep.json").write_text(json.dumps(result, indent=1, default=str))

    start = time.monotonic()
    parts = args.parts.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    if "profile" in parts:
        profile(result)
        save()
    if "sweep" in parts:
        sweep(result, tokens, start + args.budget_s)
        save()
    if args.write_tilings:
        chosen = {
            t: row["tiling"]
            for t, row in result.get("sweep", {}).items()
            if row.get("check", {}).get("ok")
            and "tiling" in row
            and row["whole_best_us"] < row["whole_default_us"]
        }
        Path(args.write_tilings).write_text(json.dumps(chosen, indent=1))
        print(f"tilings written: {chosen}", flush=True)
    if "bf16" in parts:
        bf16_path(result, [t for t in tokens if t >= 2048] or [8192], start + args.budget_s + 60)
        save()
    print(f"total {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
