"""Serving speed of the whole engine: requests in, detokenized text out, one process.

    python3 bench/serving.py            # on a CUDA machine
    python3 bench/serving.py --smoke    # tiny shape on CPU (torch backends), about a minute
    python3 bench/serving.py --cases single,step,tput256   # a subset, in that order

What runs: `LLMEngine` (scheduler, KV cache manager, model runner with the Triton
backends and CUDA graphs, sampler, detokenizer, stop checks) on a gpt-oss-20b-shaped
model with random weights (bench/gpu_e2e.py's `fill_random_`: MXFP4 experts packed as in
the checkpoint, never zeros) and a byte-level BPE tokenizer of the real vocabulary size
(201,088 ids laid out like o200k_harmony: 199,998 BPE tokens, then the harmony specials
and reserved ids), so every generated id is detokenized. Requests are greedy with
ignore_eos (random weights would stop at random places otherwise).

Before any case: `LLMEngine.warm_up()` (every decode graph size captured, prefill shapes
compiled), its time printed. Then the runner alone (the same model, the runner's own CUDA
graphs, step inputs built once) gives the anchors each engine figure is set against.

Cases (each writes its rows into $OUT/serving.json as soon as it ends):
  runner   runner-alone decode step at batch 1, 256 and 512, context 1k (the anchors)
  single   one request at a time: ten 1k prompts (first vs tenth TTFT: no compile or
           capture after ready), then 8k and 32k; 256 out; TTFT and decode tok/s
  step     256 requests of 1k prompts decoding together: the engine's step time
  tput256  1k in / 1k out, 512 requests submitted at once, 256 running
  tput512  1k in / 1k out, 1,024 requests at once, 512 running
  tput1k8k 1k in / 8k out, 32 requests at once, 32 running (bounded to fit one device call)
  tput8k1k 8k in / 1k out, 128 requests at once, 128 running (likewise)
  online   Poisson arrivals at several rates, 1k in / 256 out: TTFT and ITL
           percentiles, goodput at TTFT <= 1 s and mean ITL <= 50 ms
  parity   the same greedy requests with asynchronous scheduling off, then on (prefix
           caching off, so both compute the same steps): token for token equal?
  sync     the step case again with asynchronous scheduling off (what it buys)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.util
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tandem.workers.engine.llm_engine import EngineConfig, LLMEngine, ModelFacts
from tandem.workers.engine.sampling_params import SamplingParams
from tandem.workers.model.gpt_oss import GptOssModel
from tandem.workers.model.triton_backends import make_backends
from tandem.workers.synthetic.checkpoint_writer import tiny_config
from tandem.workers.synthetic.tokenizer_training import train_tiny_tokenizer
from tandem.workers.text.tokenizer import Tokenizer, _bytes_to_unicode


def _sibling(name: str):
    """bench/<name>.py as a module. bench/ is no package and our code is imported only as
    `tandem.*` (tests/test_packaging.py), so the sibling is loaded from its path."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}",
                                                  Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# The 20b shape, random weights, runner-alone workload and floors of the runner benchmark.
_e2e = _sibling("gpu_e2e")
GPT_OSS_20B, MEASURED_BANDWIDTH, Plan, Workload = (
    _e2e.GPT_OSS_20B, _e2e.MEASURED_BANDWIDTH, _e2e.Plan, _e2e.Workload)
commit, decode_floor, fill_random_, make_runner, median_seconds, random_ids = (
    _e2e.commit, _e2e.decode_floor, _e2e.fill_random_, _e2e.make_runner, _e2e.median_seconds,
    _e2e.random_ids)

# Output tok/s, gpt-oss-20b 1k/1k, TensorRT-LLM's published max throughput (PERFORMANCE.md).
TRT_LLM_1K1K = {"H100": 11557.0, "H200": 13858.0}
TRT_LLM_1K1K_H100 = TRT_LLM_1K1K["H100"]
SLO_TTFT_S = 1.0
SLO_ITL_S = 0.050

# Named specials at these offsets after the BPE vocabulary, as in o200k_harmony (199998 +).
_NAMED_SPECIALS = {
    0: "<|startoftext|>", 1: "<|endoftext|>", 4: "<|return|>", 5: "<|constrain|>",
    7: "<|channel|>", 8: "<|start|>", 9: "<|end|>", 10: "<|message|>", 14: "<|call|>",
    20: "<|endofprompt|>",
}


def real_size_tokenizer(vocab_size: int, num_specials: int = 1090) -> Tokenizer:
    """A byte-level BPE tokenizer of exactly `vocab_size` ids: 256 byte tokens, then
    every byte pair, then byte triples, then `num_specials` special ids (the harmony ones
    at o200k_harmony's offsets, reserved ids between). Made by construction, not training:
    only the size and the decode path matter for speed."""
    num_specials = min(num_specials, vocab_size - 512)
    bpe_size = vocab_size - num_specials
    alphabet = _bytes_to_unicode()  # byte -> its ByteLevel character
    chars = [alphabet[b] for b in range(256)]
    vocab = {c: i for i, c in enumerate(chars)}
    merges: list[list[str]] = []
    pairs: list[str] = []
    for a in chars:
        for b in chars:
            if len(vocab) == bpe_size:
                break
            vocab[a + b] = len(vocab)
            merges.append([a, b])
            pairs.append(a + b)
    for pair in pairs:
        for c in chars:
            if len(vocab) == bpe_size:
                break
            vocab[pair + c] = len(vocab)
            merges.append([pair, c])
    if len(vocab) != bpe_size:
        raise ValueError(f"vocab_size {vocab_size} is beyond bytes, pairs and triples")
    spec = json.loads(train_tiny_tokenizer().to_str())  # pre-tokenizer, decoder, layout
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = merges
    spec["added_tokens"] = [
        {
            "id": bpe_size + i,
            "content": _NAMED_SPECIALS.get(i, f"<|reserved_{bpe_size + i}|>"),
            "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True,
        }
        for i in range(num_specials)
    ]
    return Tokenizer(json.dumps(spec), source=f"<constructed BPE, {vocab_size} ids>")


# ----------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class Setup:
    """Shapes and sizes of one run."""

    smoke: bool
    dtype: torch.dtype
    isl: int  # the "1k" prompt length
    osl: int  # the "1k" output length
    single_isls: tuple[int, ...]
    single_osl: int
    step_batch: int  # sequences decoding together in the step case
    step_osl: int
    tput: dict[str, tuple[int, int, int, int]]  # case -> (isl, osl, requests, running)
    online_rates: tuple[float, ...]  # requests / s
    online_requests: int
    online_osl: int
    kv_cache_tokens: int
    max_num_seqs: int
    max_num_batched_tokens: int
    runner_batches: tuple[int, ...]


FULL = Setup(
    smoke=False, dtype=torch.bfloat16, isl=1024, osl=1024, single_isls=(1024, 8192, 32768),
    single_osl=256, step_batch=256, step_osl=96,
    tput={"tput256": (1024, 1024, 512, 256), "tput512": (1024, 1024, 1024, 512),
          # bounded so that one device call holds them: fewer requests than running 256
          "tput1k8k": (1024, 8192, 32, 32), "tput8k1k": (8192, 1024, 128, 128)},
    online_rates=(4.0, 8.0, 16.0), online_requests=120, online_osl=256,
    kv_cache_tokens=1_100_000, max_num_seqs=512, max_num_batched_tokens=8192,
    runner_batches=(1, 256, 512),
)
SMOKE = Setup(
    smoke=True, dtype=torch.float32, isl=32, osl=16, single_isls=(32, 64), single_osl=8,
    step_batch=8, step_osl=4,
    tput={"tput256": (32, 16, 12, 4), "tput512": (32, 16, 16, 8),
          "tput1k8k": (32, 64, 4, 4), "tput8k1k": (64, 16, 4, 4)},
    online_rates=(20.0,), online_requests=6, online_osl=6,
    kv_cache_tokens=4096, max_num_seqs=8, max_num_batched_tokens=256, runner_batches=(1, 4),
)


def build_model(setup: Setup, device: torch.device) -> GptOssModel:
    config = tiny_config() if setup.smoke else GPT_OSS_20B
    attention, moe = make_backends("torch" if setup.smoke else "triton", device)
    model = GptOssModel(config, setup.dtype, attention, moe, device).eval()
    fill_random_(model, seed=0)
    return model


def build_engine(setup: Setup, model: GptOssModel, tokenizer: Tokenizer,
                 device: torch.device, utilization: float | None = None) -> LLMEngine:
    """utilization: size the KV cache from the GPU's memory (kv_cache_tokens None)."""
    ec = EngineConfig(
        device=str(device),
        dtype=str(setup.dtype).removeprefix("torch."),
        block_size=16,
        kv_cache_tokens=setup.kv_cache_tokens if utilization is None else None,
        gpu_memory_utilization=utilization or 0.9,
        max_num_seqs=setup.max_num_seqs,
        max_num_batched_tokens=setup.max_num_batched_tokens,
        enable_prefix_caching=True,
        async_scheduling=True,
        warm_up=False,  # run below, timed
    )
    facts = ModelFacts(
        max_model_len=model.config.max_position_embeddings,
        eos_token_ids=frozenset({tokenizer.special_id("<|return|>")}),  # ignore_eos anyway
    )
    return LLMEngine(model, model.config, tokenizer, facts, ec, device, setup.dtype)


def set_running_limit(engine: LLMEngine, limit: int) -> None:
    """The scheduler's max_num_seqs for the next case (the engine was sized for the most)."""
    engine.scheduler.config = dataclasses.replace(engine.scheduler.config, max_num_seqs=limit)


# ----------------------------------------------------------------------------- driving


@dataclass
class Trace:
    """What a client would see of one request."""

    submitted: float
    token_times: list[float] = field(default_factory=list)
    num_tokens: int = 0
    text_chars: int = 0
    finished: bool = False

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.submitted

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


@dataclass
class StepLog:
    seconds: list[float] = field(default_factory=list)
    running: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    scheduled: list[int] = field(default_factory=list)  # requests in the step planned
    tokens: list[int] = field(default_factory=list)  # tokens in it (prompt chunks + decodes)

    def split(self) -> dict:
        """Wall time of steps planned as pure decodes against steps carrying prompt tokens.
        (With asynchronous scheduling a call's wall time is mostly the step before it
        finishing on the GPU; over a whole run the sums still split the time.)"""
        decode = [s for s, n, t in zip(self.seconds, self.scheduled, self.tokens, strict=True)
                  if t == n and n > 0]
        mixed = [(s, t - n) for s, n, t in zip(self.seconds, self.scheduled, self.tokens,
                                                strict=True) if t > n]
        return {"decode_steps": len(decode), "decode_s": sum(decode),
                "decode_step_p50_s": percentile(decode, 50),
                "decode_step_mean_s": sum(decode) / max(1, len(decode)),
                "decode_rows_mean": (sum(n for n, t in zip(self.scheduled, self.tokens,
                                                           strict=True) if t == n and n > 0)
                                     / max(1, len(decode))),
                "prompt_steps": len(mixed), "prompt_s": sum(s for s, _ in mixed),
                "prompt_tokens": sum(p for _, p in mixed)}


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def drive(
    engine: LLMEngine,
    arrivals: Sequence[tuple[float, list[int], int]],
    log: StepLog | None = None,
) -> tuple[dict[str, Trace], float]:
    """Submit (offset_s, prompt, max_tokens) requests at their offsets from now and step the
    engine until all finish. Returns the traces and the wall time."""
    traces: dict[str, Trace] = {}
    pending = sorted(arrivals, key=lambda a: a[0])
    schedule = engine.scheduler.schedule
    if log is not None:
        def logged_schedule():
            out = schedule()
            log.scheduled.append(len(out.scheduled))
            log.tokens.append(sum(r.num_new_tokens for r in out.scheduled))
            return out

        engine.scheduler.schedule = logged_schedule
    try:
        return _drive(engine, pending, traces, log)
    finally:
        if log is not None:
            del engine.scheduler.schedule  # the bound method again


def _drive(engine: LLMEngine, pending: list, traces: dict[str, Trace],
           log: StepLog | None) -> tuple[dict[str, Trace], float]:
    start = time.perf_counter()
    i = 0
    while i < len(pending) or engine.has_unfinished():
        now = time.perf_counter()
        while i < len(pending) and start + pending[i][0] <= now:
            _, prompt, max_tokens = pending[i]
            request_id = engine.add_request(prompt, params(max_tokens))
            traces[request_id] = Trace(submitted=now)
            i += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, start + pending[i][0] - time.perf_counter()))
            continue
        running = engine.scheduler.num_running
        begin = time.perf_counter()
        outs = engine.step()
        end = time.perf_counter()
        if log is not None:
            log.seconds.append(end - begin)
            log.running.append(running)
            log.outputs.append(len(outs))
        for out in outs:
            trace = traces[out.request_id]
            if out.token_ids:
                trace.token_times.extend([end] * len(out.token_ids))
                trace.num_tokens += len(out.token_ids)
            trace.text_chars += len(out.text_delta)
            trace.finished = trace.finished or out.finished
    wall = time.perf_counter() - start
    unfinished = [r for r, t in traces.items() if not t.finished]
    if unfinished:
        raise RuntimeError(f"requests never finished: {unfinished[:4]}")
    return traces, wall


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summarize(traces: dict[str, Trace], wall: float) -> dict:
    ttfts = [t.ttft for t in traces.values()]
    itls = [x for t in traces.values() for x in t.itls]
    out_tokens = sum(t.num_tokens for t in traces.values())
    return {
        "requests": len(traces),
        "output_tokens": out_tokens,
        "text_chars": sum(t.text_chars for t in traces.values()),
        "wall_s": wall,
        "output_tok_s": out_tokens / wall,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": percentile(itls, 50),
        "itl_p99_s": percentile(itls, 99),
    }


def prompts(rng: random.Random, vocab: int, isl: int, n: int) -> list[list[int]]:
    # Plain BPE ids: distinct prompts, so the prefix cache never shortens a prefill.
    bpe = vocab - min(1090, vocab - 512)  # as real_size_tokenizer lays the ids out
    return [[rng.randrange(256, bpe) for _ in range(isl)] for _ in range(n)]


# ----------------------------------------------------------------------------- cases


def case_runner(setup: Setup, model: GptOssModel, device: torch.device) -> dict:
    """Runner-alone decode step times at context isl (graphs on CUDA): the anchors."""
    plan = Plan(model.config, setup.dtype, 16, setup.isl, setup.runner_batches, (setup.isl,),
                (), (), iters=5 if setup.smoke else 30)
    work = Workload(plan)
    runner = make_runner(model, work, device, graphs=device.type == "cuda")
    rows = {}
    for b in setup.runner_batches:
        step = work.decode_step(b, random_ids(model.config.vocab_size, b, seed=b))
        seconds = median_seconds(lambda step=step, runner=runner: runner.execute(step), device,
                                 plan.iters)
        floor, bound = decode_floor(model.config, b, setup.isl)
        rows[str(b)] = {"batch": b, "context": setup.isl, "step_s": seconds,
                        "tok_s": b / seconds, "roofline_tok_s": b / floor, "bound": bound}
        replay = math.nan
        graphs = runner.decode_graphs
        if graphs is not None:
            # The graph's replay alone (kernels and launch gaps, no host input fill): the
            # floor an engine step can reach by overlapping its host work.
            graph = graphs.graphs[graphs.padded_size(b)]
            replay = median_seconds(graph.replay, device, plan.iters)
        rows[str(b)]["replay_s"] = replay
        print(f"runner alone B={b} ctx {setup.isl}: {seconds * 1e3:.2f} ms/step "
              f"{b / seconds:.0f} tok/s (roofline {b / floor:.0f}); graph replay alone "
              f"{replay * 1e3:.2f} ms", flush=True)
    del runner
    return rows


def case_single(setup: Setup, engine: LLMEngine, rng: random.Random) -> dict:
    vocab = engine.config.vocab_size
    rows = []
    isls = [setup.single_isls[0]] * 10 + list(setup.single_isls[1:])
    for n, isl in enumerate(isls):
        traces, wall = drive(engine, [(0.0, prompts(rng, vocab, isl, 1)[0], setup.single_osl)])
        (t,) = traces.values()
        decode_s = t.token_times[-1] - t.token_times[0]
        row = {"index": n, "isl": isl, "osl": t.num_tokens, "ttft_s": t.ttft,
               "decode_tok_s": (t.num_tokens - 1) / decode_s if decode_s > 0 else math.nan,
               "itl_p50_s": percentile(t.itls, 50), "wall_s": wall,
               "text_chars": t.text_chars}
        rows.append(row)
        print(f"single #{n} isl {isl}: TTFT {t.ttft * 1e3:.1f} ms, decode "
              f"{row['decode_tok_s']:.1f} tok/s, ITL p50 {row['itl_p50_s'] * 1e3:.2f} ms",
              flush=True)
    return {"rows": rows}


def case_step(setup: Setup, engine: LLMEngine, rng: random.Random) -> dict:
    """`step_batch` requests decode together from context isl: the engine's step time in
    steps where every one of them decoded (no prefill in the step)."""
    set_running_limit(engine, setup.step_batch)
    vocab = engine.config.vocab_size
    arrivals = [(0.0, p, setup.step_osl)
                for p in prompts(rng, vocab, setup.isl, setup.step_batch)]
    log = StepLog()
    traces, wall = drive(engine, arrivals, log)
    full = [s for s, r, o in zip(log.seconds, log.running, log.outputs, strict=True)
            if r == setup.step_batch and o == setup.step_batch]
    row = summarize(traces, wall)
    row.update({"decode_steps": len(full), "step_p50_s": percentile(full, 50),
                "step_mean_s": sum(full) / max(1, len(full))})
    print(f"step B={setup.step_batch}: engine step p50 {row['step_p50_s'] * 1e3:.2f} ms over "
          f"{len(full)} decode steps", flush=True)
    return row


def case_tput(setup: Setup, engine: LLMEngine, rng: random.Random, name: str) -> dict:
    isl, osl, n, running = setup.tput[name]
    set_running_limit(engine, running)
    arrivals = [(0.0, p, osl) for p in prompts(rng, engine.config.vocab_size, isl, n)]
    log = StepLog()
    before = engine.metrics()
    gc_seconds = [0.0, 0]
    gc_started = [0.0]

    def gc_timer(phase: str, info: dict) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter()
        else:
            gc_seconds[0] += time.perf_counter() - gc_started[0]
            gc_seconds[1] += info["generation"] == 2

    gc.callbacks.append(gc_timer)
    try:
        traces, wall = drive(engine, arrivals, log)
    finally:
        gc.callbacks.remove(gc_timer)
    after = engine.metrics()
    row = summarize(traces, wall)
    row.update({"preemptions": after["preemptions"] - before["preemptions"],
                "pipelined_steps": after["pipelined_steps"] - before["pipelined_steps"],
                "gc_s": gc_seconds[0], "gc_full_collections": gc_seconds[1]})
    full = [s for s, r, o in zip(log.seconds, log.running, log.outputs, strict=True)
            if r == running and o == running]
    other = [s for s, r, o in zip(log.seconds, log.running, log.outputs, strict=True)
             if not (r == running and o == running)]
    # Where the wall time goes: steps where the whole batch decoded, and the rest (prefill
    # and mixed steps, partly filled batches at the tails of the waves).
    row.update({"full_decode_s": sum(full), "other_steps": len(other), "other_s": sum(other)})
    row["split"] = split = log.split()
    row.update({"isl": isl, "osl": osl, "running_limit": running,
                "full_decode_steps": len(full), "full_step_p50_s": percentile(full, 50),
                "vs_trt_llm": row["output_tok_s"] / TRT_LLM_1K1K_H100,
                "vs_trt_llm_h200": row["output_tok_s"] / TRT_LLM_1K1K["H200"]})
    print(f"{name} {isl}/{osl} x{n} running {running}: {row['output_tok_s']:.0f} output tok/s "
          f"({row['vs_trt_llm']:.1%} of TRT-LLM), TTFT p50 {row['ttft_p50_s']:.2f} s, "
          f"ITL p50 {row['itl_p50_s'] * 1e3:.1f} p99 {row['itl_p99_s'] * 1e3:.1f} ms, "
          f"full-batch step p50 {row['full_step_p50_s'] * 1e3:.2f} ms; {len(full)} full-batch "
          f"steps {sum(full):.1f} s, {len(other)} other steps {sum(other):.1f} s", flush=True)
    print(f"  planned as pure decode: {split['decode_steps']} steps {split['decode_s']:.1f} s "
          f"(p50 {split['decode_step_p50_s'] * 1e3:.2f} ms, mean "
          f"{split['decode_step_mean_s'] * 1e3:.2f} ms, {split['decode_rows_mean']:.0f} rows); "
          f"with prompt tokens: {split['prompt_steps']} steps {split['prompt_s']:.1f} s, "
          f"{split['prompt_tokens']} prompt tokens; {row['preemptions']:.0f} preemptions, "
          f"{row['pipelined_steps']:.0f} pipelined steps, GC {row['gc_s']:.2f} s "
          f"({row['gc_full_collections']} full)", flush=True)
    return row


def case_parity(setup: Setup, engine: LLMEngine, rng: random.Random) -> dict:
    set_running_limit(engine, setup.step_batch)
    batch = prompts(rng, engine.config.vocab_size, setup.isl, setup.step_batch // 4)
    runs = {}
    caching = engine.kv.enable_prefix_caching
    engine.kv.enable_prefix_caching = False
    try:
        for mode in (False, True):
            engine.async_scheduling = mode
            done = engine.generate(batch, params(setup.step_osl * 2))
            runs[mode] = [c.token_ids for c in done]
    finally:
        engine.async_scheduling = True
        engine.kv.enable_prefix_caching = caching
    same = sum(a == b for a, b in zip(runs[False], runs[True], strict=True))
    row = {"requests": len(batch), "tokens_each": setup.step_osl * 2, "identical": same}
    print(f"parity async vs sync: {same}/{len(batch)} requests token for token equal",
          flush=True)
    return row


def case_sync_step(setup: Setup, engine: LLMEngine, rng: random.Random) -> dict:
    engine.async_scheduling = False
    try:
        return case_step(setup, engine, rng)
    finally:
        engine.async_scheduling = True


def case_online(setup: Setup, engine: LLMEngine, rng: random.Random) -> dict:
    set_running_limit(engine, setup.max_num_seqs)
    rows = []
    for rate in setup.online_rates:
        offsets, t = [], 0.0
        for _ in range(setup.online_requests):
            t += rng.expovariate(rate)
            offsets.append(t)
        ps = prompts(rng, engine.config.vocab_size, setup.isl, setup.online_requests)
        arrivals = [(o, p, setup.online_osl) for o, p in zip(offsets, ps, strict=True)]
        traces, wall = drive(engine, arrivals)
        row = summarize(traces, wall)
        good = [tr for tr in traces.values() if tr.ttft <= SLO_TTFT_S
                and (not tr.itls or sum(tr.itls) / len(tr.itls) <= SLO_ITL_S)]
        row.update({"rate_req_s": rate, "goodput_req_s": len(good) / wall,
                    "slo_attained": len(good) / len(traces)})
        rows.append(row)
        print(f"online {rate:.0f} req/s: TTFT p50 {row['ttft_p50_s'] * 1e3:.0f} p99 "
              f"{row['ttft_p99_s'] * 1e3:.0f} ms, ITL p50 {row['itl_p50_s'] * 1e3:.1f} p99 "
              f"{row['itl_p99_s'] * 1e3:.1f} ms, goodput {row['goodput_req_s']:.2f} req/s "
              f"({row['slo_attained']:.0%} within SLO)", flush=True)
    return {"rows": rows}


# ----------------------------------------------------------------------------- main


def _rows_bucket(num_tokens: int, top_k: int, num_experts: int) -> int:
    """MoETiling.for_batch's size classes: rows per expert <= 16, <= 32, <= 128, more."""
    rows = -(-num_tokens * top_k // num_experts)
    return next((i for i, bound in enumerate((16, 32, 128)) if rows <= bound), 3)


def apply_moe_tilings(path: str) -> dict:
    """Use the grouped-GEMM tilings of `path` ({T: MoETiling fields}, as
    bench/gpu_moe_sweep.py --write-tilings writes them) for every batch of T's size class."""
    from tandem.kernels import moe as moe_kernels

    table = {int(t): moe_kernels.MoETiling(**fields)
             for t, fields in json.loads(Path(path).read_text()).items()}
    original = moe_kernels.MoETiling.for_batch

    def for_batch(num_tokens: int, top_k: int, num_experts: int):
        for tokens, tiling in table.items():
            if (2 * num_tokens * top_k > num_experts
                    and _rows_bucket(tokens, top_k, num_experts)
                    == _rows_bucket(num_tokens, top_k, num_experts)):
                return tiling
        return original(num_tokens, top_k, num_experts)

    moe_kernels.MoETiling.for_batch = staticmethod(for_batch)
    print(f"MoE tilings from {path}: {table}", flush=True)
    return {str(t): str(v) for t, v in table.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="size the KV cache from GPU memory instead of the fixed 1.1M tokens")
    parser.add_argument("--moe-tilings", default=None,
                        help="grouped-GEMM tilings to use (bench/gpu_moe_sweep.py "
                             "--write-tilings): {T: MoETiling fields}")
    parser.add_argument("--cases",
                        default="runner,single,step,sync,parity,tput256,tput512,online")
    args = parser.parse_args()
    setup = SMOKE if args.smoke else FULL
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --smoke on CPU")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    bandwidth = next((r for chip, r in MEASURED_BANDWIDTH.items() if chip in name), None)
    result: dict = {"device": name, "date": datetime.date.today().isoformat(),
                    "commit": commit(), "torch": torch.__version__, "bandwidth": bandwidth,
                    "setup": {k: str(v) for k, v in dataclasses.asdict(setup).items()},
                    "cases": {}}
    out_dir = os.environ.get("OUT")

    def save() -> None:
        if out_dir:
            Path(out_dir, "serving.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"device {name}; torch {torch.__version__}; commit {result['commit']}", flush=True)
    if args.moe_tilings and Path(args.moe_tilings).exists():
        result["moe_tilings"] = apply_moe_tilings(args.moe_tilings)
    started = time.perf_counter()
    model = build_model(setup, device)
    tokenizer = real_size_tokenizer(model.config.vocab_size)
    print(f"model and tokenizer ({tokenizer.vocab_size} ids) in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    cases = args.cases.split(",")
    if "runner" in cases:
        result["cases"]["runner"] = case_runner(setup, model, device)
        save()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    begin = time.perf_counter()
    engine = build_engine(setup, model, tokenizer, device, args.gpu_memory_utilization)
    ready = engine.warm_up()
    result["time_to_ready_s"] = ready
    result["engine_build_s"] = time.perf_counter() - begin - ready
    result["kv_cache_tokens"] = engine.kv_cache_tokens
    result["gc_tracked_after_ready"] = len(gc.get_objects())
    result["gc_frozen_after_ready"] = gc.get_freeze_count()
    print(f"gc: {result['gc_tracked_after_ready']} objects tracked, "
          f"{result['gc_frozen_after_ready']} frozen after ready", flush=True)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info()
        result["gpu_free_after_ready_gib"] = free / 2**30
        print(f"kv cache {engine.kv_cache_tokens} tokens; {free / 2**30:.1f} of "
              f"{total / 2**30:.1f} GiB free after warm-up", flush=True)
    save()
    rng = random.Random(0)
    runs: dict[str, Callable[[], dict]] = {
        "single": lambda: case_single(setup, engine, rng),
        "step": lambda: case_step(setup, engine, rng),
        "tput256": lambda: case_tput(setup, engine, rng, "tput256"),
        "tput512": lambda: case_tput(setup, engine, rng, "tput512"),
        "tput1k8k": lambda: case_tput(setup, engine, rng, "tput1k8k"),
        "tput8k1k": lambda: case_tput(setup, engine, rng, "tput8k1k"),
        "online": lambda: case_online(setup, engine, rng),
        "parity": lambda: case_parity(setup, engine, rng),
        "sync": lambda: case_sync_step(setup, engine, rng),
    }
    for case in cases:
        if case == "runner":
            continue
        try:
            result["cases"][case] = runs[case]()
        except Exception as error:  # the other cases' figures stand without this one
            result["cases"][case] = {"error": repr(error)}
            print(f"case {case} failed: {error!r}", flush=True)
            if args.smoke:
                raise
        save()
    result["total_s"] = time.perf_counter() - started
    save()
    report(result)


def report(result: dict) -> None:
    """A short table of the figures the acceptance points compare."""
    cases = result["cases"]
    runner = cases.get("runner", {})
    print(f"\ntime to ready {result.get('time_to_ready_s', math.nan):.1f} s")
    single = cases.get("single", {}).get("rows", [])
    if single and "1" in runner:
        first, tenth = single[0], single[min(9, len(single) - 1)]
        ratio = first["decode_tok_s"] / runner["1"]["tok_s"]
        print(f"one request isl {first['isl']}: {first['decode_tok_s']:.1f} tok/s decode vs runner "
              f"B=1 {runner['1']['tok_s']:.1f} ({ratio:.1%});"
              f" TTFT first {first['ttft_s'] * 1e3:.1f} ms, tenth {tenth['ttft_s'] * 1e3:.1f} ms "
              f"({first['ttft_s'] / tenth['ttft_s']:.2f}x)")
    batch = next((k for k in runner if k not in ("1",)), None)
    for name in ("step", "sync"):
        step = cases.get(name, {})
        if "step_p50_s" in step and batch is not None:
            ratio = step["step_p50_s"] / runner[batch]["step_s"]
            print(f"engine step ({name}) at {batch} running {step['step_p50_s'] * 1e3:.2f} ms "
                  f"vs runner {runner[batch]['step_s'] * 1e3:.2f} ms ({ratio:.2f}x), vs its "
                  f"graph replay alone {runner[batch]['replay_s'] * 1e3:.2f} ms "
                  f"({step['step_p50_s'] / runner[batch]['replay_s']:.2f}x)")
    if "identical" in cases.get("parity", {}):
        parity = cases["parity"]
        print(f"parity: {parity['identical']}/{parity['requests']} requests equal")
    for name in ("tput256", "tput512", "tput1k8k", "tput8k1k"):
        row = cases.get(name, {})
        if "output_tok_s" in row:
            print(f"{name}: {row['output_tok_s']:.0f} output tok/s ({row['vs_trt_llm']:.1%} of "
                  f"TRT-LLM's H100 11,557, {row['vs_trt_llm_h200']:.1%} of its H200 13,858)")


if __name__ == "__main__":
    main()
