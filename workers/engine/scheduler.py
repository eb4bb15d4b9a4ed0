"""Continuous batching with chunked prefill, prefix reuse and preemption by recomputation.

The scheduler decides which tokens of which requests run in the next step, under a token
budget, and reserves their KV slots through the KVCacheManager. It works on ints and lists
only; the runner turns a `SchedulerOutput` into tensors.

One step, in this order (the order of `SchedulerOutput.scheduled` too):

    1. decodes          every running request with exactly one token left to compute
                        (its last sampled token), in admission order, 1 token each
    2. prefill chunks   running requests still prefilling, in admission order
    3. admissions       waiting requests in FCFS order (preempted ones first), each starting
                        after its prefix-cache hit, while fewer than max_num_seqs run

A prefill chunk takes min(tokens left, long_prefill_token_threshold, budget left) tokens.
When a running request cannot get blocks, the most recently admitted running request not
yet scheduled in this step is preempted (possibly the request itself): its blocks are freed
and it goes to the front of the queue with num_computed_tokens = 0, so on re-admission its
prompt *and* generated tokens are prefilled again, starting from a prefix-cache hit. A step
that preempted admits nobody.

Role hooks for disaggregated serving:
  * prefill-only requests (`Request.prefill_only`): finish after their first sampled token,
    but their blocks stay allocated (and visible through `kv.block_table`) for the KV
    transfer until `release(request_id)`.
  * decode requests whose prompt KV arrives from a prefill worker: to be added as a third
    queue beside `waiting`. Admission does `kv.allocate(request, num_prompt_tokens -
    num_computed_tokens)` after the usual prefix lookup (the prefill worker then sends only
    the blocks past the hit), and parks the request until the KV lands; then
    num_computed_tokens = num_prompt_tokens, the prefill worker's first token is appended,
    `kv.cache_full_blocks` runs, and the request joins `running` as a decode.
"""

from collections import deque
from dataclasses import dataclass, field

from tandem.workers.engine.request import Request, RequestStatus
from tandem.workers.kv.cache_manager import KVCacheManager


@dataclass(frozen=True)
class SchedulerConfig:
    # Most requests holding KV and being scheduled at once (running, incl. mid-prefill).
    max_num_seqs: int
    # Most tokens fed to the model in one step (the flattened T of the step).
    max_num_batched_tokens: int
    # KV block size in tokens; must equal the KV cache manager's.
    block_size: int
    # Split prompts longer than the budget left over several steps.
    enable_chunked_prefill: bool = True
    # Cap on one request's prefill chunk per step, so one long prompt cannot take the whole
    # budget from other prefills; None: no cap beyond the budget.
    long_prefill_token_threshold: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Every running request must be able to decode in every step.
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs})"
            )
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold < 1:
            raise ValueError(
                "long_prefill_token_threshold must be >= 1 or None, "
                f"got {self.long_prefill_token_threshold}"
            )


@dataclass
class ScheduledRequest:
    """The work of one request in one step.

    The step feeds `token_ids` (= all_token_ids[start_position : start_position +
    num_new_tokens]) at positions start_position.., so the context after the step is
    seq_len = start_position + num_new_tokens tokens.
    """

    request_id: str
    token_ids: list[int]
    # Position of token_ids[0]; equals the tokens whose KV is already cached.
    start_position: int
    num_new_tokens: int
    # Per KV group (indexed like the manager's groups): the whole block table, logical block
    # -> physical block, -1 where no block is held (released sliding blocks). Length
    # ceil(seq_len / block_size).
    block_tables: list[list[int]]
    # Per KV group: the cache slot of each new token (block_id * block_size + offset), -1 =
    # do not write. Length num_new_tokens.
    slot_ids: list[list[int]]
    # True when this chunk reaches the end of the known tokens: the logits of its last token
    # must be sampled. False for a prefill chunk that is not the last.
    needs_sample: bool
    # First step since (re-)admission: the runner (re)creates its per-request state.
    is_new: bool
    # Prefix-cache hit at the last admission, in tokens.
    num_cached_tokens: int

    @property
    def seq_len(self) -> int:
        return self.start_position + self.num_new_tokens


@dataclass
class SchedulerOutput:
    """One step's plan. `scheduled` holds decodes first, then prefill chunks."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # Requests preempted while planning this step: their KV is gone, runners drop them.
    preempted_ids: list[str] = field(default_factory=list)
    # Requests finished or aborted since the previous schedule(): runners drop them.
    finished_ids: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Owns the request queues; the single caller of the KV cache manager's actions."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        if config.block_size != kv.block_size:
            raise ValueError(
                f"SchedulerConfig.block_size ({config.block_size}) differs from the KV cache "
                f"manager's ({kv.block_size})"
            )
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        # Admission order: the tail is the first preemption victim.
        self.running: list[Request] = []
        # Every request not yet forgotten: waiting, running, or finished holding blocks.
        self._requests: dict[str, Request] = {}
        self._held: dict[str, Request] = {}
        # Decode requests whose prompt KV is being computed elsewhere (see add_remote).
        self._parked: dict[str, Request] = {}
        self._finished_ids: list[str] = []

    # ---- queries ----------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def queued_prompt_tokens(self) -> int:
        """Prompt tokens of waiting and running requests not computed yet."""
        return sum(
            max(0, r.num_prompt_tokens - r.num_computed_tokens)
            for r in (*self.waiting, *self.running)
        )

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    # ---- requests in and out ----------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a new request. Raises ValueError for one that could never run."""
        self._check_new(request)
        self._requests[request.request_id] = request
        self.waiting.append(request)

    def add_remote(self, request: Request) -> bool:
        """Admit a decode request whose prompt KV another worker computes.

        Allocates blocks for the whole prompt now, reusing this worker's cached prefix
        (request.num_cached_tokens says how much), and parks the request outside the
        queues until `remote_arrived` or `remote_failed`. False, with nothing changed,
        when the blocks are not free: the caller then queues it with `add` instead.
        """
        self._check_new(request)
        cached = self.kv.find_cached_prefix(request)
        request.num_computed_tokens = cached
        if not self.kv.can_allocate(request, request.num_tokens - cached):
            request.num_computed_tokens = 0
            return False
        self.kv.allocate(request, request.num_tokens - cached)
        request.num_cached_tokens = cached
        request.status = RequestStatus.AWAITING_REMOTE_KV
        self._requests[request.request_id] = request
        self._parked[request.request_id] = request
        return True

    def remote_arrived(self, request_id: str, first_token: int) -> None:
        """The prompt's KV is in this worker's blocks: decode from `first_token` on.

        Sliding-group blocks that lie before the window were not sent: they are released
        before anything is indexed, so their stale contents never enter the prefix cache.
        """
        request = self._parked.pop(request_id)
        request.num_computed_tokens = request.num_tokens
        request.status = RequestStatus.RUNNING
        self.kv.release_out_of_window(request)
        self.kv.cache_full_blocks(request)
        request.append_output_token(first_token)
        self.running.append(request)
        if request.num_output_tokens >= request.max_tokens:
            self.finish(request_id, RequestStatus.FINISHED_LENGTH)

    def remote_failed(self, request_id: str) -> None:
        """The transfer failed: prefill the uncached prompt here, in the blocks it holds."""
        request = self._parked.pop(request_id)
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def _check_new(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"request {request.request_id} already exists")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens:
            raise ValueError(f"request {request.request_id} is not a fresh request")
        max_len = request.num_prompt_tokens + request.max_tokens
        if not self.config.enable_chunked_prefill and max_len > self.config.max_num_batched_tokens:
            # Recomputation after preemption prefills prompt + output in one chunk.
            raise ValueError(
                f"request {request.request_id}: {max_len} tokens exceed "
                f"max_num_batched_tokens without chunked prefill"
            )
        if not self.kv.fits(max_len, self._max_chunk()):
            raise ValueError(
                f"request {request.request_id}: {max_len} tokens cannot fit the KV cache"
            )

    def finish(
        self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_STOPPED
    ) -> None:
        """End a request in any state (the engine saw a stop token, the client went away).

        Frees its blocks, except that a prefill-only request that did not abort keeps them
        until `release`. Raises KeyError for an unknown id.
        """
        if not status.is_finished:
            raise ValueError(f"{status} is not a finished status")
        request = self._requests[request_id]
        if request_id in self._held:
            if status is RequestStatus.FINISHED_ABORTED:
                self.release(request_id)
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._parked.pop(request_id, None)
        request.status = status
        self._finished_ids.append(request_id)
        if request.prefill_only and status is not RequestStatus.FINISHED_ABORTED:
            self._held[request_id] = request
            return
        self.kv.free(request)
        del self._requests[request_id]

    def abort(self, request_id: str) -> bool:
        """Abort if known (also frees held blocks); False if the id is unknown."""
        if request_id not in self._requests:
            return False
        self.finish(request_id, RequestStatus.FINISHED_ABORTED)
        return True

    def release(self, request_id: str) -> None:
        """Free the blocks a finished prefill-only request kept for its KV transfer."""
        request = self._held.pop(request_id)
        self.kv.free(request)
        del self._requests[request_id]

    # ---- the step ---------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.config.max_num_batched_tokens
        scheduled: set[str] = set()
        for decode in (True, False):
            for request in list(self.running):
                if budget == 0:
                    break
                if request.status is not RequestStatus.RUNNING or request.request_id in scheduled:
                    continue
                remaining = request.num_tokens - request.num_computed_tokens
                if (remaining == 1) != decode:
                    continue
                n = self._chunk(remaining, budget)
                if n == 0 or not self._reserve(request, n, scheduled, out.preempted_ids):
                    continue
                out.scheduled.append(self._plan(request, n, is_new=False))
                scheduled.add(request.request_id)
                budget -= n
        if not out.preempted_ids:
            self._admit(budget, out)
        return out

    def update_after_step(self, output: SchedulerOutput, sampled: dict[str, int]) -> None:
        """Account for a step that ran `output`: advance num_computed_tokens, append the
        tokens sampled for requests with needs_sample, index newly full blocks, release
        sliding-window blocks no longer read, finish requests at max_tokens. Requests
        finished or aborted since `output` was planned are skipped."""
        for s in output.scheduled:
            request = self._requests.get(s.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue
            if request.num_computed_tokens != s.start_position:
                raise RuntimeError(f"request {s.request_id}: step applied twice or out of order")
            if s.needs_sample and s.request_id not in sampled:
                raise ValueError(f"request {s.request_id} needed a sampled token")
            request.num_computed_tokens = s.seq_len
            self.kv.cache_full_blocks(request)
            if s.needs_sample:
                request.append_output_token(sampled[s.request_id])
                if request.prefill_only or request.num_output_tokens >= request.max_tokens:
                    self.finish(s.request_id, RequestStatus.FINISHED_LENGTH)
                    continue
            self.kv.release_out_of_window(request)

    # ---- internals --------------------------------------------------------------------

    def _max_chunk(self) -> int:
        threshold = self.config.long_prefill_token_threshold
        budget = self.config.max_num_batched_tokens
        return budget if threshold is None else min(budget, threshold)

    def _chunk(self, remaining: int, budget: int) -> int:
        """Tokens of a request with `remaining` tokens to compute that run this step."""
        threshold = self.config.long_prefill_token_threshold
        n = remaining if threshold is None else min(remaining, threshold)
        if n > budget:
            return budget if self.config.enable_chunked_prefill else 0
        return n

    def _reserve(self, request: Request, n: int, scheduled: set[str], preempted: list[str]) -> bool:
        """Allocate slots for n more tokens of a running request, preempting from the tail
        of `running` (never a request already planned this step) until they fit. False when
        the request itself had to go."""
        if self.kv.has_blocks(request.request_id) and self.kv.try_extend(request, n):
            return True  # the common case, checked and done in one pass
        while not self.kv.can_allocate(request, n):
            victim = next(r for r in reversed(self.running) if r.request_id not in scheduled)
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return False
        self.kv.allocate(request, n)
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def _admit(self, budget: int, out: SchedulerOutput) -> None:
        """Start waiting requests in FCFS order; stop at the first that does not fit."""
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            cached = self.kv.find_cached_prefix(request)
            n = self._chunk(request.num_tokens - cached, budget)
            if n == 0:
                break
            request.num_computed_tokens = cached
            if not self.kv.can_allocate(request, n):
                # A request without blocks has computed nothing (see tandem.workers.engine.request).
                request.num_computed_tokens = 0
                break
            self.kv.allocate(request, n)
            request.num_cached_tokens = cached
            request.status = RequestStatus.RUNNING
            self.waiting.popleft()
            self.running.append(request)
            out.scheduled.append(self._plan(request, n, is_new=True))
            budget -= n

    def _plan(self, request: Request, n: int, is_new: bool) -> ScheduledRequest:
        start = request.num_computed_tokens
        groups = range(len(self.kv.groups))
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.token_slice(start, start + n),
            start_position=start,
            num_new_tokens=n,
            block_tables=[self.kv.block_table(request, g) for g in groups],
            slot_ids=[self.kv.slot_ids(request, g, start, n) for g in groups],
            needs_sample=start + n == request.num_tokens,
            is_new=is_new,
            num_cached_tokens=request.num_cached_tokens,
        )
