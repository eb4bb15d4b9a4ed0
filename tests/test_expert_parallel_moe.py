"""Expert-parallel MoE on real gloo groups of 2 and 3 spawned ranks, against the
one-process TorchMoE: both dispatchers, uneven splits, a rank without experts, both
placements, 0, 1 and many tokens. Plus the placement arithmetic."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import runpy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tandem.workers.expert_parallel.group import host_rendezvous
from tandem.workers.expert_parallel.placement import ExpertPlacement
from tandem.workers.model.moe import MoEWeights, TorchMoE
from tests.support import ep_moe_rank

D_MODEL, D_FF = 64, 32
JOIN_TIMEOUT_S = 120.0


# ------------------------------------------------------------------------- placement


@pytest.mark.parametrize(
    ("num_experts", "world", "policy", "expected"),
    [
        (5, 2, "contiguous", [(0, 1, 2), (3, 4)]),
        (5, 2, "round_robin", [(0, 2, 4), (1, 3)]),
        (8, 3, "contiguous", [(0, 1, 2), (3, 4, 5), (6, 7)]),
        (8, 3, "round_robin", [(0, 3, 6), (1, 4, 7), (2, 5)]),
        (2, 3, "contiguous", [(0,), (1,), ()]),
        (4, 1, "round_robin", [(0, 1, 2, 3)]),
    ],
)
def test_placement_assigns_every_expert_once(num_experts, world, policy, expected):
    placement = ExpertPlacement(num_experts, world, policy)
    assert [placement.experts_of(r) for r in range(world)] == expected
    local = placement.local_index_table().tolist()
    owners = placement.owner_table().tolist()
    for rank, held in enumerate(expected):
        for i, e in enumerate(held):
            assert owners[e] == rank and local[e] == i


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_experts": 0, "world_size": 2}, "num_experts"),
        ({"num_experts": 4, "world_size": 0}, "world_size"),
        ({"num_experts": 4, "world_size": 2, "policy": "random"}, "policy"),
    ],
)
def test_placement_rejects_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ExpertPlacement(**kwargs)


# ---------------------------------------------------------------------- gloo groups


def _weights(num_experts: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    e, d, i = num_experts, D_MODEL, D_FF
    return {
        "router_weight": torch.randn(e, d, generator=gen) / math.sqrt(d),
        "router_bias": torch.randn(e, generator=gen),
        "gate_up_blocks": torch.randint(0, 256, (e, 2 * i, d // 32, 16), generator=gen,
                                        dtype=torch.uint8),
        "gate_up_scales": torch.randint(120, 125, (e, 2 * i, d // 32), generator=gen,
                                        dtype=torch.uint8),
        "gate_up_bias": 3.0 * torch.randn(e, 2 * i, generator=gen),
        "down_blocks": torch.randint(0, 256, (e, d, i // 32, 16), generator=gen,
                                     dtype=torch.uint8),
        "down_scales": torch.randint(120, 125, (e, d, i // 32), generator=gen,
                                     dtype=torch.uint8),
        "down_bias": torch.randn(e, d, generator=gen),
    }


LAYERS = [  # (experts, top_k, policy): uneven splits, and 2 experts on 3 ranks (one idle)
    (5, 2, "contiguous"),
    (5, 2, "round_robin"),
    (8, 3, "round_robin"),
    (2, 1, "contiguous"),
]
TOKEN_COUNTS = (0, 1, 37)


def _write_cases(root) -> list[dict]:
    cases = []
    for n, (num_experts, top_k, policy) in enumerate(LAYERS):
        for tokens in TOKEN_COUNTS:
            tensors = _weights(num_experts, seed=10 * n + tokens)
            gen = torch.Generator().manual_seed(n + 1000 * tokens)
            tensors["x"] = torch.randn(tokens, D_MODEL, generator=gen)
            file = f"w-{n}-{tokens}.safetensors"
            save_file(tensors, str(root / file))
            for dispatch in ("replicated", "all_to_all"):
                cases.append({
                    "name": f"{n}-{tokens}-{dispatch}", "weights": file, "num_experts":
                    num_experts, "top_k": top_k, "policy": policy, "dispatch": dispatch,
                    "swiglu_limit": 7.0, "tokens": tokens,
                })
    (root / "cases.json").write_text(json.dumps(cases))
    return cases


def _run_ranks(root, world: int) -> None:
    store, address = host_rendezvous(timeout_s=60.0)
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(
            target=runpy.run_path,
            args=(ep_moe_rank.__file__,),
            kwargs={
                "init_globals": {"RANK_ARGS": {"address": address, "rank": rank,
                                               "world": world, "case_dir": str(root)}},
                "run_name": ep_moe_rank.RUN_NAME,
            },
            daemon=True,
        )
        for rank in range(world)
    ]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(JOIN_TIMEOUT_S)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        del store


@pytest.mark.parametrize("world", [2, 3])
def test_expert_parallel_moe_equals_one_process(tmp_path, world):
    cases = _write_cases(tmp_path)
    _run_ranks(tmp_path, world)
    for case in cases:
        with safe_open(str(tmp_path / case["weights"]), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        x = tensors.pop("x")
        expected = TorchMoE().forward(x, MoEWeights(**tensors), case["top_k"], 7.0)  # [T, d]
        outs = []
        for rank in range(world):
            with safe_open(str(tmp_path / f"out-{case['name']}-{rank}.safetensors"), "pt") as f:
                outs.append(f.get_tensor("out"))
        for rank, out in enumerate(outs):
            assert out.shape == (case["tokens"], D_MODEL), (case["name"], rank)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5,
                                       msg=f"case {case['name']} rank {rank}")
            # Every rank ends with the same output (the next layer runs replicated).
            assert torch.equal(out, outs[0]), (case["name"], rank)
