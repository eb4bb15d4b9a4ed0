"""Dispatch by all-to-all: pairs travel to their experts' owners and their results back.

Each rank is the source of one slice of the tokens (rank r: rows [lo_r, hi_r) of an even
split of T), so every pair is sent exactly once:

    source r: its slice's pairs, sorted by owner ──all_to_all(x rows, meta)──> owners
    owner s:  compute(received rows) -> weighted y rows
    owner s:  y rows ──all_to_all (reverse splits)──> their sources
    source r: sum its pairs into its slice [hi_r - lo_r, d]
    all_gather(slices) ──> out [T, d] on every rank

The split sizes are exchanged first (an all-to-all of N counts, read on the host). Per
layer: four collectives; the bytes a rank sends are about its slice's T k / N pairs'
rows instead of the all-reduce's T d. With attention replicated the all-gather restores
what every rank needs next; under data-parallel attention (each rank its own tokens) it
would be dropped, which is where this path pays.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tandem.workers.expert_parallel.dispatch import ExpertCompute, ExpertDispatcher


class AllToAllDispatcher(ExpertDispatcher):
    def run(
        self,
        x: torch.Tensor,
        experts: torch.Tensor,
        weights: torch.Tensor,
        compute: ExpertCompute,
    ) -> torch.Tensor:
        num_tokens, d = x.shape
        world = self.placement.world_size
        if num_tokens == 0:
            return torch.zeros((0, d), dtype=torch.float32, device=x.device)
        top_k = experts.shape[1]
        rows_per_rank = -(-num_tokens // world)  # the last slices may be short or empty
        lo = min(self.rank * rows_per_rank, num_tokens)
        hi = min(lo + rows_per_rank, num_tokens)

        flat = experts[lo:hi].reshape(-1).long()  # [S * k] this slice's pairs
        owner = self.owners(x.device)[flat]  # [S * k]
        order = torch.argsort(owner, stable=True)  # pairs grouped by destination rank
        token = lo + order // top_k  # [S * k] global token of each sorted pair
        send_counts = torch.bincount(owner, minlength=world)  # [N]
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        received = sum(recv_splits)

        # Rows travel in x's dtype; local expert id and weight travel as fp32 (ids < 2^24).
        meta = torch.stack(
            (self.local_ids(x.device)[flat[order]].float(), weights[lo:hi].reshape(-1)[order]),
            dim=1,
        )  # [S * k, 2]
        rows_in = x.new_empty((received, d))
        meta_in = meta.new_empty((received, 2))
        dist.all_to_all_single(rows_in, x[token].contiguous(), recv_splits, send_splits,
                               group=self.group)
        dist.all_to_all_single(meta_in, meta, recv_splits, send_splits, group=self.group)

        y = compute(rows_in, meta_in[:, 0].long(), meta_in[:, 1])  # [received, d] fp32
        y_back = y.new_empty((flat.numel(), d))
        dist.all_to_all_single(y_back, y.contiguous(), send_splits, recv_splits,
                               group=self.group)

        # Slices padded to one size: all_gather needs equal shapes.
        part = torch.zeros((rows_per_rank, d), dtype=torch.float32, device=x.device)
        part.index_add_(0, token - lo, y_back)
        gathered = torch.empty((world * rows_per_rank, d), dtype=torch.float32, device=x.device)
        dist.all_gather_single(gathered, part, group=self.group)
        return gathered[:num_tokens]
