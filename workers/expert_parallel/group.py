"""The process group of one expert-parallel worker: N ranks of one node.

    rank 0 (the engine)                         ranks 1..N-1 (followers)
    TCPStore server on 127.0.0.1:<free port>    TCPStore client to that address
    init_process_group(rank 0, N)               init_process_group(rank i, N)
        gloo on CPU, NCCL on CUDA (NCCL_NVLS_ENABLE=0: no NVLink multicast)

The group is the process's default (world) group: a worker process belongs to exactly
one expert-parallel group, and the model's collectives use it. KV-transfer pairs build
their own groups without the world group (workers/disagg/transfer/pair.py), so the two
never meet. The store listens on loopback only (host_store binds it there) and has no
authentication; the group keeps it (its PrefixStore) for as long as the group lives.

Timeouts: every collective is bounded by `timeout_s` (gloo raises; NCCL's watchdog
aborts), so a rank that stops answering fails the others' step instead of hanging them;
a rank that dies closes its sockets and fails them at once on gloo.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from tandem.workers.disagg.transfer.pair import connect_store, host_store

__all__ = ["connect_store", "host_rendezvous", "join_group", "leave_group", "backend_for"]

LOOPBACK = "127.0.0.1"
_PREFIX = "tandem/ep/"


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def host_rendezvous(timeout_s: float) -> tuple[dist.TCPStore, str]:
    """Rank 0: a store on a free loopback port; returns it and its "host:port"."""
    return host_store(LOOPBACK, 0, timeout_s)


def join_group(
    store: dist.Store | str, rank: int, world_size: int, device: torch.device, timeout_s: float
) -> None:
    """Join the worker's group as `rank` (store: rank 0's store, or its address)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed group")
    if isinstance(store, str):
        store = connect_store(store, timeout_s)
    if device.type == "cuda":
        # NVLink multicast (NVLS) needs driver and fabric support the lent machines lack.
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend_for(device),
        store=dist.PrefixStore(_PREFIX, store),
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )


def leave_group() -> None:
    """Destroy the group if this process has one (idempotent)."""
    if dist.is_initialized():
        dist.destroy_process_group()
