"""The MoE grouped GEMMs' tilings at serving sizes, each GEMM timed apart.

    python3 bench/gpu_moe_sweep.py                  # on a CUDA machine; writes $OUT/moe_sweep.json
    python3 bench/gpu_moe_sweep.py --tokens 512,256 --budget-s 150 --write-tilings t.json
    python3 bench/serving.py --moe-tilings t.json   # the serving benchmark with them

For each batch size T (decode batches 256 and 512; 8192 is a prompt chunk): the two grouped
GEMMs (gate/up + SwiGLU, down) timed apart per tiling (medians of `triton.testing.do_bench`,
gpt-oss-20b shape, random MXFP4 weights and routing), within a time budget shared over the
sizes. The best pair sharing block_m (the grouping's padding is shared) is then checked
against the fp32 reference and timed as a whole MoE call in CUDA-graph replays against
today's default tiling.
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
import triton.testing

from tandem.kernels.moe import (
    MoETiling,
    default_tiling,
    down_grouped,
    gate_up_grouped,
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


# ----------------------------------------------------------------------------- sweep


def _inputs(tokens: int, w: dict, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, SHAPES.d_model, generator=gen, device="cuda").to(torch.bfloat16)
    weights, experts = route(x, w["router_weight"], w["router_bias"], SHAPES.top_k)
    return x, weights, experts


def _gate_up(x, w, groups, act, bn, bk, warps, stages):
    gate_up_grouped(
        x,
        w["gate_up_blocks"],
        w["gate_up_scales"],
        w["gate_up_bias"],
        act,
        groups,
        SHAPES.top_k,
        7.0,
        1.702,
        bn,
        bk,
        warps,
        stages,
    )


def _down(act, w, groups, route_w, y, bn, bk, warps, stages):
    down_grouped(
        act,
        w["down_blocks"],
        w["down_scales"],
        w["down_bias"],
        route_w,
        y,
        groups,
        bn,
        bk,
        warps,
        stages,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    sweep(result, [int(t) for t in args.tokens.split(",")], start + args.budget_s)
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
    print(f"total {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
