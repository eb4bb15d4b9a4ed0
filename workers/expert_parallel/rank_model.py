"""One rank's model: its experts' shard of the checkpoint behind an ExpertParallelMoE.
Rank 0 and the followers build it the same way, so their layers issue the same
collectives."""

from __future__ import annotations

from pathlib import Path

import torch

from tandem.workers.expert_parallel.config import ExpertParallelConfig
from tandem.workers.expert_parallel.dispatch import make_dispatcher
from tandem.workers.expert_parallel.moe_backend import ExpertParallelMoE
from tandem.workers.expert_parallel.placement import ExpertPlacement
from tandem.workers.model.config import GptOssConfig
from tandem.workers.model.gpt_oss import GptOssModel
from tandem.workers.model.triton_backends import make_backends
from tandem.workers.model.weights import load_model, resolve_checkpoint


def load_rank_model(
    model_dir: str | Path,
    ep: ExpertParallelConfig,
    rank: int,
    device: torch.device,
    dtype: torch.dtype,
    kernels: str | None,
) -> tuple[GptOssModel, GptOssConfig]:
    """The model with rank `rank`'s experts only; the group must already be joined."""
    _, config = resolve_checkpoint(model_dir)
    placement = ExpertPlacement(config.num_local_experts, ep.size, ep.placement)
    attention, inner = make_backends(kernels, device)
    moe = ExpertParallelMoE(inner, make_dispatcher(ep.dispatch, placement, rank))
    return load_model(
        model_dir,
        dtype=dtype,
        device=device,
        attention=attention,
        moe=moe,
        expert_ids=placement.experts_of(rank),
    )


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank i of a CUDA worker uses GPU i (of the devices the process sees); CPU: cpu."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def expert_nbytes(model: GptOssModel) -> int:
    """Bytes of the expert tensors (MXFP4 blocks, scales, biases) `model` holds, all layers."""
    tensors = [p for layer in model.layers for p in layer.mlp.experts.parameters()]
    return sum(p.numel() * p.element_size() for p in tensors)
