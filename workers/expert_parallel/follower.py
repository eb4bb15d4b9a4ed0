"""A follower rank (1..N-1) of an expert-parallel worker: a process rank 0 starts with

    python -m tandem.workers.expert_parallel.follower '<FollowerArgs JSON>'

It joins the group, loads its experts, reports ready through the store, then repeats
what rank 0 broadcasts (step_messages.py): every STEP runs the same model forward as
rank 0 (its layers' collectives pair with rank 0's), writing its own replicated KV cache,
and every BLOCKS message copies rank 0's transferred KV blocks into it; it never samples.
It exits 0 on STOP and 1 on any error (a failed collective, rank 0 gone, a timeout):
exiting closes its sockets, so the other ranks fail at once instead of waiting for the
timeout.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from tandem.workers.expert_parallel.config import ExpertParallelConfig
from tandem.workers.expert_parallel.group import connect_store, join_group, leave_group
from tandem.workers.expert_parallel.kv_replica import broadcast_blocks, parse_blocks_body
from tandem.workers.expert_parallel.rank_model import expert_nbytes, load_rank_model, rank_device
from tandem.workers.expert_parallel.step_messages import HEADER_LEN, Command, StepInputs
from tandem.workers.model.attention import build_attention_metadata
from tandem.workers.model.gpt_oss import GptOssModel, allocate_kv_caches

READY_KEY = "tandem/ep/ready/{rank}"


@dataclass(frozen=True)
class RankLoad:
    """What a follower loaded, reported with its ready key (JSON)."""

    expert_ids: tuple[int, ...]
    # Global ids of the experts it holds, ascending.
    expert_nbytes: int
    # Bytes of their tensors in its memory (every layer).

    def to_json(self) -> str:
        return json.dumps(
            {"expert_ids": list(self.expert_ids), "expert_nbytes": self.expert_nbytes}
        )

    @staticmethod
    def from_json(text: str) -> RankLoad:
        """ValueError when the report is malformed."""
        try:
            data = json.loads(text)
            ids = tuple(int(e) for e in data["expert_ids"])
            nbytes = int(data["expert_nbytes"])
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"malformed rank load report {text[:80]!r}: {err}") from None
        return RankLoad(ids, nbytes)


@dataclass(frozen=True)
class FollowerArgs:
    """Everything a follower needs, passed as JSON on its command line."""

    address: str
    # rank 0's store, "host:port"
    rank: int
    model_dir: str
    device: str
    # rank 0's device type ("cpu", "cuda"); the follower picks its own index (rank_device)
    dtype: str
    kernels: str | None
    ep: dict
    # ExpertParallelConfig fields

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> FollowerArgs:
        return FollowerArgs(**json.loads(text))


def run_follower(args: FollowerArgs) -> None:
    ep = ExpertParallelConfig(**args.ep)
    device = rank_device(torch.device(args.device), args.rank)
    if device.type == "cpu":
        # The N ranks share the host's cores: without this their OpenMP pools oversubscribe
        # it (rank 0, the engine process, keeps its own setting).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ep.size))
    store = connect_store(args.address, ep.start_timeout_s)
    join_group(store, args.rank, ep.size, device, ep.timeout_s)
    model, _ = load_rank_model(
        args.model_dir, ep, args.rank, device, getattr(torch, args.dtype), args.kernels
    )
    # What this rank holds, for rank 0 to check and report (RankLoad).
    loaded = RankLoad(model.expert_ids, expert_nbytes(model))
    store.set(READY_KEY.format(rank=args.rank), loaded.to_json())
    del store
    header = torch.empty(HEADER_LEN, dtype=torch.int64, device=device)
    kv_caches, block_size, num_groups = None, 0, len(model.config.kv_groups)
    layer_groups = [
        model.config.kv_group_of_layer(i) for i in range(model.config.num_hidden_layers)
    ]
    while True:
        dist.broadcast(header, src=0)
        command, a, b, c = header.tolist()
        if command == Command.STOP:
            return
        if command == Command.HEARTBEAT:
            continue
        if command == Command.INIT:
            body = torch.empty(b, dtype=torch.int64, device=device)
            dist.broadcast(body, src=0)
            block_size = a
            kv_caches = allocate_kv_caches(
                model.config, body.tolist(), block_size, model.dtype, device
            )
            continue
        if command not in (Command.STEP, Command.BLOCKS) or kv_caches is None:
            raise RuntimeError(f"unexpected message {header.tolist()} (before INIT?)")
        if command == Command.BLOCKS:
            body = torch.empty(a + b, dtype=torch.int64, device=device)
            dist.broadcast(body, src=0)
            block_ids = parse_blocks_body(body.tolist(), num_groups)
            broadcast_blocks(kv_caches, layer_groups, block_ids, args.rank)
            continue
        size = b + 2 * a + num_groups * a + c
        body = torch.empty(size, dtype=torch.int64, device=device)
        dist.broadcast(body, src=0)
        step = StepInputs.decode(header.tolist(), body.tolist(), num_groups)
        run_step(model, kv_caches, step, block_size, device)


@torch.inference_mode()
def run_step(
    model: GptOssModel,
    kv_caches: list,
    step: StepInputs,
    block_size: int,
    device: torch.device,
) -> None:
    """The forward rank 0's ModelRunner runs for the same step (no logits)."""
    metadata = build_attention_metadata(
        step.seq_lens, step.num_new_tokens, step.block_tables, block_size, device
    )
    ids = torch.tensor(step.token_ids, dtype=torch.int64, device=device)
    positions = torch.tensor(step.positions(), dtype=torch.int64, device=device)
    model(ids, positions, metadata, kv_caches)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tandem.workers.expert_parallel.follower '<json>'", file=sys.stderr)
        return 2
    args = FollowerArgs.from_json(argv[0])
    try:
        run_follower(args)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        # No teardown of a broken group (it can block); the OS closes the sockets.
        os._exit(1)
    leave_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
