"""End-to-end model speed on one GPU at gpt-oss-20b shapes, beside transformers.

    python3 bench/gpu_e2e.py            # on a CUDA machine (~13 GB + ~42 GB peer)
    python3 bench/gpu_e2e.py --smoke    # tiny shape on CPU (Triton interpreter)
    python3 bench/gpu_e2e.py --no-peer  # skip transformers
    python3 bench/gpu_e2e.py --profile --check-fp32   # also: kernel time per
                                                     # name; Triton vs torch in fp32

Our side runs through the engine's ModelRunner (host-side step inputs, the model with the
Triton backends, logits of the sampled rows; no sampler): decode steps with B sequences at
a context of C tokens, eager and replayed from the runner's CUDA graphs, and whole-prompt
prefill steps. The weights are random but shaped and packed like the checkpoint (MXFP4
experts as uint8 blocks and E8M0 scales, never zeros), built directly in GPU memory; the
KV cache is filled with random values. Correctness first: the graph replay is compared
with the eager step, and the Triton backends with the torch references on one decode step.

The peer is transformers' GptOssForCausalLM at the same shape (bf16 experts: it has no
MXFP4 kernels here, eager attention), random weights, its DynamicCache pre-filled with C
random positions; it runs after ours is freed.

Each figure is set beside its roofline: the larger of bytes / bandwidth (weights read once
per step: attention, router, unembedding and the experts the batch is expected to touch,
plus the KV it reads) and FLOPs / matrix rate. H100 figures measured on this workplace:
3.0 TB/s copy, 790 TFLOP/s dense bf16 (shared/PERFORMANCE.md). With $OUT set, the rows go
to $OUT/gpu_e2e.json.

--check-fp32 runs the Triton-vs-torch check once more in float32 (a 300-token prefill and
one decode step): bf16 rounding, compounded over 24 random layers, moves the bf16 logits
far more than any kernel difference, and the fp32 figure separates the two. --profile
lists device time per kernel name of one decode and one prefill step.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

from tandem.workers.engine.runner import ModelRunner  # noqa: E402
from tandem.workers.engine.scheduler import ScheduledRequest, SchedulerOutput  # noqa: E402
from tandem.workers.model.attention import TorchPagedAttention  # noqa: E402
from tandem.workers.model.config import FULL, SLIDING, GptOssConfig  # noqa: E402
from tandem.workers.model.gpt_oss import GptOssModel  # noqa: E402
from tandem.workers.model.moe import TorchMoE  # noqa: E402
from tandem.workers.model.triton_backends import TritonMoE, TritonPagedAttention  # noqa: E402
from tandem.workers.synthetic.checkpoint_writer import hf_config_dict, tiny_config  # noqa: E402

BANDWIDTH = 3.0e12  # bytes/s, H100 device-to-device copy measured on this workplace
MATMUL_RATE = 790e12  # FLOP/s, dense bf16 on random data

GPT_OSS_20B = tiny_config(
    vocab_size=201088,
    hidden_size=2880,
    intermediate_size=2880,
    num_hidden_layers=24,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=64,
    num_local_experts=32,
    num_experts_per_tok=4,
    sliding_window=128,
    layer_types=tuple(SLIDING if i % 2 == 0 else FULL for i in range(24)),
    max_position_embeddings=131072,
    eos_token_id=200002,
    pad_token_id=199999,
)

GPT_OSS_120B = tiny_config(
    **{
        name: getattr(GPT_OSS_20B, name)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "num_experts_per_tok", "sliding_window",
                     "max_position_embeddings", "eos_token_id", "pad_token_id")
    },
    num_hidden_layers=36,
    num_local_experts=128,
    layer_types=tuple(SLIDING if i % 2 == 0 else FULL for i in range(36)),
)
MEASURED_BANDWIDTH = {"H100": 3.0e12, "H200": 4.3e12}
"""Device-to-device copy rates measured on this workplace (shared/PERFORMANCE.md)."""


@dataclass(frozen=True)
class Plan:
    """What one run measures."""

    config: GptOssConfig
    dtype: torch.dtype
    block_size: int
    context: int
    # context of every decode sequence (tokens already cached)
    decode_batches: tuple[int, ...]
    prefill_lengths: tuple[int, ...]
    peer_decode_batches: tuple[int, ...]
    peer_prefill_lengths: tuple[int, ...]
    iters: int
    # timed repetitions per case (median taken)


FULL_PLAN = Plan(
    GPT_OSS_20B, torch.bfloat16, 16, 1024, (1, 64, 256), (2048, 8192), (1, 64), (2048,), 20
)
SMOKE_PLAN = Plan(tiny_config(), torch.float32, 8, 32, (1, 4), (64,), (1, 4), (64,), 1)


@dataclass
class Row:
    """One measured case; tok/s figures are NaN where not run."""

    case: str
    batch: int
    tokens_per_step: int
    ours_eager_tok_s: float
    ours_graph_tok_s: float
    peer_tok_s: float
    roofline_tok_s: float
    bound: str  # which floor is larger: "memory" or "compute"

    @property
    def best(self) -> float:
        values = [v for v in (self.ours_eager_tok_s, self.ours_graph_tok_s) if not math.isnan(v)]
        return max(values) if values else math.nan


# ----------------------------------------------------------------------------- floors


def bf16_bytes(*shape: int) -> float:
    return 2.0 * math.prod(shape)


def expert_bytes(c: GptOssConfig) -> float:
    """One expert of one layer: packed gate_up and down (half a byte per weight plus one
    scale byte per 32) and the bf16 biases."""
    weights = 2 * c.intermediate_size * c.hidden_size + c.hidden_size * c.intermediate_size
    return weights / 2 + weights / 32 + bf16_bytes(2 * c.intermediate_size + c.hidden_size)


def dense_bytes(c: GptOssConfig) -> float:
    """Weights every step reads whole: attention, routers, norms, unembedding."""
    d, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attention = bf16_bytes(q + 2 * kv, d) + bf16_bytes(d, q) + bf16_bytes(q + 2 * kv + d)
    router = bf16_bytes(c.num_local_experts, d + 1)
    per_layer = attention + router + bf16_bytes(c.num_attention_heads) + bf16_bytes(2 * d)
    return c.num_hidden_layers * per_layer + bf16_bytes(c.vocab_size, d)


def active_flops_per_token(c: GptOssConfig) -> float:
    """2 x the weights a token multiplies (attention projections, router, k experts, head)."""
    d, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    expert = 3 * c.intermediate_size * d
    per_layer = (q + 2 * kv) * d + d * q + c.num_local_experts * d + c.num_experts_per_tok * expert
    return 2.0 * (c.num_hidden_layers * per_layer + c.vocab_size * d)


def kv_bytes_per_position(c: GptOssConfig) -> float:
    return bf16_bytes(2, c.num_key_value_heads, c.head_dim)


def decode_floor(c: GptOssConfig, batch: int, context: int) -> tuple[float, str]:
    """Seconds per decode step of `batch` sequences at `context` cached tokens."""
    layers_full = sum(t == FULL for t in c.layer_types)
    layers_sliding = c.num_hidden_layers - layers_full
    visible_sliding = min(context + 1, c.sliding_window)
    # Experts touched in a layer, routing taken as uniform: E (1 - (1 - k/E)^B).
    touched = c.num_local_experts * (1 - (1 - c.num_experts_per_tok / c.num_local_experts) ** batch)
    kv = (
        batch
        * kv_bytes_per_position(c)
        * (layers_full * (context + 1) + layers_sliding * visible_sliding)
    )
    total_bytes = dense_bytes(c) + c.num_hidden_layers * touched * expert_bytes(c) + kv
    attention_flops = (
        4.0
        * c.num_attention_heads
        * c.head_dim
        * (layers_full * (context + 1) + layers_sliding * visible_sliding)
    )
    flops = batch * (active_flops_per_token(c) + attention_flops)
    memory_s, compute_s = total_bytes / BANDWIDTH, flops / MATMUL_RATE
    return max(memory_s, compute_s), "memory" if memory_s >= compute_s else "compute"


def prefill_floor(c: GptOssConfig, length: int) -> tuple[float, str]:
    """Seconds for one whole prompt of `length` tokens (every expert read once)."""
    layers_full = sum(t == FULL for t in c.layer_types)
    layers_sliding = c.num_hidden_layers - layers_full
    total_bytes = (
        dense_bytes(c)
        + c.num_hidden_layers * c.num_local_experts * expert_bytes(c)
        + length * kv_bytes_per_position(c) * c.num_hidden_layers
    )
    pairs_full = length * (length + 1) / 2  # causal (query, key) pairs
    window = c.sliding_window
    pairs_sliding = sum(min(p + 1, window) for p in range(length))
    attention_flops = (
        4.0
        * c.num_attention_heads
        * c.head_dim
        * (layers_full * pairs_full + layers_sliding * pairs_sliding)
    )
    flops = length * active_flops_per_token(c) + attention_flops
    memory_s, compute_s = total_bytes / BANDWIDTH, flops / MATMUL_RATE
    return max(memory_s, compute_s), "memory" if memory_s >= compute_s else "compute"


# ----------------------------------------------------------------------------- timing


def median_seconds(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Median of `iters` timed calls after two warm-ups (CUDA events on a GPU)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]


def errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max abs error / max |expected|, rms error / rms expected); non-finite -> inf."""
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return math.inf, math.inf
    diff = a - e
    return (
        (diff.abs().max() / e.abs().max()).item(),
        (diff.pow(2).mean().sqrt() / e.pow(2).mean().sqrt()).item(),
    )


# ----------------------------------------------------------------------------- our model


@torch.no_grad()
def fill_random_(module: torch.nn.Module, seed: int) -> None:
    """Random weights of checkpoint-like scale: packed experts get every nibble value and
    scales 2^-8..2^-6 (dot products of a few units); norms near 1; sinks near 1."""
    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dtype == torch.uint8:
            high = 256 if name.endswith("blocks") else 122
            low = 0 if name.endswith("blocks") else 119
            p.copy_(torch.randint(low, high, p.shape, generator=gen, device=p.device))
            continue
        noise = torch.randn(p.shape, generator=gen, device=p.device)
        if "norm" in name:
            p.copy_(1.0 + 0.1 * noise)
        elif "sinks" in name:
            p.copy_(1.0 + noise)
        elif p.dim() == 1 or "bias" in name:
            p.copy_(0.1 * noise)
        elif "embed" in name:
            p.copy_(noise)
        else:
            # Dense [out, in] (ours) or expert [E, in, out] (transformers): unit-scale outputs.
            fan_in = p.shape[-1] if p.dim() == 2 else p.shape[-2]
            p.copy_(noise / math.sqrt(fan_in))


class Workload:
    """Block layout of the benchmark's sequences, as the scheduler would hand them out.

    Sequence b of a decode batch owns full-group blocks [b * F, (b + 1) * F) and
    sliding-group blocks [b * S, (b + 1) * S); sliding entries wholly before the window
    are -1 (released), as in the engine. A prefill uses blocks from 0 in both groups.
    """

    def __init__(self, plan: Plan) -> None:
        c, bs = plan.config, plan.block_size
        self.plan = plan
        self.full_per_seq = -(-(plan.context + 1) // bs)
        self.sliding_per_seq = -(-c.sliding_window // bs) + 2
        max_batch = max(plan.decode_batches)
        longest = -(-max(plan.prefill_lengths) // bs)
        self.blocks = []
        for spec in c.kv_groups:
            per_seq = self.full_per_seq if spec.sliding_window is None else self.sliding_per_seq
            self.blocks.append(max(max_batch * per_seq, longest))

    def decode_step(self, batch: int, token_ids: list[int]) -> SchedulerOutput:
        bs, context = self.plan.block_size, self.plan.context
        scheduled = []
        for b in range(batch):
            tables = []
            for spec in self.plan.config.kv_groups:
                if spec.sliding_window is None:
                    tables.append([b * self.full_per_seq + i for i in range(self.full_per_seq)])
                    continue
                first = max(0, context - spec.sliding_window + 1) // bs
                live = range(self.full_per_seq - first)
                tables.append([-1] * first + [b * self.sliding_per_seq + i for i in live])
            scheduled.append(self._request(f"d{b}", [token_ids[b]], context, tables))
        return SchedulerOutput(scheduled=scheduled)

    def prefill_step(self, token_ids: list[int]) -> SchedulerOutput:
        n_blocks = -(-len(token_ids) // self.plan.block_size)
        tables = [list(range(n_blocks)) for _ in self.plan.config.kv_groups]
        return SchedulerOutput(scheduled=[self._request("p", token_ids, 0, tables)])

    @staticmethod
    def _request(
        request_id: str, token_ids: list[int], start: int, tables: list[list[int]]
    ) -> ScheduledRequest:
        return ScheduledRequest(
            request_id=request_id,
            token_ids=token_ids,
            start_position=start,
            num_new_tokens=len(token_ids),
            block_tables=tables,
            slot_ids=[[] for _ in tables],  # the runner derives slots from the tables
            needs_sample=True,
            is_new=start == 0,
            num_cached_tokens=start,
        )


def random_ids(vocab: int, n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


def make_runner(model: GptOssModel, work: Workload, device: torch.device, graphs: bool):
    plan = work.plan
    sizes = tuple(plan.decode_batches) if graphs else ()
    runner = ModelRunner(
        model, work.blocks, plan.block_size, device, plan.dtype, cuda_graph_sizes=sizes
    )
    gen = torch.Generator(device=device).manual_seed(7)
    for key, value in runner.kv_caches:
        key.copy_(torch.randn(key.shape, generator=gen, device=device))
        value.copy_(torch.randn(value.shape, generator=gen, device=device))
    return runner


def bench_ours(plan: Plan, device: torch.device, rows: dict[str, Row], notes: list[str]) -> None:
    c = plan.config
    model = GptOssModel(c, plan.dtype, TritonPagedAttention(), TritonMoE(), device).eval()
    fill_random_(model, seed=0)
    work = Workload(plan)
    decode_inputs = {
        b: work.decode_step(b, random_ids(c.vocab_size, b, seed=b)) for b in plan.decode_batches
    }
    eager_logits = bench_eager(model, work, decode_inputs, device, rows, notes)
    gc.collect()  # the eager runner's KV cache goes before the graphed runner's comes
    if device.type == "cuda":
        try:
            bench_graphs(model, work, decode_inputs, eager_logits, device, rows, notes)
        except Exception as error:  # eager figures stand without the graph rows
            notes.append(f"CUDA graph decode failed: {error!r}")
            print(notes[-1], flush=True)


def bench_eager(
    model: GptOssModel,
    work: Workload,
    decode_inputs: dict[int, SchedulerOutput],
    device: torch.device,
    rows: dict[str, Row],
    notes: list[str],
) -> dict[int, torch.Tensor]:
    """Eager decode and prefill rows; returns each decode batch's logits for the graph check."""
    plan, c = work.plan, work.plan.config
    runner = make_runner(model, work, device, graphs=False)
    # Correctness first: Triton against the torch references on one decode step.
    first = plan.decode_batches[0]
    triton_logits = runner.execute(decode_inputs[first])
    model.set_backends(TorchPagedAttention(), TorchMoE())
    torch_logits = runner.execute(decode_inputs[first])
    model.set_backends(TritonPagedAttention(), TritonMoE())
    max_err, rms_err = errors(triton_logits, torch_logits)
    same = torch.equal(triton_logits.argmax(-1), torch_logits.argmax(-1))
    notes.append(
        f"check triton vs torch backends, decode B={first}: max {max_err:.2e} "
        f"rms {rms_err:.2e}, argmax {'same' if same else 'DIFFERS'}"
    )
    print(notes[-1], flush=True)

    for b, step in decode_inputs.items():
        seconds = median_seconds(lambda step=step: runner.execute(step), device, plan.iters)
        floor, bound = decode_floor(c, b, plan.context)
        rows[f"decode B={b}"] = Row(
            case=f"decode B={b} ctx {plan.context}",
            batch=b,
            tokens_per_step=b,
            ours_eager_tok_s=b / seconds,
            ours_graph_tok_s=math.nan,
            peer_tok_s=math.nan,
            roofline_tok_s=b / floor,
            bound=bound,
        )
        print(f"ours eager decode B={b}: {seconds * 1e3:.2f} ms/step", flush=True)
    eager_logits = {b: runner.execute(step) for b, step in decode_inputs.items()}
    for length in plan.prefill_lengths:
        step = work.prefill_step(random_ids(c.vocab_size, length, seed=length))
        iters = max(1, plan.iters // 4)
        seconds = median_seconds(lambda step=step: runner.execute(step), device, iters)
        floor, bound = prefill_floor(c, length)
        rows[f"prefill {length}"] = Row(
            case=f"prefill {length}",
            batch=1,
            tokens_per_step=length,
            ours_eager_tok_s=length / seconds,
            ours_graph_tok_s=math.nan,
            peer_tok_s=math.nan,
            roofline_tok_s=length / floor,
            bound=bound,
        )
        print(f"ours prefill {length}: {seconds * 1e3:.2f} ms", flush=True)
    return eager_logits


def bench_graphs(
    model: GptOssModel,
    work: Workload,
    decode_inputs: dict[int, SchedulerOutput],
    eager_logits: dict[int, torch.Tensor],
    device: torch.device,
    rows: dict[str, Row],
    notes: list[str],
) -> None:
    """Decode rows replayed from the runner's CUDA graphs, each first checked against eager
    (same KV cache contents: both runners fill theirs from one seed)."""
    runner = make_runner(model, work, device, graphs=True)
    for b, step in decode_inputs.items():
        logits = runner.execute(step)  # captures this size
        max_err, rms_err = errors(logits, eager_logits[b])
        same = torch.equal(logits.argmax(-1), eager_logits[b].argmax(-1))
        notes.append(
            f"check graph vs eager decode B={b}: max {max_err:.2e} rms {rms_err:.2e}, "
            f"argmax {'same' if same else 'DIFFERS'}"
        )
        print(notes[-1], flush=True)
        seconds = median_seconds(lambda step=step: runner.execute(step), device, work.plan.iters)
        rows[f"decode B={b}"].ours_graph_tok_s = b / seconds
        print(f"ours graph decode B={b}: {seconds * 1e3:.2f} ms/step", flush=True)


def check_fp32(plan: Plan, device: torch.device, notes: list[str]) -> None:
    """Triton against torch backends in float32 at the plan's shape: a prompt longer than
    two windows, then one decode step."""
    c, bs = plan.config, plan.block_size
    model = GptOssModel(c, torch.float32, TritonPagedAttention(), TritonMoE(), device).eval()
    fill_random_(model, seed=0)
    length = 2 * c.sliding_window + 44
    n_blocks = -(-(length + 1) // bs)
    runner = ModelRunner(
        model, [n_blocks] * len(c.kv_groups), bs, device, torch.float32, cuda_graph_sizes=()
    )
    prompt = random_ids(c.vocab_size, length + 1, seed=9)
    tables = [list(range(n_blocks)) for _ in c.kv_groups]
    steps = [
        SchedulerOutput([Workload._request("c", prompt[:length], 0, tables)]),
        SchedulerOutput([Workload._request("c", prompt[length:], length, tables)]),
    ]
    results = {}
    for name, attention, moe in (
        ("triton", TritonPagedAttention(), TritonMoE()),
        ("torch", TorchPagedAttention(), TorchMoE()),
    ):
        model.set_backends(attention, moe)
        results[name] = [runner.execute(step) for step in steps]
    for label, got, want in zip(
        ("prefill", "decode"), results["triton"], results["torch"], strict=True
    ):
        max_err, rms_err = errors(got, want)
        same = torch.equal(got.argmax(-1), want.argmax(-1))
        notes.append(
            f"check fp32 triton vs torch backends, {label} ({length} tokens): "
            f"max {max_err:.2e} rms {rms_err:.2e}, argmax {'same' if same else 'DIFFERS'}"
        )
        print(notes[-1], flush=True)


def profile_steps(plan: Plan, device: torch.device, notes: list[str]) -> None:
    """Device time per kernel name of one eager decode step (batch 1) and one prefill of the
    shortest prompt: where a step's time goes, launch gaps excluded."""
    c = plan.config
    model = GptOssModel(c, plan.dtype, TritonPagedAttention(), TritonMoE(), device).eval()
    fill_random_(model, seed=0)
    work = Workload(plan)
    runner = make_runner(model, work, device, graphs=False)
    steps = {
        "decode batch 1": work.decode_step(1, random_ids(c.vocab_size, 1, seed=1)),
        f"prefill {plan.prefill_lengths[0]}": work.prefill_step(
            random_ids(c.vocab_size, plan.prefill_lengths[0], seed=2)),
    }
    for name, step in steps.items():
        for _ in range(3):
            runner.execute(step)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            runner.execute(step)
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        total = sum(e.self_device_time_total for e in events)
        launches = sum(e.count for e in events)
        notes.append(f"profile {name}: {total / 1e3:.2f} ms of kernels in {launches} launches")
        print(notes[-1], flush=True)
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:16]:
            line = (f"  {e.self_device_time_total / 1e3:8.3f} ms {e.count:5d}x "
                    f"{e.key[:90]}")
            notes.append(line)
            print(line, flush=True)
    del runner, model


# ----------------------------------------------------------------------------- the peer


def bench_transformers(
    plan: Plan, device: torch.device, rows: dict[str, Row], notes: list[str]
) -> None:
    from transformers import DynamicCache, GptOssForCausalLM
    from transformers import GptOssConfig as HFGptOssConfig

    c = plan.config
    hf_dict = hf_config_dict(c)
    hf_dict.pop("quantization_config")  # bf16 experts: no MXFP4 kernels for it here
    hf_config = HFGptOssConfig(**hf_dict)
    hf_config._attn_implementation = "eager"
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(plan.dtype)
    try:
        with torch.device(device):
            model = GptOssForCausalLM(hf_config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    fill_random_(model, seed=1)
    gen = torch.Generator(device=device).manual_seed(3)

    def filled_cache(batch: int) -> DynamicCache:
        cache = DynamicCache(config=hf_config)
        shape = (batch, c.num_key_value_heads, plan.context, c.head_dim)
        for layer in range(c.num_hidden_layers):
            key = torch.randn(shape, generator=gen, device=device).to(plan.dtype)
            value = torch.randn(shape, generator=gen, device=device).to(plan.dtype)
            cache.update(key, value, layer)
        return cache

    with torch.inference_mode():
        for b in plan.peer_decode_batches:
            cache = filled_cache(b)
            ids = torch.randint(0, c.vocab_size, (b, 1), generator=gen, device=device)

            def decode(cache=cache, ids=ids) -> torch.Tensor:
                return model(input_ids=ids, past_key_values=cache, use_cache=True).logits

            iters = max(1, min(plan.iters, 10 if b == 1 else 5))
            seconds = median_seconds(decode, device, iters)
            key = f"decode B={b}"
            if key in rows:
                rows[key].peer_tok_s = b / seconds
            print(f"transformers decode B={b}: {seconds * 1e3:.2f} ms/step", flush=True)
            del cache
        for length in plan.peer_prefill_lengths:
            ids = torch.randint(0, c.vocab_size, (1, length), generator=gen, device=device)

            def prefill(ids=ids) -> torch.Tensor:
                return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

            seconds = median_seconds(prefill, device, max(1, plan.iters // 5))
            key = f"prefill {length}"
            if key in rows:
                rows[key].peer_tok_s = length / seconds
            print(f"transformers prefill {length}: {seconds * 1e3:.2f} ms", flush=True)
    notes.append("peer: transformers GptOssForCausalLM, bf16 experts, eager attention")


# ----------------------------------------------------------------------------- report


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        print(f"GPU memory in use after freeing: {torch.cuda.memory_allocated() / 1e9:.1f} GB")


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'case':<22} {'eager tok/s':>12} {'graph tok/s':>12} {'transformers':>13} "
        f"{'roofline':>10} {'bound':>7} {'ours/roof':>9} {'ours/peer':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        best = r.best
        print(
            f"{r.case:<22} {r.ours_eager_tok_s:>12.1f} {r.ours_graph_tok_s:>12.1f} "
            f"{r.peer_tok_s:>13.1f} {r.roofline_tok_s:>10.0f} {r.bound:>7} "
            f"{best / r.roofline_tok_s:>9.1%} {best / r.peer_tok_s:>8.1f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU")
    parser.add_argument("--no-peer", action="store_true", help="skip transformers")
    parser.add_argument("--check-fp32", action="store_true", help="fp32 Triton-vs-torch check")
    parser.add_argument("--profile", action="store_true", help="kernel times of one step")
    parser.add_argument("--model", choices=("20b", "120b"), default="20b",
                        help="gpt-oss shape (120b needs an H200's memory)")
    args = parser.parse_args()
    plan = SMOKE_PLAN if args.smoke else FULL_PLAN
    if args.model == "120b" and not args.smoke:
        plan = dataclasses.replace(plan, config=GPT_OSS_120B)
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --smoke on CPU")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"
    global BANDWIDTH
    BANDWIDTH = next((rate for chip, rate in MEASURED_BANDWIDTH.items() if chip in name),
                     BANDWIDTH)
    import triton

    print(
        f"device {name}; torch {torch.__version__}, triton {triton.__version__}; commit {commit()}",
        flush=True,
    )
    rows: dict[str, Row] = {}
    notes: list[str] = []
    started = time.perf_counter()
    if args.check_fp32:
        check_fp32(plan, device, notes)
        free_memory(device)
    bench_ours(plan, device, rows, notes)
    free_memory(device)
    if not args.no_peer:
        try:
            bench_transformers(plan, device, rows, notes)
        except Exception as error:  # the peer is a comparison; our figures stand without it
            notes.append(f"transformers peer failed: {error!r}")
            print(notes[-1], flush=True)
        free_memory(device)
    if args.profile and device.type == "cuda":
        # last: once the profiler has run, CUDA-graph decode steps here measured 10% slower
        # (2.83 -> 3.12 ms at batch 1, same code and machine)
        profile_steps(plan, device, notes)
        free_memory(device)
    print(f"total {time.perf_counter() - started:.0f} s\n")
    for note in notes:
        print(note)
    print_table(list(rows.values()))
    out_dir = os.environ.get("OUT")
    if out_dir:
        result = {
            "device": name,
            "date": datetime.date.today().isoformat(),
            "commit": commit(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "model": args.model,
            "bandwidth_bytes_per_s": BANDWIDTH,
            "matmul_flop_per_s": MATMUL_RATE,
            "plan": {k: str(v) for k, v in asdict(plan).items() if k != "config"},
            "notes": notes,
            "rows": [asdict(r) for r in rows.values()],
        }
        Path(out_dir, "gpu_e2e.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
