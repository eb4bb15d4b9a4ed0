"""KV blocks written outside a step reach every rank: the decode side of disaggregation.

Attention is replicated (engine.py), so every rank of an expert-parallel worker holds the
whole KV cache and writes the same slots each step. Blocks that arrive by KV transfer
(workers/disagg/transfer) land in rank 0's cache only: the receiver is rank 0's, in the
Serve replica's process. Before the request's first decode step reads them, rank 0
broadcasts them within the worker's own group:

    prefill worker (any N)             decode worker, N ranks
    rank 0 ══ KV transfer pair ══════> rank 0 cache ── broadcast_blocks ──> ranks 1..N-1
    (ranks 1..N-1: same KV, unused)                   (one broadcast per layer, NVLink)

Why this and not a pair per rank (prefill rank i -> decode rank i): with replicated
attention rank i's KV equals rank 0's, so N pairs would carry N copies of the same bytes
over the network between the workers, need a transfer endpoint, a rendezvous and a pump
in every follower, and tie both workers to one N. Here the network carries one copy,
the copies move inside the node, and the KV layout of a worker does not depend on N: a
2-rank prefill worker feeds a 1-rank decode worker and the other way round. A
head-split attention (KV heads divided over the ranks) would make the per-rank pairs
the right design; KVLayout.kv_head_shards names that split so such workers refuse the
others at pair set-up.

Wire: the block ids travel as a BLOCKS message (step_messages.py), then every layer
that has blocks is one broadcast of the packed layer (workers/disagg/transfer/pack.py,
the transfer's own format), in layer order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from tandem.workers.disagg.transfer.pack import pack_layer, packed_nbytes, unpack_layer
from tandem.workers.model.gpt_oss import KVCache


def blocks_body(block_ids: Sequence[Sequence[int]]) -> list[int]:
    """BLOCKS body: per group its count [G], then every id, group-major [X]."""
    return [len(ids) for ids in block_ids] + [int(b) for ids in block_ids for b in ids]


def parse_blocks_body(body: Sequence[int], num_groups: int) -> list[list[int]]:
    """Inverse of blocks_body; ValueError when the counts disagree with the ids."""
    counts, ids = list(body[:num_groups]), list(body[num_groups:])
    if len(counts) != num_groups or sum(counts) != len(ids) or min(counts, default=0) < 0:
        raise ValueError(f"BLOCKS body of {len(body)} ints does not match its counts {counts}")
    out, at = [], 0
    for n in counts:
        out.append(ids[at : at + n])
        at += n
    return out


def broadcast_blocks(
    kv_caches: Sequence[KVCache],
    layer_groups: Sequence[int],
    block_ids: Sequence[Sequence[int]],
    rank: int,
) -> None:
    """Rank 0 sends, every other rank receives: blocks block_ids[g] of every layer of
    group g, from rank 0's caches into the same block ids of this rank's caches. Every
    rank calls it with the same ids (the BLOCKS message); collective on the default group.
    """
    device = kv_caches[0][0].device
    ids = [torch.tensor(list(g), dtype=torch.int64, device=device) for g in block_ids]
    for layer, (key, value) in enumerate(kv_caches):
        blocks = ids[layer_groups[layer]]  # [n] int64
        if blocks.numel() == 0:
            continue
        if rank == 0:
            dist.broadcast(pack_layer(key, value, blocks), src=0)
        else:
            packed = torch.empty(
                packed_nbytes(key, blocks.numel()), dtype=torch.uint8, device=device
            )
            dist.broadcast(packed, src=0)
            unpack_layer(packed, key, value, blocks)
