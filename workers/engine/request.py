"""A request as the scheduler and the KV cache manager see it: token ids and counters.

    all_token_ids = prompt_token_ids + output_token_ids
    |<------------- num_computed_tokens ------------>|<-- to compute -->|
    |<-- num_cached_tokens -->| (prefix-cache hit at the last admission)

`num_computed_tokens` counts tokens whose KV is in the cache. A request that holds no blocks
(waiting, preempted) has num_computed_tokens == 0: preemption discards its KV, and the next
admission starts again from a prefix-cache lookup over *all* its tokens, so what it had
generated is prefilled like prompt. Sampling parameters are the engine's business: they ride
along in `sampling`, untouched here.
"""

import enum
import itertools
from dataclasses import dataclass, field

from tandem.workers.kv.block_hash import BlockHash

_arrival_counter = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    # Holds blocks for its whole prompt while the prompt's KV is computed on another worker.
    AWAITING_REMOTE_KV = "awaiting_remote_kv"
    # Finished states: the scheduler no longer schedules the request.
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset(
    {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED}
)


@dataclass(eq=False)
class Request:
    """Mutable per-request state, shared by the scheduler (owner) and the KV cache manager."""

    request_id: str
    prompt_token_ids: list[int]
    # Most new tokens to generate; the scheduler finishes the request with FINISHED_LENGTH there.
    max_tokens: int
    # Sampling parameters for the engine; the scheduler never reads them.
    sampling: object = None
    # Mixed into every block hash (see tandem.workers.kv.block_hash.hash_block): a cache salt.
    hash_extra: bytes = b""
    # Role hook for disaggregated prefill: finish after the first sampled token but keep the
    # KV blocks (for the transfer) until Scheduler.release(request_id).
    prefill_only: bool = False
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    # Tie-breaker for FCFS order, unique per process.
    arrival: int = field(default_factory=lambda: next(_arrival_counter))
    # Chained hashes of the full blocks of all_token_ids seen so far, extended by the KV cache
    # manager; kept across preemption because tokens are only ever appended.
    block_hashes: list[BlockHash] = field(default_factory=list)
    # Times this request lost its KV to preemption.
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id}: prompt_token_ids must not be empty")
        if self.max_tokens < 1:
            raise ValueError(f"request {self.request_id}: max_tokens must be >= 1")
        self.prompt_token_ids = list(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def token_slice(self, start: int, stop: int) -> list[int]:
        """all_token_ids[start:stop] without building the whole list."""
        n_prompt = len(self.prompt_token_ids)
        if stop <= n_prompt:
            return self.prompt_token_ids[start:stop]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt : stop - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - n_prompt]

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
