"""The engine: the step loop that every worker runs.

    add_request ──> Scheduler (ints, blocks) ──> ModelRunner (tensors) ──> Sampler
         ^                                                                   │
         └──────── stop checks, detokenize, stream deltas <───────────────────┘

`LLMEngine` is synchronous and single-threaded: `step()` schedules one batch, runs it,
samples and returns the deltas of every request that produced something. `stream()`
and `generate()` are conveniences on top of it. `AsyncLLMEngine` (workers/engine/async_engine.py)
runs the same loop on a thread for asyncio callers.
"""

from __future__ import annotations

import gc
import inspect
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tandem.workers.disagg.transfer import KVSender, KVSendTransfer, TransferTicket
from tandem.workers.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from tandem.workers.engine.kv_sizing import blocks_per_group, kv_cache_tokens_from_memory
from tandem.workers.engine.outputs import Completion, RequestOutput, Timings, TokenLogprob, Usage
from tandem.workers.engine.request import Request, RequestStatus
from tandem.workers.engine.runner import DEFAULT_GRAPH_SIZES, ModelRunner, graphs_supported
from tandem.workers.engine.sampler import Sampler, advance_generator, seeded_generator
from tandem.workers.engine.sampling_params import SamplingParams, SamplingParamsError
from tandem.workers.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from tandem.workers.kv.cache_manager import KVCacheManager, KVGroup
from tandem.workers.model.config import GptOssConfig
from tandem.workers.model.triton_backends import KERNELS_NAMES, make_backends
from tandem.workers.model.weights import load_model
from tandem.workers.text.tokenizer import Tokenizer


@dataclass(frozen=True)
class EngineConfig:
    # "cpu" or "cuda[:n]"; None picks cuda when present.
    device: str | None = None
    # "float32" or "bfloat16"; None: bfloat16 on cuda, float32 on cpu.
    dtype: str | None = None
    # Tokens per KV block.
    block_size: int = 16
    # Capacity of the full-attention KV cache, in tokens of context across all sequences;
    # None: as much as gpu_memory_utilization leaves (cuda only).
    kv_cache_tokens: int | None = 32768
    # With kv_cache_tokens None: the fraction of the GPU's memory the engine may hold
    # (weights, activations, graphs and KV cache), as vLLM's gpu_memory_utilization.
    gpu_memory_utilization: float = 0.9
    # Most sequences in one step.
    max_num_seqs: int = 64
    # Token budget of one step (decode tokens first, then prefill chunks).
    max_num_batched_tokens: int = 1024
    # Longest prompt + completion; None: the model's max_position_embeddings.
    max_model_len: int | None = None
    # Reuse cached KV of earlier requests with the same prompt prefix.
    enable_prefix_caching: bool = True
    # Attention and MoE implementation: "triton" (kernels/) or "torch" (the references);
    # None: triton on cuda, torch elsewhere.
    kernels: str | None = None
    # Compile kernels and capture CUDA graphs for every step shape before from_model_dir
    # returns (progress on stderr), so no request pays for them; None: on cuda only.
    warm_up: bool | None = None
    # Asynchronous scheduling: plan and launch the next decode step before reading the
    # current one's tokens back, and detokenize behind the GPU (see LLMEngine.step);
    # None: on cuda only.
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise ValueError("EngineConfig.kv_cache_tokens must hold at least one block")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                "EngineConfig.gpu_memory_utilization must be in (0, 1], "
                f"got {self.gpu_memory_utilization}"
            )
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"EngineConfig.dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"EngineConfig.max_model_len must be >= 2, got {self.max_model_len}")
        if self.kernels not in (None, *KERNELS_NAMES):
            raise ValueError(
                f"EngineConfig.kernels must be one of {KERNELS_NAMES} or None, got {self.kernels!r}"
            )


@dataclass(frozen=True)
class ModelFacts:
    """What the checkpoint says at run time, beyond the architecture."""

    max_model_len: int
    # Ids that end generation unless the request sets ignore_eos (generation_config's list).
    eos_token_ids: frozenset[int]

    @staticmethod
    def read(model_dir: Path, config: GptOssConfig, max_model_len: int | None) -> ModelFacts:
        # OpenAI's original/ config names no special ids; generation_config.json does.
        eos: list[int] = [] if config.eos_token_id is None else [config.eos_token_id]
        gen_path = model_dir / "generation_config.json"
        if gen_path.exists():
            try:
                value = json.loads(gen_path.read_text()).get("eos_token_id", eos)
            except json.JSONDecodeError as err:
                raise ValueError(f"{gen_path}: not valid JSON ({err})") from err
            eos = list(value) if isinstance(value, list) else [value]
        limit = config.max_position_embeddings
        if max_model_len is not None:
            limit = min(limit, max_model_len)
        return ModelFacts(max_model_len=limit, eos_token_ids=frozenset(int(i) for i in eos))


@dataclass(frozen=True)
class RemoteSlot:
    """Blocks a decode request reserved for prompt KV computed elsewhere."""

    request_id: str
    # Prompt tokens already cached here: the sender skips them.
    num_cached_tokens: int
    # Per KV group: logical block indices to fill, and this worker's block for each.
    logical_blocks: tuple[tuple[int, ...], ...]
    dest_block_ids: tuple[tuple[int, ...], ...]


_FINISHED = {"stop": RequestStatus.FINISHED_STOPPED, "length": RequestStatus.FINISHED_LENGTH}

# Stands in a request's output for a token sampled on the device and not yet read back
# (asynchronous scheduling); replaced before anything reads the token's value.
PENDING_TOKEN = -1


@dataclass
class _RequestState:
    """Engine-side state of one request, beside the scheduler's `Request`."""

    request: Request
    params: SamplingParams
    generator: torch.Generator | None
    stop_ids: frozenset[int]
    # stop_ids sorted, as the sampler takes them (made once, not every step).
    stop_list: list[int]
    detokenizer: IncrementalDetokenizer
    stop_strings: StopStringMatcher | None
    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    # Prefill role: where the prompt's KV goes, until its transfer starts.
    ticket: TransferTicket | None = None
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    # Output tokens sampled by another engine before this one resumed the request.
    num_resumed: int = 0


@dataclass
class _InFlight:
    """A decode step launched on the device whose tokens the host has not read yet."""

    out: SchedulerOutput
    # Per row of out.scheduled: the state it was launched for, its greedy token on the
    # device [B] int64, the same tokens copied to host memory once `copied` is reached.
    states: list[_RequestState]
    token_ids: torch.Tensor
    host_ids: torch.Tensor
    copied: torch.cuda.Event | None
    # Request id -> row.
    rows: dict[str, int]
    # Per row: index of its PENDING_TOKEN in request.output_token_ids (-1: none appended).
    slots: list[int] = field(default_factory=list)


def _token_text(state: _RequestState, token: int, n_out: int) -> tuple[str, bool]:
    """The text a request's newly sampled token releases (text that may start a stop
    string held back), and whether the token ends the request, with `n_out` output tokens
    counted (this one included). A stop token adds no text; like stop tokens, stop strings
    only count once min_tokens have been generated."""
    params = state.params
    if token in state.stop_ids and n_out >= params.min_tokens:
        return "", True
    text = state.detokenizer.push([token])
    if state.stop_strings is not None and n_out >= params.min_tokens:
        check = state.stop_strings.feed(text)
        text = check.text
        if check.stop is not None:
            return text + check.stop if params.include_stop_str_in_output else text, True
    return text, False


class LLMEngine:
    def __init__(
        self,
        model,
        config: GptOssConfig,
        tokenizer: Tokenizer,
        facts: ModelFacts,
        engine_config: EngineConfig,
        device: torch.device,
        dtype: torch.dtype,
        runner_factory: Callable[..., ModelRunner] = ModelRunner,
    ) -> None:
        """runner_factory(model, blocks_per_group, block_size, device, dtype) makes the
        runner: an expert-parallel worker passes one whose steps also run on its other
        ranks (tandem.workers.expert_parallel.engine)."""
        self.config = config
        self.tokenizer = tokenizer
        self.facts = facts
        self.engine_config = engine_config
        self.device = device
        self.dtype = dtype
        ec = engine_config
        kv_tokens = ec.kv_cache_tokens
        if kv_tokens is None:
            if device.type != "cuda":
                raise ValueError("EngineConfig.kv_cache_tokens must be set off cuda")
            graph_sizes = []
            if graphs_supported(model, device):
                graph_sizes = [s for s in DEFAULT_GRAPH_SIZES if s < 2 * ec.max_num_seqs]
            kv_tokens = kv_cache_tokens_from_memory(
                model, ec.gpu_memory_utilization, ec.block_size, ec.max_num_seqs,
                ec.max_num_batched_tokens, graph_sizes, device, dtype,
                lambda line: print(line, file=sys.stderr, flush=True),
            )
        self.kv_cache_tokens = kv_tokens
        full_blocks = math.ceil(kv_tokens / ec.block_size)
        # A sliding layer keeps only the window (plus the step's chunk) per sequence.
        blocks = blocks_per_group(
            config, full_blocks, ec.block_size, ec.max_num_seqs, ec.max_num_batched_tokens
        )
        groups = [
            KVGroup(name=spec.name, sliding_window=spec.sliding_window)
            for spec in config.kv_groups
        ]
        self.kv = KVCacheManager(
            groups, ec.block_size, blocks, enable_prefix_caching=ec.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=ec.max_num_seqs,
                max_num_batched_tokens=ec.max_num_batched_tokens,
                block_size=ec.block_size,
            ),
            self.kv,
        )
        self.runner = runner_factory(model, blocks, ec.block_size, device, dtype)
        # Requests without a seed share one generator, seeded from the OS.
        shared = torch.Generator(device=device)
        shared.seed()
        self.sampler = Sampler(shared)
        self.kv_sender: KVSender | None = None
        self._states: dict[str, _RequestState] = {}
        self._ids = itertools.count()
        self._generated_tokens = 0
        self._preemptions = 0
        # Public: a benchmark may switch it between steps (a step in flight is drained).
        # Only over a runner whose execute() takes the step's tokens on the device: one that
        # overrides execute() without `input_ids` (the expert-parallel runner, which sends
        # the host's token ids to its other ranks) keeps the synchronous path.
        self.async_scheduling = (
            ec.async_scheduling if ec.async_scheduling is not None else device.type == "cuda"
        ) and "input_ids" in inspect.signature(self.runner.execute).parameters
        self._inflight: _InFlight | None = None
        self._pipelined_steps = 0
        self._started = time.monotonic()

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, engine_config: EngineConfig | None = None):
        ec = engine_config or EngineConfig()
        device = torch.device(ec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype_name = ec.dtype or ("bfloat16" if device.type == "cuda" else "float32")
        dtype = getattr(torch, dtype_name)
        model_dir = Path(model_dir)
        attention, moe = make_backends(ec.kernels, device)
        model, config = load_model(
            model_dir, dtype=dtype, device=device, attention=attention, moe=moe
        )
        tokenizer = Tokenizer.from_dir(model_dir)
        facts = ModelFacts.read(model_dir, config, ec.max_model_len)
        engine = cls(model, config, tokenizer, facts, ec, device, dtype)
        if ec.warm_up if ec.warm_up is not None else device.type == "cuda":
            engine.warm_up()
        return engine

    def warm_up(self, progress=None) -> float:
        """Compile every kernel variant, capture every decode graph and run the sampler's
        paths once, before the first request; returns the seconds it took. `progress`
        receives a line per stage (default: stderr). Only before any request: the
        throwaway steps write KV block 0."""
        if self._states or self.scheduler.has_work:
            raise RuntimeError("warm_up must run before any request is added")
        say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
        begin = time.monotonic()
        ec = self.engine_config
        self.runner.warm_up(ec.max_num_batched_tokens, ec.max_num_seqs, say)
        vocab = self.config.vocab_size
        for rows in (1, 3):
            logits = torch.zeros(rows, vocab, device=self.device)
            params = [SamplingParams(temperature=0.0, logprobs=2)] + [
                SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.01)
            ] * (rows - 1)
            self.sampler.sample(logits, params, [None] * rows, [([0], [])] * rows,
                                [[0]] * rows).token_ids.tolist()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        # Full collections walk every live list element (token ids, block tables: millions
        # under load) and ran every second or so: 1k/1k at 512 running on an H100 spent
        # 21 s of a 100 s run in them (bench/RESULTS.md). What is alive now (model,
        # tokenizer tables, compiled kernels) lives as long as the engine: frozen out of
        # them; and a full pass waits for 1000 young-generation passes instead of 10.
        gc.collect()
        gc.freeze()
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, 1000)
        elapsed = time.monotonic() - begin
        say(f"warm-up: ready in {elapsed:.1f} s")
        return elapsed

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        output_token_ids: Sequence[int] = (),
    ) -> str:
        """Admit a request; raises SamplingParamsError naming the field when it is invalid.

        `output_token_ids` resumes a request another engine began (stream migration): the
        tokens it already sampled, and streamed, for this prompt and these params. The
        request then continues exactly as that engine would have: it is admitted like a
        request preempted here (prompt and output prefilled again, from a prefix-cache hit,
        see tandem.workers.engine.request), max_tokens and min_tokens count those tokens,
        penalties see them, the detokenizer and the stop strings have consumed them (text
        held back there is held back here), and a seeded generator has made their draws.
        Only tokens after them are streamed.
        """
        state = self._new_state(
            prompt_token_ids, params, request_id, prefill_only=False, resumed=output_token_ids
        )
        return self._admit(state, self.scheduler.add)

    def add_prefill_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        ticket: TransferTicket,
    ) -> str:
        """Prefill-only role: compute the prompt, sample the first token, and push the KV
        blocks the ticket names to the decode worker, layer by layer, in the step that
        completes the prompt. The request then ends (finish reason "length") and its
        blocks are released (they stay in the prefix cache)."""
        if self.kv_sender is None:
            raise RuntimeError("this engine has no KV sender (attach_kv_sender)")
        if ticket.sender_id != self.kv_sender.sender_id:
            raise ValueError(
                f"ticket is for sender {ticket.sender_id!r}, this is {self.kv_sender.sender_id!r}"
            )
        state = self._new_state(prompt_token_ids, params, request_id, prefill_only=True)
        state.ticket = ticket
        return self._admit(state, self.scheduler.add)

    def add_remote_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
    ) -> RemoteSlot | None:
        """Decode role: reserve blocks for the whole prompt (reusing the cached prefix) for
        KV that another worker computes. Returns the blocks to fill, or None when the
        blocks are not free (use add_request then). Follow with complete_remote or
        fail_remote."""
        state = self._new_state(prompt_token_ids, params, request_id, prefill_only=False)
        request = state.request
        admitted = self._admit(state, self.scheduler.add_remote)
        if admitted is None:
            return None
        bs = self.engine_config.block_size
        n_blocks = -(-request.num_prompt_tokens // bs)
        logical: list[tuple[int, ...]] = []
        dest: list[tuple[int, ...]] = []
        for g, spec in enumerate(self.config.kv_groups):
            first = request.num_cached_tokens // bs
            if spec.sliding_window is not None:
                # The first decode step reads positions > prompt_len - window only.
                first = max(first, (request.num_prompt_tokens - spec.sliding_window + 1) // bs)
            table = self.kv.block_table(request, g)
            logical.append(tuple(range(first, n_blocks)))
            dest.append(tuple(table[i] for i in range(first, n_blocks)))
        return RemoteSlot(
            request.request_id, request.num_cached_tokens, tuple(logical), tuple(dest)
        )

    def complete_remote(self, request_id: str, first_token: int) -> RequestOutput:
        """The prompt KV arrived with the first token: stream it and decode on."""
        state = self._states[request_id]
        now = time.monotonic()
        state.first_scheduled = state.first_scheduled or now
        self.scheduler.remote_arrived(request_id, first_token)
        if state.generator is not None and not state.params.is_greedy:
            advance_generator(state.generator, self.config.vocab_size, self.device)
        self._generated_tokens += 1
        state.first_token = state.last_token = now
        return self._after_token(state, first_token)

    def fail_remote(self, request_id: str) -> None:
        """The KV never arrived: prefill the uncached prompt locally instead."""
        if request_id in self._states:
            self.scheduler.remote_failed(request_id)

    def _new_state(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None,
        prefill_only: bool,
        resumed: Sequence[int] = (),
    ) -> _RequestState:
        prompt = [int(t) for t in prompt_token_ids]
        output = [int(t) for t in resumed]
        params.check_against_model(len(prompt), self.facts.max_model_len, self.config.vocab_size)
        for name, ids in (("prompt", prompt), ("output_token_ids", output)):
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise SamplingParamsError(
                    name,
                    bad[0],
                    f"{name} token id {bad[0]} is outside the vocabulary "
                    f"(size {self.config.vocab_size})",
                )
        if len(output) >= params.max_tokens:
            raise SamplingParamsError(
                "output_token_ids",
                len(output),
                f"output_token_ids must be fewer than max_tokens={params.max_tokens}, "
                f"got {len(output)} (the request is already complete)",
            )
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._states:
            raise ValueError(f"request_id {request_id!r} is already running")
        generator = None
        if params.seed is not None:
            generator = seeded_generator(params.seed, self.device)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.facts.eos_token_ids
        request = Request(
            request_id,
            prompt,
            max_tokens=params.max_tokens,
            sampling=params,
            prefill_only=prefill_only,
            output_token_ids=output,
        )
        state = _RequestState(
            request=request,
            params=params,
            generator=generator,
            stop_ids=frozenset(stop_ids),
            stop_list=sorted(stop_ids),
            detokenizer=IncrementalDetokenizer(self.tokenizer),
            stop_strings=StopStringMatcher(params.stop) if params.stop else None,
            arrival=time.monotonic(),
            num_resumed=len(output),
        )
        if output:
            self._replay(state)
        return state

    def _replay(self, state: _RequestState) -> None:
        """Bring a resumed request's state to where the engine that sampled its output
        left it: every token once through the stop rules and the detokenizer (their text
        was streamed already and is dropped here; what that engine held back stays held
        back), and one draw of a seeded generator per token, as `_run_sync` and
        `complete_remote` make one per sampled token of a random request."""
        advance = state.generator is not None and not state.params.is_greedy
        for n_out, token in enumerate(state.request.output_token_ids, start=1):
            _, stops = _token_text(state, token, n_out)
            if stops:
                raise SamplingParamsError(
                    "output_token_ids",
                    n_out,
                    f"output_token_ids stop the request at token {n_out} of "
                    f"{state.num_resumed} (the request is already complete)",
                )
            if advance:
                advance_generator(state.generator, self.config.vocab_size, self.device)

    def _admit(self, state: _RequestState, admit) -> str | None:
        """Register the state and hand the request to the scheduler (`add`, `add_remote`);
        nothing stays registered when the scheduler refuses it."""
        request_id = state.request.request_id
        self._states[request_id] = state
        try:
            admitted = admit(state.request)
        except BaseException:
            del self._states[request_id]
            raise
        if admitted is False:
            del self._states[request_id]
            return None
        return request_id

    def attach_kv_sender(self, sender: KVSender) -> None:
        """Prefill role: the endpoint that pushes this engine's KV blocks to decode workers."""
        self.kv_sender = sender

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request at any point and free its blocks; None if it is not running."""
        state = self._states.pop(request_id, None)
        if state is None:
            return None
        if state.ticket is not None and self.kv_sender is not None:
            # Transfers of a pair go in sequence order: a ticket that never starts would
            # hold the pair's later transfers back until its deadline. Say it is abandoned.
            placeholder = [[0] * len(g) for g in state.ticket.logical_blocks]
            self.kv_sender.begin(state.ticket, placeholder).abandon("request aborted")
        self.scheduler.abort(request_id)
        outputs = state.request.output_token_ids
        if outputs and outputs[-1] == PENDING_TOKEN:
            outputs.pop()  # its step is in flight; the token is dropped unread
        return self._delta(state, finished=True, reason="abort", text="")

    def has_unfinished(self) -> bool:
        return bool(self._states)

    @property
    def step_in_flight(self) -> bool:
        """A step's tokens are still on the device: the next step() returns them."""
        return self._inflight is not None

    def running_ids(self) -> set[str]:
        """Ids of the requests admitted and not yet finished."""
        return set(self._states)

    # ---------------------------------------------------------------------- step

    def step(self) -> list[RequestOutput]:
        """Run one step; return the deltas of every request that produced something.

        With asynchronous scheduling, a decode step that needs nothing from the host but
        its inputs (greedy rows without penalties, logprobs, min_tokens masks or KV
        transfers) is launched and left in flight: its tokens stay on the device and the
        scheduler advances each request with PENDING_TOKEN. The next call plans and
        launches the following step, feeding it those tokens on the device, and only then
        reads them back, patches the placeholders and applies stop rules and detokenizing,
        while the GPU runs. A request that stops on a token is already in the step after
        it: that step's token for it is dropped, as for a request aborted mid-step. Any
        other step first drains the one in flight, then runs synchronously.

            call k:    schedule N+1 | launch N+1 | read N, stop checks, text | advance N+1
            GPU:       ...... N ..............| N+1 ........................
        """
        prev, self._inflight = self._inflight, None
        out = self.scheduler.schedule()
        self._preemptions += len(out.preempted_ids)
        if out.scheduled:
            self._mark_scheduled(out)
        if out.scheduled and self.async_scheduling and self._can_pipeline(out, prev):
            launched = self._launch(out, prev)
            outputs = self._read_back(prev) if prev is not None else []
            self._advance(launched)
            self._inflight = launched
            self._pipelined_steps += 1
            return outputs
        outputs = self._read_back(prev) if prev is not None else []
        if out.scheduled:
            outputs.extend(self._run_sync(out))
        return outputs

    def _mark_scheduled(self, out: SchedulerOutput) -> None:
        now = time.monotonic()
        for r in out.scheduled:
            state = self._states.get(r.request_id)
            if state is not None and state.first_scheduled is None:
                state.first_scheduled = now

    def _can_pipeline(self, out: SchedulerOutput, prev: _InFlight | None) -> bool:
        """Whether `out` can run without the host seeing its inputs' values: a decode of
        every row, greedy, nothing sampled that reads the token history, and every input
        token either known on the host (no step in flight) or in `prev`'s device tokens."""
        for r in out.scheduled:
            state = self._states.get(r.request_id)
            if state is None or r.num_new_tokens != 1 or not r.needs_sample:
                return False
            p = state.params
            if (not p.is_greedy or p.uses_penalties or p.logprobs is not None
                    or state.ticket is not None or state.request.prefill_only
                    or state.request.num_output_tokens < p.min_tokens):
                return False
            pending = r.token_ids[0] == PENDING_TOKEN
            if pending != (prev is not None) or (pending and r.request_id not in prev.rows):
                return False
        return True

    def _launch(self, out: SchedulerOutput, prev: _InFlight | None) -> _InFlight:
        """Queue the step and its greedy sampling on the device; copy the tokens to the host
        behind them, without waiting."""
        input_ids = None
        if prev is not None:
            index = [prev.rows[r.request_id] for r in out.scheduled]
            if index == list(range(len(prev.rows))):
                input_ids = prev.token_ids
            else:
                rows = torch.tensor(index, dtype=torch.int64)
                if self.device.type == "cuda":
                    rows = rows.pin_memory().to(self.device, non_blocking=True)
                input_ids = prev.token_ids.index_select(0, rows)
        logits = self.runner.execute(out, input_ids=input_ids)  # [B, V]
        # Exactly the sampler's greedy rows (no penalties or masks apply): argmax of the
        # raw logits.
        token_ids = logits.argmax(dim=-1)  # [B] int64
        cuda = self.device.type == "cuda"
        host_ids = torch.empty(token_ids.shape, dtype=torch.int64, pin_memory=cuda)
        host_ids.copy_(token_ids, non_blocking=cuda)
        copied = None
        if cuda:
            copied = torch.cuda.Event()
            copied.record()
        return _InFlight(
            out=out,
            states=[self._states[r.request_id] for r in out.scheduled],
            token_ids=token_ids,
            host_ids=host_ids,
            copied=copied,
            rows={r.request_id: i for i, r in enumerate(out.scheduled)},
        )

    def _advance(self, launched: _InFlight) -> None:
        """Account for the launched step in the scheduler with placeholder tokens."""
        out = launched.out
        self.scheduler.update_after_step(
            out, {r.request_id: PENDING_TOKEN for r in out.scheduled}
        )
        for r, state in zip(out.scheduled, launched.states, strict=True):
            request = state.request
            appended = (
                request.num_computed_tokens == r.seq_len
                and request.output_token_ids
                and request.output_token_ids[-1] == PENDING_TOKEN
            )
            launched.slots.append(len(request.output_token_ids) - 1 if appended else -1)

    def _read_back(self, done: _InFlight) -> list[RequestOutput]:
        """Wait for a launched step's tokens, put them in place of the placeholders, and
        apply the stop rules; requests aborted or finished since are skipped."""
        if done.copied is not None:
            done.copied.synchronize()
        tokens = done.host_ids.tolist()
        now = time.monotonic()
        outputs = []
        for row, state in enumerate(done.states):
            slot = done.slots[row]
            if slot < 0 or self._states.get(state.request.request_id) is not state:
                continue
            token = tokens[row]
            state.request.output_token_ids[slot] = token
            self._generated_tokens += 1
            state.first_token = state.first_token or now
            state.last_token = now
            outputs.append(self._after_token(state, token))
        return outputs

    def _run_sync(self, out: SchedulerOutput) -> list[RequestOutput]:
        """Run a step and read its tokens back at once. Rows of requests that finished
        after `out` was planned (a stop found while draining a step in flight) are run but
        not sampled."""
        for r in out.scheduled:
            if PENDING_TOKEN in r.token_ids:
                # Planned while a step was in flight; its tokens are known now.
                state = self._states.get(r.request_id)
                if state is None:  # finished meanwhile: its row runs unsampled, any id does
                    r.token_ids = [max(t, 0) for t in r.token_ids]
                else:
                    r.token_ids = state.request.token_slice(r.start_position, r.seq_len)
        transfers = self._begin_transfers(out)
        after_layer = None
        if transfers:

            def after_layer(layer: int) -> None:
                for transfer in transfers.values():
                    transfer.send_layer(layer)

        logits = self.runner.execute(out, after_layer)  # [n_sampling, V]
        needs = [r for r in out.scheduled if r.needs_sample]
        keep = [i for i, r in enumerate(needs) if r.request_id in self._states]
        if len(keep) < len(needs):
            logits = logits[keep]
        sampling = [self._states[needs[i].request_id] for i in keep]
        sampled: dict[str, int] = {}
        if sampling:
            result = self.sampler.sample(
                logits,
                [s.params for s in sampling],
                [s.generator for s in sampling],
                [(s.request.prompt_token_ids, s.request.output_token_ids) for s in sampling],
                [s.stop_list for s in sampling],
            )
            tokens = result.token_ids.tolist()
            for row, state in enumerate(sampling):
                sampled[state.request.request_id] = tokens[row]
                row_logprobs = result.logprobs[row]
                if row_logprobs is not None:
                    state.pending_logprobs.append(
                        TokenLogprob(tokens[row], row_logprobs.logprob, row_logprobs.top)
                    )
        for request_id, transfer in transfers.items():
            request = self._states[request_id].request
            transfer.finish(sampled[request_id], {"cached_tokens": request.num_cached_tokens})
        self.scheduler.update_after_step(out, sampled)
        now = time.monotonic()
        outputs = []
        for request_id, token in sampled.items():
            state = self._states[request_id]
            self._generated_tokens += 1
            state.first_token = state.first_token or now
            state.last_token = now
            outputs.append(self._after_token(state, token))
        return outputs

    def _begin_transfers(self, out: SchedulerOutput) -> dict[str, KVSendTransfer]:
        """Start the KV transfers of prefill-only requests whose prompt completes now."""
        transfers = {}
        for r in out.scheduled:
            state = self._states.get(r.request_id)
            if state is None or not r.needs_sample or state.ticket is None:
                continue
            src = [
                [r.block_tables[g][i] for i in logical]
                for g, logical in enumerate(state.ticket.logical_blocks)
            ]
            transfers[r.request_id] = self.kv_sender.begin(state.ticket, src)
            state.ticket = None
        return transfers

    def _after_token(self, state: _RequestState, token: int) -> RequestOutput:
        """Apply the stop rules to a newly sampled token and build the delta."""
        params = state.params
        n_out = len(state.request.output_token_ids)
        state.pending_ids.append(token)
        text, stops = _token_text(state, token, n_out)
        reason = "stop" if stops else None
        # The scheduler itself ends a request that reached max_tokens.
        if reason is None and (state.request.status.is_finished or n_out >= params.max_tokens):
            reason = "length"
        if reason is not None:
            text += self._flush_text(state)
            self._states.pop(state.request.request_id)
            if not state.request.status.is_finished:
                self.scheduler.finish(state.request.request_id, _FINISHED[reason])
            if state.request.prefill_only:
                # Its transfer finished packing in this step: the blocks may go.
                self.scheduler.release(state.request.request_id)
        return self._delta(state, finished=reason is not None, reason=reason, text=text)

    @staticmethod
    def _flush_text(state: _RequestState) -> str:
        """Text still held back at the end: an unfinished UTF-8 character, or the start of
        a stop string that never completed."""
        matcher = state.stop_strings
        if matcher is not None and matcher.stopped:
            return ""  # everything after a stop string is dropped
        tail = state.detokenizer.flush()
        if matcher is None:
            return tail
        check = matcher.feed(tail)
        return check.text if check.stop is not None else check.text + matcher.flush()

    def _delta(self, state: _RequestState, finished: bool, reason: str | None, text: str):
        request = state.request
        ids, state.pending_ids = tuple(state.pending_ids), []
        logprobs, state.pending_logprobs = tuple(state.pending_logprobs), []
        return RequestOutput(
            request_id=request.request_id,
            token_ids=ids,
            text_delta=text,
            finished=finished,
            finish_reason=reason,
            usage=Usage(
                prompt_tokens=len(request.prompt_token_ids),
                cached_tokens=request.num_cached_tokens,
                completion_tokens=len(request.output_token_ids),
            ),
            timings=self._timings(state) if finished else None,
            logprobs=logprobs,
        )

    @staticmethod
    def _timings(state: _RequestState) -> Timings:
        scheduled = state.first_scheduled or state.arrival
        first = state.first_token or scheduled
        n = len(state.request.output_token_ids) - state.num_resumed
        per_token = (state.last_token - first) / (n - 1) if n > 1 and state.last_token else 0.0
        return Timings(
            queue_s=scheduled - state.arrival,
            prefill_s=first - scheduled,
            ttft_s=first - state.arrival,
            per_token_s=per_token,
        )

    # --------------------------------------------------------------- conveniences

    def stream(
        self, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> Iterator[RequestOutput]:
        """Run one request to the end, yielding its deltas (other requests advance too)."""
        request_id = self.add_request(prompt_token_ids, params)
        try:
            while True:
                for out in self.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            self.abort(request_id)

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Completion]:
        """Run many prompts batched; completions come back in input order."""
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompts):
            raise ValueError("generate: one SamplingParams per prompt, or one for all")
        # Validate everything before admitting anything, so a bad prompt admits nothing.
        for prompt, p in zip(prompts, per_prompt, strict=True):
            p.check_against_model(len(prompt), self.facts.max_model_len, self.config.vocab_size)
        ids = [self.add_request(prompt, p) for prompt, p in zip(prompts, per_prompt, strict=True)]
        done = {i: Completion(i) for i in ids}
        remaining = set(ids)
        while remaining:
            for out in self.step():
                if out.request_id in done:
                    done[out.request_id].absorb(out)
                    if out.finished:
                        remaining.discard(out.request_id)
        return [done[i] for i in ids]

    # ------------------------------------------------------------------- metrics

    def metrics(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        return {
            "running": float(self.scheduler.num_running),
            # Prompt tokens admitted but not yet computed (prefill work still queued).
            "queued_prompt_tokens": float(self.scheduler.queued_prompt_tokens),
            "waiting": float(self.scheduler.num_waiting),
            # The fullest group is the one that limits admission.
            "kv_usage": max(self.kv.usage),
            "prefix_hit_rate": self.kv.prefix_stats.hit_rate,
            "generated_tokens": float(self._generated_tokens),
            "preemptions": float(self._preemptions),
            # Steps launched before the previous step's tokens were read (async scheduling).
            "pipelined_steps": float(self._pipelined_steps),
            "tokens_per_s": self._generated_tokens / elapsed,
        }
