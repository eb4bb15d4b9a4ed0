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
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tandem.workers.engine.llm_engine import EngineConfig, LLMEngine, ModelFacts
from tandem.workers.engine.runner import ModelRunner
from tandem.workers.engine.scheduler import SchedulerOutput
from tandem.workers.expert_parallel.config import ExpertParallelConfig
from tandem.workers.expert_parallel.leader import ExpertParallelFailure, FollowerSet
from tandem.workers.expert_parallel.rank_model import load_rank_model
from tandem.workers.expert_parallel.step_messages import StepInputs
from tandem.workers.model.gpt_oss import GptOssModel
from tandem.workers.text.tokenizer import Tokenizer

__all__ = ["ExpertParallelFailure", "ExpertParallelRunner", "build_engine"]


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

    def check_alive(self) -> None:
        self.followers.check_alive()

    def close(self) -> None:
        self.followers.close()


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
        tokenizer = Tokenizer.from_dir(model_dir)
        facts = ModelFacts.read(model_dir, config, ec.max_model_len)
        factory = functools.partial(ExpertParallelRunner, followers=followers)
        return LLMEngine(model, config, tokenizer, facts, ec, device, dtype,
                         runner_factory=factory)
    except BaseException:
        followers.close()
        raise
