"""Dispatch by replication: every rank computes its experts' pairs of all T tokens, one
all-reduce of the [T, d] fp32 partial outputs combines them.

    rank 0: out0 = sum of pairs with owner 0 ─┐
    rank 1: out1 = sum of pairs with owner 1 ─┼─ all_reduce(sum) ─> out on every rank
    ...                                       ┘

No data moves before the experts (the tokens are already everywhere); one collective of
T * d * 4 bytes per layer. Best for small batches (decode), where the all-reduce is
latency-bound anyway.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tandem.workers.expert_parallel.dispatch import ExpertCompute, ExpertDispatcher


class ReplicatedDispatcher(ExpertDispatcher):
    def run(
        self,
        x: torch.Tensor,
        experts: torch.Tensor,
        weights: torch.Tensor,
        compute: ExpertCompute,
    ) -> torch.Tensor:
        num_tokens, d = x.shape
        out = torch.zeros((num_tokens, d), dtype=torch.float32, device=x.device)  # [T, d]
        if num_tokens == 0:
            return out
        flat = experts.reshape(-1).long()  # [T * k], pair p = token p // k, slot p % k
        mine = torch.nonzero(self.owners(x.device)[flat] == self.rank, as_tuple=True)[0]  # [P]
        token = mine // experts.shape[1]  # [P]
        y = compute(x[token], self.local_ids(x.device)[flat[mine]], weights.reshape(-1)[mine])
        out.index_add_(0, token, y)
        dist.all_reduce(out, group=self.group)
        return out
