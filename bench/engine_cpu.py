"""Engine throughput on CPU with the tiny embedded model: tokens/s vs batch size.

    .venv/bin/python bench/engine_cpu.py [--batches 1,4,16,64] [--prompt 64] [--gen 64]

Each batch size runs `batch` greedy requests of a `prompt`-token prompt and `gen` output
tokens through one engine, after a warm-up run; it prints wall time, prefill and decode
throughput (output tokens/s over the whole run and per decode step), and the engine's
step count. CPU figures measure the Python engine's overhead as much as the model:
the tiny model's FLOPs are negligible.
"""

from __future__ import annotations

import argparse
import platform
import random
import subprocess
import time

import torch

from tandem.workers.engine.llm_engine import EngineConfig, LLMEngine
from tandem.workers.engine.sampling_params import SamplingParams
from tandem.workers.synthetic.tiny_model import default_model_dir


def run(engine: LLMEngine, batch: int, prompt_len: int, gen: int, seed: int) -> dict:
    rng = random.Random(seed)
    vocab = engine.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    remaining, steps, first_token_at = set(ids), 0, None
    start = time.perf_counter()
    while remaining:
        outs = engine.step()
        steps += 1
        for out in outs:
            if first_token_at is None:
                first_token_at = time.perf_counter()
            if out.finished:
                remaining.discard(out.request_id)
    wall = time.perf_counter() - start
    return {
        "batch": batch,
        "wall_s": wall,
        "steps": steps,
        "output_tok_s": batch * gen / wall,
        "total_tok_s": batch * (gen + prompt_len) / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--gen", type=int, default=64)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    config = EngineConfig(
        device="cpu",
        dtype="float32",
        block_size=16,
        kv_cache_tokens=65536,
        max_num_seqs=max(batches),
        max_num_batched_tokens=4096,
    )
    engine = LLMEngine.from_model_dir(default_model_dir(), config)
    run(engine, 2, args.prompt, 8, seed=0)  # warm-up
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(
        f"# tiny model, CPU ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads), commit {commit}, "
        f"prompt {args.prompt}, output {args.gen} tokens, greedy"
    )
    print(f"{'batch':>6} {'wall s':>8} {'steps':>6} {'output tok/s':>13} {'total tok/s':>12}")
    for batch in batches:
        r = run(engine, batch, args.prompt, args.gen, seed=batch)
        print(
            f"{r['batch']:>6} {r['wall_s']:>8.2f} {r['steps']:>6} {r['output_tok_s']:>13.0f} "
            f"{r['total_tok_s']:>12.0f}"
        )


if __name__ == "__main__":
    main()
