"""The model runner: scheduler output in, logits of the sampling positions out.

The scheduler works on ints and lists; this is the one place that turns a step into
tensors. For a step with two sequences, a 3-token prefill chunk of A and one decode
token of B, block size 4, the flattened (varlen) batch is

    input_ids        [a0 a1 a2 | b7]
    positions        [ 4  5  6 |  7]          A has 4 cached tokens, B has 7
    query_start_loc  [0, 3, 4]
    seq_lens         [7, 8]                   context after this step
    block_tables[g]  [[5, 2, -1], [9, 1, -1]] per KV group, padded with -1
    slot_mapping[g]  [2*4+0, 2*4+1, 2*4+2, 1*4+3]

and the logits are taken at the last new token of every sequence that samples.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from workers.model.attention import AttentionMetadata, build_attention_metadata
from workers.model.gpt_oss import GptOssModel, allocate_kv_caches
from workers.scheduler import SchedulerOutput


class ModelRunner:
    """Owns the model and its KV cache tensors; runs one scheduled step at a time."""

    def __init__(
        self,
        model: GptOssModel,
        blocks_per_group: Sequence[int],
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.num_groups = len(model.config.kv_groups)
        self.kv_caches = allocate_kv_caches(
            model.config, blocks_per_group, block_size, dtype, device
        )

    def _inputs(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        reqs = out.scheduled
        ids = [t for r in reqs for t in r.token_ids]
        positions = [p for r in reqs for p in range(r.start_position, r.seq_len)]
        metadata = build_attention_metadata(
            seq_lens=[r.seq_len for r in reqs],
            num_new_tokens=[r.num_new_tokens for r in reqs],
            block_tables=[[r.block_tables[g] for r in reqs] for g in range(self.num_groups)],
            block_size=self.block_size,
            device=self.device,
        )
        as_tensor = functools.partial(torch.tensor, dtype=torch.int64, device=self.device)
        return as_tensor(ids), as_tensor(positions), metadata

    @torch.inference_mode()
    def execute(
        self, out: SchedulerOutput, after_layer: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Run the step; return fp32 logits [n_sampling, vocab] in `out.scheduled` order
        of the requests whose `needs_sample` is set. after_layer(i) runs once layer i's
        KV is in the cache."""
        input_ids, positions, metadata = self._inputs(out)
        hidden = self.model(input_ids, positions, metadata, self.kv_caches, after_layer)  # [T, d]
        last = []
        end = 0
        for r in out.scheduled:
            end += r.num_new_tokens
            if r.needs_sample:
                last.append(end - 1)
        if not last:
            return torch.empty(0, self.model.config.vocab_size, device=self.device)
        index = torch.tensor(last, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, index))  # [n, V] fp32
