"""One rank of tests/test_expert_parallel_moe.py, run in a spawned process.

Started through `runpy.run_path` on this file (the child needs nothing of tests/
importable): the parent passes RANK_ARGS (store address, rank, world size, case
directory) and RUN_NAME. For every case in cases.json the rank reads its experts' rows of
the case's weights file, runs the expert-parallel MoE on the case's tokens and writes its
output to out-<case>-<rank>.safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tandem.workers.expert_parallel.dispatch import make_dispatcher
from tandem.workers.expert_parallel.group import join_group, leave_group
from tandem.workers.expert_parallel.moe_backend import ExpertParallelMoE
from tandem.workers.expert_parallel.placement import ExpertPlacement
from tandem.workers.model.moe import MoEWeights, TorchMoE

RUN_NAME = "tandem_ep_moe_rank"
EXPERT_TENSORS = ("gate_up_blocks", "gate_up_scales", "gate_up_bias", "down_blocks",
                  "down_scales", "down_bias")


def rank_main(address: str, rank: int, world: int, case_dir: str) -> None:
    join_group(address, rank, world, torch.device("cpu"), timeout_s=60.0)
    try:
        root = Path(case_dir)
        for case in json.loads((root / "cases.json").read_text()):
            placement = ExpertPlacement(case["num_experts"], world, case["policy"])
            held = list(placement.experts_of(rank))
            tensors = {}
            with safe_open(str(root / case["weights"]), framework="pt") as f:
                for name in ("router_weight", "router_bias", "x"):
                    tensors[name] = f.get_tensor(name)
                for name in EXPERT_TENSORS:
                    view = f.get_slice(name)
                    # One lazy read per held expert; a rank may hold none.
                    rows = [view[e : e + 1] for e in held]
                    tensors[name] = torch.cat(rows) if rows else view[0:0]
            x = tensors.pop("x")
            weights = MoEWeights(**tensors)
            moe = ExpertParallelMoE(TorchMoE(), make_dispatcher(case["dispatch"], placement, rank))
            out = moe.forward(x, weights, case["top_k"], case["swiglu_limit"])
            path = root / f"out-{case['name']}-{rank}.safetensors"
            save_file({"out": out.contiguous()}, str(path))
    finally:
        leave_group()


if __name__ == RUN_NAME:
    rank_main(**RANK_ARGS)  # noqa: F821 - injected by runpy.run_path's init_globals
