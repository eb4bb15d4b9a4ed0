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

from collections.abc import Sequence

import torch

from workers.model.attention import AttentionMetadata, KVGroupTables
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
        self.kv_caches = allocate_kv_caches(
            model.config, blocks_per_group, block_size, dtype, device
        )

    def _metadata(
        self, out: SchedulerOutput
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        reqs = out.scheduled
        ids: list[int] = []
        positions: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        for r in reqs:
            ids.extend(r.token_ids)
            positions.extend(range(r.start_position, r.start_position + r.num_new_tokens))
            starts.append(starts[-1] + r.num_new_tokens)
            seq_lens.append(r.start_position + r.num_new_tokens)
        groups = []
        for g in range(len(self.model.config.kv_groups)):
            tables = [r.block_tables[g] for r in reqs]
            width = max(1, max(len(t) for t in tables))
            padded = [t + [-1] * (width - len(t)) for t in tables]
            slots = [s for r in reqs for s in r.slot_ids[g]]
            groups.append(
                KVGroupTables(
                    block_tables=self._tensor(padded, torch.int32),
                    slot_mapping=self._tensor(slots, torch.int64),
                )
            )
        metadata = AttentionMetadata(
            query_start_loc=self._tensor(starts, torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32),
            groups=tuple(groups),
        )
        return self._tensor(ids, torch.int64), self._tensor(positions, torch.int64), metadata

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """Run the step; return fp32 logits [n_sampling, vocab] in `out.scheduled` order
        of the requests whose `needs_sample` is set."""
        input_ids, positions, metadata = self._metadata(out)
        hidden = self.model(input_ids, positions, metadata, self.kv_caches)  # [T, d]
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
