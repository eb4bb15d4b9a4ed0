"""Does a long generation slow others beyond what batching costs? (issue 19, build 5)

    .venv/bin/python -m bench.fairness_cpu [--long 4] [--long-tokens 3000] [--at 1500]

One engine (tiny model, CPU, in this process). First a short request alone (a 32-token
prompt, 128 tokens out): its inter-token latency (ITL) and the engine's step time. Then
`--long` long generations (32-token prompts, `--long-tokens` out); once they are `--at`
tokens in, the same short request joins them. Reported: the short request's ITL beside
the long ones and its ratio to alone, the engine's step time before it joined and while it
ran, and the short request's ITL over the step time while it ran: 1.0 means it got a token
every step (the scheduler's decode-first rule gives every running request one), so
whatever it loses is the batch's own step cost (more sequences, longer contexts), not
unfairness.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from bench import run_info
from tandem.workers.engine.llm_engine import EngineConfig, LLMEngine
from tandem.workers.engine.sampling_params import SamplingParams
from tandem.workers.synthetic.tiny_model import default_model_dir

SHORT = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)


def prompt(rng: random.Random, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(32)]


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times[:-1], times[1:], strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", type=int, default=4)
    parser.add_argument("--long-tokens", type=int, default=3000)
    parser.add_argument("--at", type=int, default=1500)
    args = parser.parse_args()
    config = EngineConfig(device="cpu", dtype="float32", max_model_len=4096, max_num_seqs=16)
    engine = LLMEngine.from_model_dir(default_model_dir(), config)
    rng = random.Random(0)
    vocab = engine.config.vocab_size

    engine.generate([prompt(rng, vocab)], SHORT)  # warm-up
    engine.add_request(prompt(rng, vocab), SHORT, "short-alone")
    alone_steps, alone_times = [], []
    while engine.has_unfinished():
        start = time.perf_counter()
        outs = engine.step()
        end = time.perf_counter()
        alone_steps.append(end - start)
        alone_times += [end for out in outs if out.token_ids]

    long_params = SamplingParams(temperature=0.0, max_tokens=args.long_tokens, ignore_eos=True)
    produced = {engine.add_request(prompt(rng, vocab), long_params): 0 for _ in range(args.long)}

    def long_at() -> bool:
        return min(produced.values()) >= args.at

    before = []
    while not long_at():
        start = time.perf_counter()
        outs = engine.step()
        before.append(time.perf_counter() - start)
        for out in outs:
            if out.request_id in produced:
                produced[out.request_id] += len(out.token_ids)
    joined = engine.add_request(prompt(rng, vocab), SHORT, "short-joined")
    finished = set()

    def short_done() -> bool:
        return joined in finished

    steps, times = [], []
    while not short_done():
        start = time.perf_counter()
        outs = engine.step()
        end = time.perf_counter()
        steps.append(end - start)
        for out in outs:
            if out.request_id == joined:
                if out.token_ids:
                    times.append(end)
                if out.finished:
                    finished.add(joined)
    for rid in produced:
        engine.abort(rid)

    alone_itl = statistics.median(gaps(alone_times))
    joined_itl = statistics.median(gaps(times))
    during_step = statistics.median(steps[1:])
    print(json.dumps({
        **run_info.stamp(),
        "long": args.long,
        "long_tokens_in_when_joined": args.at,
        "alone": {
            "itl_p50_ms": 1e3 * alone_itl,
            "step_p50_ms": 1e3 * statistics.median(alone_steps),
        },
        "long_only_step_p50_ms": 1e3 * statistics.median(before[-200:]),
        "joined": {"itl_p50_ms": 1e3 * joined_itl,
                   "itl_p99_ms": 1e3 * sorted(gaps(times))[int(0.99 * (len(times) - 2))],
                   "step_p50_ms": 1e3 * during_step},
        "itl_slowdown": joined_itl / alone_itl,
        "itl_over_step_while_joined": joined_itl / during_step,
    }, indent=1))


if __name__ == "__main__":
    main()
