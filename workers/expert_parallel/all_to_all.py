"""Dispatch by all-to-all: pairs travel to their experts' owners and their results back.

Each rank is the source of one slice of the tokens (rank r: rows [lo_r, hi_r) of an even
split of T), so every pair is sent exactly once:

    source r: its slice's pairs, grouped by owner ──all_to_all(x rows)──> owners
    owner s:  compute(received rows) -> weighted y rows
    owner s:  y rows ──all_to_all (reverse splits)──> their sources
    source r: sum its pairs into its slice [hi_r - lo_r, d]
    all_gather(slices) ──> out [T, d] on every rank

The routing is replicated (the contract of ExpertDispatcher), so every rank derives the
whole [source, owner] count matrix and the expert ids and weights of the pairs it will
receive from it, without exchanging them: what owner s receives from source r, in order,
is the pairs of r's slice that s owns, in pair order; over all sources in rank order that
is every pair s owns, in pair order. Three collectives per layer, and one read of the
count matrix on the host (the split sizes). With attention replicated the all-gather
restores what every rank needs next; under data-parallel attention (each rank its own
tokens, routing no longer replicated) the counts and metadata would travel too and the
all-gather would go, which is where this path pays.
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
        world, rank = self.placement.world_size, self.rank
        if num_tokens == 0:
            return torch.zeros((0, d), dtype=torch.float32, device=x.device)
        top_k = experts.shape[1]
        rows_per_rank = -(-num_tokens // world)  # the last slices may be short or empty
        lo = min(rank * rows_per_rank, num_tokens)
        hi = min(lo + rows_per_rank, num_tokens)

        flat = experts.reshape(-1).long()  # [T k], pair p = token p // k, slot p % k
        owner = self.owners(x.device)[flat]  # [T k]
        source = torch.arange(flat.numel(), device=x.device) // (top_k * rows_per_rank)
        counts = torch.bincount(source * world + owner, minlength=world * world)
        counts = counts.view(world, world).tolist()  # [source][owner], the one host read
        send_splits = counts[rank]  # to each owner, from my slice
        recv_splits = [counts[s][rank] for s in range(world)]  # to me, from each source

        # Sender: my slice's pairs grouped by owner (stable: pair order within a group).
        order = lo * top_k + torch.argsort(owner[lo * top_k : hi * top_k], stable=True)
        token = order // top_k  # [S k] global token of each sent pair
        rows_in = x.new_empty((sum(recv_splits), d))
        dist.all_to_all_single(
            rows_in, x[token].contiguous(), recv_splits, send_splits, group=self.group
        )

        # Owner: the received pairs are every pair I own, in pair order (see above).
        mine = torch.nonzero(owner == rank, as_tuple=True)[0]  # [P]
        y = compute(rows_in, self.local_ids(x.device)[flat[mine]], weights.reshape(-1)[mine])
        y_back = y.new_empty((order.numel(), d))
        dist.all_to_all_single(y_back, y.contiguous(), send_splits, recv_splits, group=self.group)

        # Slices padded to one size: all_gather needs equal shapes.
        part = torch.zeros((rows_per_rank, d), dtype=torch.float32, device=x.device)
        part.index_add_(0, token - lo, y_back)
        gathered = torch.empty((world * rows_per_rank, d), dtype=torch.float32, device=x.device)
        dist.all_gather_single(gathered, part, group=self.group)
        return gathered[:num_tokens]
