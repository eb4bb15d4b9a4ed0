"""Expert-parallel MoE: dispatch/combine per layer against the bare collective, and
correctness against the one-process MoE layer.

    python3 bench/ep.py --smoke                 # CPU, gloo, 2 ranks, small shape: a check
    python3 bench/ep.py --ranks 2 --shape 120b  # one rank per GPU, NCCL (issue 18)

One process per rank (spawned), joined in one group exactly as a worker's ranks are
(tandem.workers.expert_parallel.group: gloo on CPU, NCCL on CUDA, NVLink multicast off).
Every rank builds the same random MoE layer (expert e's weights seeded by e, so a rank
can make only its own) and holds its experts under the chosen placement. Per token count T:

  check       rank 0 also builds the whole layer and runs the one-process backend; every
              rank's EP output must match it (fp32: 1e-4 normalised max error; bf16: 2e-2)
  moe         the whole EP layer: router, dispatch, local experts, combine
  dispatch    dispatcher.run with a no-op expert compute: the data movement alone
  bare        the collective it stands against at the same size: one all-reduce of
              [T, d] fp32 (replicated), one all-to-all of T k rows of d in x's dtype split
              evenly (all_to_all)
  ratio       dispatch / bare (issue 18's target: <= 2)

Each timing is the median over --iters of the slowest rank's time (all ranks start
together after a barrier; CUDA synchronised). Also measured in the same run: the
all-reduce bus bandwidth at --bw-mib. Writes $OUT/ep.json (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

for _name, _value in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ[_name] = _value  # inherited by the spawned ranks

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tandem.workers.expert_parallel.dispatch import DISPATCH_NAMES, make_dispatcher  # noqa: E402
from tandem.workers.expert_parallel.group import (  # noqa: E402
    host_rendezvous,
    join_group,
    leave_group,
)
from tandem.workers.expert_parallel.moe_backend import ExpertParallelMoE  # noqa: E402
from tandem.workers.expert_parallel.placement import ExpertPlacement  # noqa: E402
from tandem.workers.model.moe import MoEWeights  # noqa: E402
from tandem.workers.model.triton_backends import make_backends  # noqa: E402

SHAPES = {  # experts, top_k, d_model, d_ff
    "smoke": (8, 3, 128, 128),  # top-3: the EP sums run in another order than one process's
    "20b": (32, 4, 2880, 2880),
    "120b": (128, 4, 2880, 2880),
}
SWIGLU_LIMIT = 7.0


def expert_tensors(e: int, d: int, i: int, dtype: torch.dtype) -> dict:
    """Expert e's packed weights and biases, the same on every rank (seeded by e)."""
    gen = torch.Generator().manual_seed(1000 + e)
    return {
        "gate_up_blocks": torch.randint(0, 256, (2 * i, d // 32, 16), generator=gen,
                                        dtype=torch.uint8),
        "gate_up_scales": torch.randint(118, 123, (2 * i, d // 32), generator=gen,
                                        dtype=torch.uint8),
        "gate_up_bias": torch.randn(2 * i, generator=gen).to(dtype),
        "down_blocks": torch.randint(0, 256, (d, i // 32, 16), generator=gen, dtype=torch.uint8),
        "down_scales": torch.randint(118, 123, (d, i // 32), generator=gen, dtype=torch.uint8),
        "down_bias": torch.randn(d, generator=gen).to(dtype),
    }


def layer(experts: list[int], num_experts: int, d: int, i: int, dtype, device) -> MoEWeights:
    """MoEWeights holding `experts` (the router always covers all of them)."""
    gen = torch.Generator().manual_seed(7)
    router_w = (torch.randn(num_experts, d, generator=gen) / math.sqrt(d)).to(dtype)
    router_b = torch.randn(num_experts, generator=gen).to(dtype)
    parts = [expert_tensors(e, d, i, dtype) for e in experts]
    names = ("gate_up_blocks", "gate_up_scales", "gate_up_bias", "down_blocks", "down_scales",
             "down_bias")
    stacked = {}
    for name in names:
        if parts:
            stacked[name] = torch.stack([p[name] for p in parts]).to(device)
        else:  # a rank without experts (E < N)
            like = expert_tensors(0, d, i, dtype)[name]
            stacked[name] = like.new_empty((0, *like.shape)).to(device)
    return MoEWeights(router_weight=router_w.to(device), router_bias=router_b.to(device),
                      **stacked)


def timed(iters: int, device: torch.device, fn, *args) -> float:
    """Median over iters of the slowest rank's seconds for fn(*args)."""
    fn(*args)  # warm-up (Triton compiles, NCCL connects)
    times = []
    for _ in range(iters):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = torch.tensor([time.perf_counter() - begin], dtype=torch.float64)
        elapsed = elapsed.to(device) if device.type == "cuda" else elapsed
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed.item()))
    # The median: on a shared host the tail is other processes' scheduling, not ours.
    return statistics.median(times)


def rank_main(rank: int, world: int, address: str, opts: dict, result_path: str) -> None:
    device = torch.device("cuda", rank) if opts["device"] == "cuda" else torch.device("cpu")
    if device.type == "cpu":
        # N ranks share the host's cores: without this their OpenMP pools oversubscribe it.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    join_group(address, rank, world, device, timeout_s=300.0)
    try:
        rows = run_rank(rank, world, device, opts)
        if rank == 0:
            Path(result_path).write_text(json.dumps(rows))
    finally:
        leave_group()


def run_rank(rank: int, world: int, device: torch.device, opts: dict) -> dict:
    num_experts, top_k, d, i = SHAPES[opts["shape"]]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    _, inner = make_backends(None, device)
    placement = ExpertPlacement(num_experts, world, opts["placement"])
    mine = layer(list(placement.experts_of(rank)), num_experts, d, i, dtype, device)
    whole = layer(list(range(num_experts)), num_experts, d, i, dtype, device) if rank == 0 else None
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    out: dict = {"shape": opts["shape"], "ranks": world, "device": device.type,
                 "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                 "placement": opts["placement"], "rows": [], "checks": []}

    # Link bandwidth: all-reduce bus bandwidth (2 (N-1) / N of the buffer per rank).
    big = torch.ones(opts["bw_mib"] * 2**18, dtype=torch.float32, device=device)
    t_big = timed(max(3, opts["iters"] // 4), device, dist.all_reduce, big)
    out["allreduce_bus_GBps"] = big.numel() * 4 * 2 * (world - 1) / world / t_big / 1e9
    big = None

    for tokens in opts["tokens"]:
        gen = torch.Generator().manual_seed(tokens)
        x = torch.randn(tokens, d, generator=gen).to(dtype).to(device)
        expected = inner.forward(x, whole, top_k, SWIGLU_LIMIT) if whole is not None else None
        for name in DISPATCH_NAMES:
            dispatcher = make_dispatcher(name, placement, rank)
            moe = ExpertParallelMoE(inner, dispatcher)
            got = moe.forward(x, mine, top_k, SWIGLU_LIMIT)
            # Every rank's output must equal rank 0's one-process result.
            ref = expected if expected is not None else torch.empty_like(got)
            dist.broadcast(ref, src=0)
            err = 0.0
            if tokens:
                scale = ref.float().abs().max().clamp(min=1e-6)
                err = float(((got.float() - ref.float()).abs().max() / scale).item())
            if got.shape != ref.shape:
                err = math.inf
            errs = torch.tensor([err], dtype=torch.float64, device=device)
            dist.all_reduce(errs, op=dist.ReduceOp.MAX)
            out["checks"].append({"tokens": tokens, "dispatch": name, "max_err": errs.item(),
                                  "ok": errs.item() <= tol})
            if tokens == 0:
                continue
            experts, weights = torch.topk(torch.randn(tokens, num_experts, generator=gen),
                                          top_k)  # only the counts matter for the timing
            experts, weights = experts.to(device), weights.float().to(device)

            def noop(rows, local, wts):
                return torch.zeros(rows.shape[0], d, dtype=torch.float32, device=device)

            iters = opts["iters"]
            t_moe = timed(iters, device, moe.forward, x, mine, top_k, SWIGLU_LIMIT)
            t_disp = timed(iters, device, dispatcher.run, x, experts, weights, noop)
            if name == "replicated":
                buf = torch.zeros(tokens, d, dtype=torch.float32, device=device)
                t_bare = timed(iters, device, dist.all_reduce, buf)
            else:
                per = -(-tokens * top_k // world)
                src = torch.zeros(per * world, d, dtype=dtype, device=device)
                t_bare = timed(iters, device, dist.all_to_all_single, torch.empty_like(src), src)
            out["rows"].append({"tokens": tokens, "dispatch": name, "moe_us": t_moe * 1e6,
                                "dispatch_us": t_disp * 1e6, "bare_us": t_bare * 1e6,
                                "ratio": t_disp / t_bare})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, gloo, 2 ranks, small shape, few iterations")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--shape", choices=tuple(SHAPES), default="120b")
    parser.add_argument("--placement", choices=("contiguous", "round_robin"),
                        default="round_robin")
    parser.add_argument("--tokens", default="1,8,64,256,2048")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--bw-mib", type=int, default=256)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.smoke:
        args.device, args.shape, args.tokens, args.iters, args.bw_mib = "cpu", "smoke", \
            "0,1,7,64,256", 20, 16
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and torch.cuda.device_count() < args.ranks:
        raise SystemExit(f"bench/ep.py: {args.ranks} ranks need {args.ranks} GPUs, "
                         f"found {torch.cuda.device_count()}")
    opts = {"device": device, "shape": args.shape, "placement": args.placement,
            "tokens": [int(t) for t in args.tokens.split(",")], "iters": args.iters,
            "bw_mib": args.bw_mib}
    out_dir = Path(os.environ.get("OUT", "."))
    result_path = Path(args.out) if args.out else out_dir / "ep.json"
    store, address = host_rendezvous(timeout_s=300.0)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, args.ranks, address, opts, str(result_path)))
             for r in range(args.ranks)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(1800)
    del store
    if any(p.exitcode != 0 for p in procs):
        for p in procs:
            if p.is_alive():
                p.kill()
        raise SystemExit(f"bench/ep.py: a rank failed: exit codes {[p.exitcode for p in procs]}")
    result = json.loads(result_path.read_text())
    result["commit"] = os.popen("git rev-parse --short HEAD 2>/dev/null").read().strip() or None
    result_path.write_text(json.dumps(result, indent=2))
    label = "CPU/gloo" if device == "cpu" else f"{result['gpu']}/NCCL"
    print(f"{label}, {args.ranks} ranks, shape {args.shape}, placement {args.placement}, "
          f"all-reduce bus bandwidth {result['allreduce_bus_GBps']:.2f} GB/s")
    print(f"{'T':>6} {'dispatch':>11} {'moe us':>10} {'disp us':>10} {'bare us':>10} {'ratio':>6}")
    for row in result["rows"]:
        print(f"{row['tokens']:>6} {row['dispatch']:>11} {row['moe_us']:>10.1f} "
              f"{row['dispatch_us']:>10.1f} {row['bare_us']:>10.1f} {row['ratio']:>6.2f}")
    bad = [c for c in result["checks"] if not c["ok"]]
    for c in result["checks"]:
        print(f"check T={c['tokens']} {c['dispatch']}: max normalised error {c['max_err']:.2e}"
              f" {'ok' if c['ok'] else 'FAILED'}")
    print(f"wrote {result_path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
