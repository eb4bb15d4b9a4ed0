"""An engine whose model runs on N expert-parallel ranks: rank 0 is this process's
LLMEngine (it schedules, samples and streams, exactly as with one process); ranks
1..N-1 are follower processes that run every step's forward with it.

    build_engine(model_dir, engine_config, ExpertParallelConfig(size=N))
      N = 1: LLMEngine.from_model_dir, nothing else (today's path, no extra cost)
      N > 1: FollowerSet.start -> rank 0 loads its experts -> followers ready
             -> LLMEngine(..., runner_factory=ExpertParallelRunner)

Attention is replicated: every rank holds the whole attention weights and its own full
KV cache, and writes the same slots (the step carries the block tables). The
alternative, tensor parallelism over the KV heads (8 KV heads split across ranks, an
all-reduce after o_proj), halves the attention weights and the KV cache per rank but
adds a collective per layer; it was not built or measured here: on CPU/gloo the
collective's latency says nothing about NVLink, and the 120b's attention weights (about
1.2 GB in bf16) are small beside its experts, so replication costs little memory. The
GPU run (issue 18) is where the two can be compared.

KV that arrives by transfer (a decode worker's remote prefill) lands in rank 0's cache;
ExpertParallelEngine.complete_remote copies those blocks to the followers before any
step reads them (kv_replica.py says why one copy over the network and a broadcast inside
the node).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tandem.workers.engine.llm_engine import EngineConfig, LLMEngine, ModelFacts, RemoteSlot
from tandem.workers.engine.outputs import RequestOutput
from tandem.workers.engine.runner import ModelRunner
from tandem.workers.engine.sampling_params import SamplingParams
from tandem.workers.engine.scheduler import SchedulerOutput
from tandem.workers.expert_parallel.config import ExpertParallelConfig
from tandem.workers.expert_parallel.leader import ExpertParallelFailure, FollowerSet
from tandem.workers.expert_parallel.placement import ExpertPlacement
from tandem.workers.expert_parallel.rank_model import load_rank_model
from tandem.workers.expert_parallel.step_messages import StepInputs
from tandem.workers.model.gpt_oss import GptOssModel
from tandem.workers.text.tokenizer import Tokenizer

__all__ = [
    "ExpertParallelEngine",
    "ExpertParallelFailure",
    "ExpertParallelRunner",
    "build_engine",
]


class ExpertParallelRunner(ModelRunner):
    """Rank 0's runner: each step is broadcast to the followers, then run here; the MoE
    layers' collectives pair with theirs. No CUDA graphs (the all-to-all reads split sizes
    on the host, and collectives inside a graph need their own capture support)."""

    def __init__(
        self,
        model: GptOssModel,
        blocks_per_group: Sequence[int],
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        followers: FollowerSet,
    ) -> None:
        super().__init__(model, blocks_per_group, block_size, device, dtype, cuda_graph_sizes=())
        self.followers = followers
        followers.send_init(block_size, blocks_per_group)

    def execute(
        self, out: SchedulerOutput, after_layer: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        with self.followers.step(StepInputs.from_scheduled(out.scheduled, self.num_groups)):
            return super().execute(out, after_layer)

    def share_blocks(self, block_ids: Sequence[Sequence[int]]) -> None:
        """Copy blocks block_ids[g] (every layer of KV group g), written into this rank's
        cache outside a step, to the followers' caches."""
        config = self.model.config
        groups = [config.kv_group_of_layer(i) for i in range(config.num_hidden_layers)]
        self.followers.share_blocks(self.kv_caches, groups, block_ids)

    def check_alive(self) -> None:
        self.followers.check_alive()

    def close(self) -> None:
        self.followers.close()


class ExpertParallelEngine(LLMEngine):
    """The engine of an N-rank worker: LLMEngine, plus the remote-prefill hand-off.

    add_remote_request reserves the blocks a KV transfer fills in rank 0's cache;
    complete_remote (the KV arrived) first copies them to every follower, then lets the
    request decode. Nothing else differs from one process.
    """

    runner: ExpertParallelRunner

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._remote_blocks: dict[str, tuple[tuple[int, ...], ...]] = {}
        # request id -> the blocks its transfer fills, per KV group, until complete_remote

    def add_remote_request(
        self, prompt_token_ids: Sequence[int], params: SamplingParams, request_id: str
    ) -> RemoteSlot | None:
        slot = super().add_remote_request(prompt_token_ids, params, request_id)
        running = self.running_ids()
        for gone in [r for r in self._remote_blocks if r not in running]:
            del self._remote_blocks[gone]  # aborted or failed over to a local prefill
        if slot is not None:
            self._remote_blocks[slot.request_id] = slot.dest_block_ids
        return slot

    def complete_remote(self, request_id: str, first_token: int) -> RequestOutput:
        blocks = self._remote_blocks.pop(request_id, None)
        if blocks is not None:
            self.runner.share_blocks(blocks)
        return super().complete_remote(request_id, first_token)


def build_engine(
    model_dir: str | Path,
    engine_config: EngineConfig | None = None,
    ep: ExpertParallelConfig | None = None,
) -> LLMEngine:
    """An LLMEngine over `ep.size` ranks; close it with `engine.runner.close()`."""
    ec = engine_config or EngineConfig()
    ep = ep or ExpertParallelConfig()
    if ep.size == 1:
        return LLMEngine.from_model_dir(model_dir, ec)
    device = torch.device(ec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index not in (None, 0):
        raise ValueError("an expert-parallel worker's rank 0 runs on cuda:0 (rank i on cuda:i)")
    if device.type == "cuda":
        device = torch.device("cuda", 0)
    dtype = getattr(torch, ec.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model_dir = Path(model_dir)
    followers = FollowerSet.start(ep, str(model_dir), device, dtype, ec.kernels)
    try:
        model, config = load_rank_model(model_dir, ep, 0, device, dtype, ec.kernels)
        followers.wait_ready()
        _check_placement(followers, config.num_local_experts, ep)
        tokenizer = Tokenizer.from_dir(model_dir)
        facts = ModelFacts.read(model_dir, config, ec.max_model_len)
        factory = functools.partial(ExpertParallelRunner, followers=followers)
        return ExpertParallelEngine(
            model, config, tokenizer, facts, ec, device, dtype, runner_factory=factory
        )
    except BaseException:
        followers.close()
        raise


def _check_placement(followers: FollowerSet, num_experts: int, ep: ExpertParallelConfig) -> None:
    """Every follower holds exactly the experts the placement gives it."""
    placement = ExpertPlacement(num_experts, ep.size, ep.placement)
    for rank, load in sorted(followers.loaded.items()):
        if load.expert_ids != placement.experts_of(rank):
            raise ExpertParallelFailure(
                f"expert-parallel rank {rank} loaded experts {list(load.expert_ids)}, "
                f"its placement is {list(placement.experts_of(rank))}"
            )
