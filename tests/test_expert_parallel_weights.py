"""Sharded expert loading: a rank's model holds only its experts' rows, read from the
checkpoint (HF single file, HF sharded with an index, OpenAI original/), equal to the
same rows of the whole-model load; the router stays whole."""

from __future__ import annotations

import pytest
import torch

from tandem.workers.expert_parallel.placement import ExpertPlacement
from tandem.workers.model.config import CheckpointError
from tandem.workers.model.weights import load_model
from tandem.workers.synthetic.checkpoint_writer import tiny_config, write_random_checkpoint

EXPERT_PARAMS = ("gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias",
                 "down_proj_blocks", "down_proj_scales", "down_proj_bias")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """5 experts (uneven on 2 and 3 ranks), in three layouts."""
    root = tmp_path_factory.mktemp("ep-weights")
    config = tiny_config(num_local_experts=5, num_experts_per_tok=2)
    return {
        "hf": write_random_checkpoint(root / "hf", config, seed=11),
        "hf_sharded": write_random_checkpoint(root / "sharded", config, seed=11, num_shards=3),
        "original": write_random_checkpoint(root / "orig", config, seed=11, layout="original"),
    }


@pytest.mark.parametrize("layout", ["hf", "hf_sharded", "original"])
@pytest.mark.parametrize(("world", "policy"), [(2, "contiguous"), (2, "round_robin"),
                                               (3, "round_robin"), (6, "contiguous")])
def test_rank_loads_only_its_experts(checkpoints, layout, world, policy):
    full, config = load_model(checkpoints[layout])
    placement = ExpertPlacement(config.num_local_experts, world, policy)
    total = 0
    for rank in range(world):
        held = placement.experts_of(rank)
        part, _ = load_model(checkpoints[layout], expert_ids=held)
        assert part.expert_ids == held
        for whole, mine in zip(full.layers, part.layers, strict=True):
            for name in EXPERT_PARAMS:
                got = getattr(mine.mlp.experts, name)
                # The rank's memory holds exactly its experts' rows.
                assert got.shape[0] == len(held), name
                assert torch.equal(got, getattr(whole.mlp.experts, name)[list(held)]), name
            assert torch.equal(mine.mlp.router.weight, whole.mlp.router.weight)
        total += len(held)
    assert total == config.num_local_experts


def test_expert_ids_are_validated(checkpoints):
    with pytest.raises(ValueError, match="expert_ids"):
        load_model(checkpoints["hf"], expert_ids=(3, 1))
    with pytest.raises(ValueError, match="expert_ids"):
        load_model(checkpoints["hf"], expert_ids=(0, 5))


def test_nan_scale_in_a_held_expert_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    config = tiny_config(num_local_experts=5, num_experts_per_tok=2)
    path = write_random_checkpoint(tmp_path, config, seed=3)
    tensors = load_file(str(path / "model.safetensors"))
    name = "model.layers.1.mlp.experts.down_proj_scales"
    tensors[name][4, 0, 0] = 255
    save_file(tensors, str(path / "model.safetensors"))
    load_model(path, expert_ids=(0, 1, 2))  # the poisoned expert is not read
    with pytest.raises(CheckpointError, match=name):
        load_model(path, expert_ids=(3, 4))
