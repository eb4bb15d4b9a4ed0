"""Placement decision latency of an ingress replica, with a large prefix index.

    .venv/bin/python bench/router_decision.py [--workers 16] [--blocks 100000]
        [--decisions 20000] [--block-size 16] [--window 128]

Builds the state an ingress holds in a busy cluster: a PrefixIndex of `--blocks` blocks
(full and sliding groups) over `--workers` workers (half prefill, half decode) fed
through PrefixIndexFeeder.apply, as from the KV event streams, and registry records
with load. Then times IngressPlacement.place(), the call the request path makes (through
ClusterBackend.place): load view from the records and in-flight counts, the prompt's
chained block hashes, the lookup in the index (sliding-window rule included), both
pools' prefix-aware policies, the disaggregation decision and its accounting. Prompts
are a mix of continuations of cached conversations (long matches), prompts sharing only
a hot system prompt, and cold ones, all first sightings: the ingress's hash cache
(router/hash_cache.py) is emptied before each, so every block up to the longest cached
prefix + 1 is hashed, as for a conversation this ingress never placed. A fourth kind,
"own_turn", is the next turn of a conversation this ingress placed: its previous turn
(a cached conversation + 20..400 tokens) is placed first, untimed, through a second
IngressPlacement whose hash cache is kept, and stored on the decode replica placement
chose (its blocks leave the index after the timed call, so the index stays at its size);
then the turn (+ 20..400 tokens) is timed.
Prints p50 / p90 / p99 / max per prompt kind and overall, for place() and for place()
less the time its prompt hashing takes (tandem.workers.kv.block_hash, about 1 us a block in
Python, for the blocks the hash cache did not hold; it grows with the cached prefix, the
rest does not), and the machine's load average before and after (other jobs on a shared
machine show in p99). No Redis, no Ray: the stream reader is never asked to read.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from pathlib import Path

import yaml

from tandem.cluster.index_feeder import PrefixIndexFeeder
from tandem.cluster.placement import IngressPlacement, PlacementConfig
from tandem.router.policies import DisaggRule, PrefixAware, PrefixAwareConfig
from tandem.router.prefix_index import FULL, SLIDING, prompt_block_hashes
from tandem.workers.control_plane import (
    KVEvent,
    KVEventEntry,
    KVEventReader,
    WorkerCapacity,
    WorkerInfo,
    WorkerLoad,
)
from tandem.workers.kv.block_hash import hash_prompt_blocks

SERVE_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "serve-config.yaml"


def _workers(n: int, rng: random.Random) -> list[WorkerInfo]:
    out = []
    for i in range(n):
        role = "prefill" if i < n // 2 else "decode"
        out.append(
            WorkerInfo(
                replica_id=f"{role[0]}{i:02d}",
                role=role,
                model="m",
                capacity=WorkerCapacity(max_num_seqs=256, kv_blocks=(32768, 4096), block_size=16),
                load=WorkerLoad(
                    running=rng.randrange(64),
                    waiting=rng.randrange(8),
                    queued_prompt_tokens=rng.randrange(20_000),
                    kv_usage=rng.random(),
                ),
            )
        )
    return out


def _stored(worker: str, group: str, block_hash: bytes, block_size: int) -> KVEventEntry:
    return KVEventEntry(worker, "", KVEvent.stored(group, block_hash, None, block_size))


def _removed(worker: str, group: str, block_hash: bytes) -> KVEventEntry:
    return KVEventEntry(worker, "", KVEvent.removed(group, block_hash))


def _fill(
    feeder: PrefixIndexFeeder,
    workers: list[WorkerInfo],
    blocks: int,
    block_size: int,
    window_blocks: int,
    rng: random.Random,
) -> tuple[list[int], list[list[int]]]:
    """Conversations of 16..256 blocks, each cached on one worker of each pool (full
    group: every block; sliding group: the window before its end), until the index
    holds `blocks` blocks. Returns the hot system prompt and the conversations."""
    vocab = 200_000
    system = [rng.randrange(vocab) for _ in range(64 * block_size)]
    prefill = [w.replica_id for w in workers if w.role == "prefill"]
    decode = [w.replica_id for w in workers if w.role == "decode"]
    conversations = []
    for w in prefill + decode:
        feeder.apply(
            _stored(w, FULL, h, block_size) for h in prompt_block_hashes(system + [0], block_size)
        )
    while feeder.index.num_blocks() < blocks:
        tokens = system + [rng.randrange(vocab) for _ in range(rng.randint(16, 256) * block_size)]
        hashes = prompt_block_hashes(tokens + [0], block_size)
        for w in (rng.choice(prefill), rng.choice(decode)):
            entries = [_stored(w, FULL, h, block_size) for h in hashes]
            entries += [_stored(w, SLIDING, h, block_size) for h in hashes[-window_blocks:]]
            feeder.apply(entries)
        conversations.append(tokens)
    return system, conversations


def _percentiles(samples: list[float]) -> str:
    s = sorted(samples)
    q = statistics.quantiles(s, n=100, method="inclusive")
    return (
        f"p50 {q[49] * 1e3:.3f} ms  p90 {q[89] * 1e3:.3f} ms  p99 {q[98] * 1e3:.3f} ms  "
        f"max {s[-1] * 1e3:.3f} ms  (n={len(s)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=100_000)
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-pending",
        action="store_true",
        help="PlacementConfig.pending_prefixes off (the lookup then hashes lazily)",
    )
    args = parser.parse_args()
    load_before = os.getloadavg()
    rng = random.Random(args.seed)
    workers = _workers(args.workers, rng)
    config = PlacementConfig(
        rule=DisaggRule(local_prefill_threshold=256, skip_prefill_cached_fraction=0.5),
        block_size=args.block_size,
        sliding_window=args.window,
        pending_prefixes=not args.no_pending,
    )
    # The reader is never asked to read: apply() feeds the index directly.
    feeder = PrefixIndexFeeder(KVEventReader("redis://127.0.0.1:1", cluster="bench"))

    app = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["args"]
    shipped = PrefixAwareConfig(**app["placement"]["prefix_aware"]["decode"])

    def ingress() -> IngressPlacement:
        return IngressPlacement(
            # deploy/serve-config.yaml's weights (both pools alike since bench/router_sim.py).
            decode_policy=PrefixAware(shipped),
            prefill_policy=PrefixAware(shipped),
            config=config,
            index=feeder,
        )

    # `placement` places first sightings (its hash cache emptied before each), `own` the
    # turns of conversations it placed before (its hash cache kept).
    placement, own = ingress(), ingress()
    started = time.perf_counter()
    system, conversations = _fill(
        feeder, workers, args.blocks, args.block_size, config.sliding_blocks, rng
    )
    fill_s = time.perf_counter() - started
    index = feeder.index
    ids = [w.replica_id for w in workers]

    def tail() -> list[int]:
        return [rng.randrange(200_000) for _ in range(rng.randint(20, 400))]

    def prompt(kind: str) -> list[int]:
        if kind == "continuation":
            return rng.choice(conversations) + tail()
        if kind == "system_prompt":
            return system + tail() * 4
        return [rng.randrange(200_000) for _ in range(rng.randint(500, 4000))]

    def previous_turn() -> tuple[list[int], str, list[tuple[str, bytes]]]:
        """Place a conversation's previous turn through `own` (untimed) and store it on
        the decode replica it chose, as that replica would after computing it. Returns
        the turn, the replica, and the (group, hash) it did not hold before (to undo)."""
        turn = rng.choice(conversations) + tail()
        nonlocal previous
        previous = own.place(turn, workers)
        chosen = previous.decode
        assert chosen is not None
        hashes = prompt_block_hashes(turn + [0], args.block_size)
        new = [(FULL, h) for h in hashes] + [(SLIDING, h) for h in hashes[-config.sliding_blocks :]]
        new = [(g, h) for g, h in new if not index.holds(chosen, g, h)]
        feeder.apply(_stored(chosen, g, h, args.block_size) for g, h in new)
        return turn, chosen, new

    previous = None
    kinds = ("continuation", "system_prompt", "cold", "own_turn")

    def decide(kind: str) -> tuple[list[int], float, int]:
        """One timed place(): the prompt, its seconds, and blocks the hash cache held."""
        if kind == "own_turn":
            turn, chosen, undo = previous_turn()
            p = turn + tail()
            cache = own.hash_cache
            reused = cache.reused_blocks
            t0 = time.perf_counter()
            done = own.place(p, workers)
            t1 = time.perf_counter()
            # The requests end (untimed: after the stream, not on the request path).
            own.release(done)
            own.release(previous)
            feeder.apply(_removed(chosen, g, h) for g, h in undo)
            return p, t1 - t0, cache.reused_blocks - reused
        p = prompt(kind)
        placement.hash_cache.clear()
        t0 = time.perf_counter()
        done = placement.place(p, workers)
        t1 = time.perf_counter()
        placement.release(done)
        return p, t1 - t0, 0

    # Warm-up, then interleaved kinds so each sees the same machine noise.
    for _ in range(200):
        decide(rng.choice(kinds))
    place_s: dict[str, list[float]] = {k: [] for k in kinds}
    # The same decisions without the prompt hashing place() did (the chained hashes of
    # the blocks up to the longest cached prefix, and one more to see it end, less those
    # the hash cache held).
    unhashed_s: dict[str, list[float]] = {k: [] for k in kinds}
    lengths: list[int] = []
    for i in range(args.decisions):
        kind = kinds[i % len(kinds)]
        p, took, reused = decide(kind)
        lengths.append(len(p))
        hashes = prompt_block_hashes(p, args.block_size)
        longest = max(index.matched_blocks(hashes, ids).values())
        if config.pending_prefixes:  # every block, to register the prompt as pending
            hashed = max(0, len(hashes) - reused)
        else:
            hashed = max(0, min(len(hashes), longest + 1) - reused)
        t2 = time.perf_counter()
        hash_prompt_blocks(p[: hashed * args.block_size], args.block_size)
        t3 = time.perf_counter()
        place_s[kind].append(took)
        unhashed_s[kind].append(max(0.0, took - (t3 - t2)))

    load = " / ".join(f"{x:.2f}" for x in load_before + os.getloadavg())
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}; load average (1, 5, 15 min) before / after: {load}"
    )
    print(
        f"index: {index.num_blocks()} blocks over {len(index.workers)} workers "
        f"({len(conversations)} conversations), block {args.block_size}, window {args.window}; "
        f"filled in {fill_s:.1f} s ({index.num_blocks() / fill_s:,.0f} events/s applied)"
    )
    print(f"prompts: {min(lengths)}..{max(lengths)} tokens, mean {statistics.mean(lengths):.0f}")
    cache = own.hash_cache
    print(
        f"own_turn hash cache: {cache.num_prompts} prompts, {cache.num_blocks} blocks, "
        f"{cache.num_bytes / 2**20:.1f} MiB; {cache.reused_blocks / max(1, cache.lookups):.0f} "
        "blocks reused a lookup"
    )
    for name, samples in (("place()", place_s), ("unhashed", unhashed_s)):
        for kind in kinds:
            print(f"{name:9s} {kind:13s} {_percentiles(samples[kind])}")
        first = [x for k in kinds[:3] for x in samples[k]]
        print(f"{name:9s} {'first 3 kinds':13s} {_percentiles(first)}")
        print(f"{name:9s} {'all':13s} {_percentiles([x for v in samples.values() for x in v])}")


if __name__ == "__main__":
    main()
