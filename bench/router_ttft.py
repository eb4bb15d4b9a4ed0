"""TTFT and throughput by placement policy, on the multi-turn chat workload.

    .venv/bin/python -m bench.router_ttft [--policies prefix_aware,round_robin,least_loaded]
        [--hidden 256] [--layers 4] [--conversations 24] [--turns 5]

For each policy a fresh cluster (local Ray, private Redis, 2 ingress + 2 prefill +
3 decode replicas on CPU, tests/support/cluster.py) serves the same workload: many
conversations at once, each turn the previous prompt + the generated answer + a new user
message, with think time between turns (ChatWorkload). The policy applies to both pools;
the disaggregation decision is the router's for every policy. Reported: client TTFT
(call start to the first token) mean / p50 / p90 / p99 over all turns, p50 / p90 over
later turns (where placement matters: first turns share nothing with any cache),
output tokens/s and turns/s over the run (closed loop: users wait for
answers, so the slowest conversation sets the wall time), prefix hit rate (cached /
prompt tokens as the serving workers report them), the share of prompts prefilled on a
prefill replica.

The model is the tiny gpt-oss architecture widened (--hidden, --layers, random weights,
the tiny tokenizer) so that computing a prompt, not the serving overhead, dominates TTFT:
a calibration line shows an uncached prompt's prefill against a cached one's and a
decode step, measured in this process on the same engine settings.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from tandem.workers.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from tandem.workers.engine.sampling_params import SamplingParams  # noqa: E402
from tandem.workers.model.config import load_config  # noqa: E402
from tandem.workers.synthetic.checkpoint_writer import write_random_checkpoint  # noqa: E402
from tandem.workers.synthetic.tiny_model import default_model_dir  # noqa: E402
from tests.support.cluster import ChatWorkload, hit_rate, run_chat_workload, serve_cluster  # noqa: E402

ENGINE = {
    "device": "cpu",
    "dtype": "float32",
    "block_size": 8,
    "max_num_seqs": 16,
    "max_num_batched_tokens": 256,
    "max_model_len": 1024,
}


def make_model(directory: Path, hidden: int, layers: int) -> Path:
    """The tiny model's architecture and tokenizer, `hidden` wide and `layers` deep."""
    tiny = default_model_dir()
    base = load_config(tiny)
    config = replace(
        base,
        hidden_size=hidden,
        intermediate_size=hidden,
        num_hidden_layers=layers,
        layer_types=("sliding_attention", "full_attention") * (layers // 2),
        num_attention_heads=max(4, hidden // 64),
        head_dim=64,
    )
    write_random_checkpoint(directory, config, seed=0, generation_eos_ids=[base.eos_token_id])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, directory / name)
    return directory


def calibrate(model_dir: Path, workload: ChatWorkload) -> str:
    """Prefill of a typical later-turn prompt uncached vs with its history cached, and a
    decode step, on one engine thread (as a worker replica runs)."""
    torch.set_num_threads(1)
    config = {**ENGINE, "kv_cache_tokens": KV_TOKENS_PER_CONVERSATION * workload.conversations}
    engine = LLMEngine.from_model_dir(model_dir, EngineConfig(**config))
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    history = [i % workload.vocab_size for i in range(480)]
    turn = history + [(7 * i) % workload.vocab_size for i in range(80)]
    engine.generate([[1] * 16], one)  # warm-up

    def timed(prompts, params) -> float:
        start = time.perf_counter()
        engine.generate(prompts, params)
        return time.perf_counter() - start

    cold = timed([turn], one)
    timed([history], one)  # now cached: the next prompt computes its last 80 tokens only
    warm = timed([turn], one)
    steps = 32
    decode = timed(
        [[3] * 32] * 4, SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    )
    return (
        f"prefill of a {len(turn)}-token prompt: uncached {cold * 1e3:.0f} ms, "
        f"{len(history)} tokens cached {warm * 1e3:.0f} ms; "
        f"decode step (4 sequences) {decode / steps * 1e3:.0f} ms"
    )


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(sorted(values), n=100, method="inclusive")[q - 1]


# KV cache tokens per worker per conversation: conversations end near 650 tokens, so a
# worker holds about a third of them at their longest and the decode pool all of them
# (the regime of tests/test_router_cluster.py: caches of a busy service, not of an idle
# one).
KV_TOKENS_PER_CONVERSATION = 220


def run_policy(model_dir: Path, policy: str, workload: ChatWorkload) -> dict:
    placement = {"prefill": policy, "decode": policy}
    engine = {**ENGINE, "kv_cache_tokens": KV_TOKENS_PER_CONVERSATION * workload.conversations}
    with serve_cluster(
        str(model_dir),
        app="bench",
        cluster_name="bench",
        engine=engine,
        placement=placement,
        prefill=2,
        decode=3,
        ingress=2,
    ) as cluster:
        # Warm every replica's code paths on other conversations, then measure.
        warm = replace(workload, seed=workload.seed + 1000, conversations=6, turns=1)
        run_chat_workload(cluster.target, warm, clients=6)
        run = run_chat_workload(cluster.target, workload)
    results = run.results
    ttft = [r.ttft_s for r in results]
    # First turns share nothing with any cache: their TTFT is the same work under every
    # policy. Later turns are where placement matters.
    later = [r.ttft_s for r in results if r.turn > 0]
    first = [r.ttft_s for r in results if r.turn == 0]
    return {
        "first_p50_s": percentile(first, 50),
        "later_p50_s": percentile(later, 50),
        "later_p90_s": percentile(later, 90),
        "policy": policy,
        "turns": len(results),
        "ttft_mean_s": statistics.mean(ttft),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "ttft_p99_s": percentile(ttft, 99),
        "output_tok_s": sum(r.completion_tokens for r in results) / run.wall_s,
        "turns_per_s": len(results) / run.wall_s,
        "hit_rate": hit_rate(results),
        "remote_share": sum(1 for r in results if r.prefill_replica) / len(results),
        "wall_s": run.wall_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policies", default="prefix_aware,round_robin,least_loaded")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--conversations", type=int, default=24)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tandem-bench-model-") as tmp:
        model_dir = make_model(Path(tmp), args.hidden, args.layers)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        workload = ChatWorkload(
            vocab_size=vocab,
            seed=args.seed,
            conversations=args.conversations,
            turns=args.turns,
            # No shared system prompt, as in tests/test_router_cluster.py: a prefix every
            # cache holds hides where a conversation lives.
            system_tokens=0,
            first_user_tokens=(150, 250),
            user_tokens=(40, 120),
            answer_tokens=(16, 32),
        )
        print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}")
        print(f"model: tiny gpt-oss architecture, hidden {args.hidden}, {args.layers} layers")
        print(f"workload: {workload}")
        print(calibrate(model_dir, workload), flush=True)
        rows = [run_policy(model_dir, p, workload) for p in args.policies.split(",")]
    print()
    print(
        "| policy | TTFT mean / p50 / p90 / p99 (ms) | later turns p50 / p90 | first turns p50 "
        "| output tok/s | turns/s | hit rate | remote |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['policy']} | {_ms(r, 'ttft_mean_s', 'ttft_p50_s', 'ttft_p90_s', 'ttft_p99_s')} "
            f"| {_ms(r, 'later_p50_s', 'later_p90_s')} | {_ms(r, 'first_p50_s')} "
            f"| {r['output_tok_s']:.1f} | {r['turns_per_s']:.2f} | {r['hit_rate']:.3f} "
            f"| {r['remote_share']:.0%} |"
        )


def _ms(row: dict, *keys: str) -> str:
    return " / ".join(f"{row[k] * 1e3:.0f}" for k in keys)


if __name__ == "__main__":
    main()
