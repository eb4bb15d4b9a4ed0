"""What requests say: prompts (token ids) and output lengths, seeded and reproducible.

Open-loop workloads yield `LoadRequest`s that an arrival process (arrivals.py) spaces in
time, or that carry their own time (a trace replay):

    Synthetic      prompt and output lengths from distributions, random tokens
    SharedPrefix   RAG-like: a prompt is one of `documents` shared prefixes (Zipf
                   popularity) plus a question of its own
    Agentic        loops whose every step resends the whole context grown by a few tokens
    MooncakeTrace  replay of Mooncake's trace JSONL (timestamp ms, input_length,
                   output_length, hash_ids): requests sharing a hash id share that block
                   of the prompt, so the trace's prefix reuse is reproduced exactly

Multi-turn chat is closed-loop (a turn's prompt holds the previous answer): `ChatSessions`
describes the conversations and the driver plays them (driver.py).

Prompts are token ids drawn from [first_id, vocab_size): the ids below `first_id` are left
out so that random prompts avoid the low ids a small tokenizer keeps for bytes, and no
prompt needs tokenizing (the load on the ingress is the protocol's, not a tokenizer's).
"""

from __future__ import annotations

import json
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LoadRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int
    # The shared-prefix group, agent or trace line, for the report; "" when none.
    group: str = ""
    # Seconds from the start of the run (trace replays); None: the arrival process decides.
    at_s: float | None = None


@dataclass(frozen=True)
class Lengths:
    """A distribution of token counts: 'N' (fixed), 'A-B' (uniform), 'normal:MEAN:STD' or
    'lognormal:MEDIAN:SIGMA', always clipped to [1, cap]."""

    spec: str
    cap: int = 1 << 20

    def __post_init__(self) -> None:
        self.sample(random.Random(0))  # validates the spec

    def sample(self, rng: random.Random) -> int:
        kind, _, rest = self.spec.partition(":")
        try:
            if not rest and "-" in kind:
                low, high = (int(v) for v in kind.split("-"))
                value = rng.randint(low, high)
            elif not rest:
                value = int(kind)
            elif kind == "normal":
                mean, std = (float(v) for v in rest.split(":"))
                value = round(rng.gauss(mean, std))
            elif kind == "lognormal":
                median, sigma = (float(v) for v in rest.split(":"))
                value = round(median * math.exp(rng.gauss(0.0, sigma)))
            else:
                raise ValueError(f"unknown distribution {kind!r}")
        except ValueError as err:
            raise ValueError(
                f"length {self.spec!r}: expected N, A-B, normal:MEAN:STD or "
                f"lognormal:MEDIAN:SIGMA ({err})"
            ) from None
        return max(1, min(self.cap, value))


@dataclass(frozen=True)
class Vocab:
    """Token ids prompts are drawn from: [first_id, size)."""

    size: int
    first_id: int = 16

    def __post_init__(self) -> None:
        if not 0 <= self.first_id < self.size:
            raise ValueError(f"vocabulary [{self.first_id}, {self.size}) is empty")

    def tokens(self, rng: random.Random, n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(self.first_id, self.size) for _ in range(n))


class Workload(ABC):
    """Contract: `requests(seed)` yields the same requests for the same seed; it may be
    endless (the run's bounds stop it) or finite (a trace)."""

    @abstractmethod
    def requests(self, seed: int) -> Iterator[LoadRequest]: ...


@dataclass(frozen=True)
class Synthetic(Workload):
    vocab: Vocab
    input_lengths: Lengths
    output_lengths: Lengths

    def requests(self, seed: int) -> Iterator[LoadRequest]:
        rng = random.Random(seed)
        while True:
            prompt = self.vocab.tokens(rng, self.input_lengths.sample(rng))
            yield LoadRequest(prompt, self.output_lengths.sample(rng))


@dataclass(frozen=True)
class SharedPrefix(Workload):
    """`documents` prefixes of `document_tokens` each, picked with Zipf(`zipf_s`)
    popularity, each request adding a question of `question_tokens`."""

    vocab: Vocab
    documents: int
    document_tokens: int
    question_tokens: Lengths
    output_lengths: Lengths
    zipf_s: float = 1.1

    def requests(self, seed: int) -> Iterator[LoadRequest]:
        rng = random.Random(seed)
        docs = [self.vocab.tokens(rng, self.document_tokens) for _ in range(self.documents)]
        weights = [1.0 / (rank + 1) ** self.zipf_s for rank in range(self.documents)]
        while True:
            [doc] = rng.choices(range(self.documents), weights)
            question = self.vocab.tokens(rng, self.question_tokens.sample(rng))
            yield LoadRequest(docs[doc] + question, self.output_lengths.sample(rng), f"doc{doc}")


@dataclass(frozen=True)
class Agentic(Workload):
    """`agents` loops sharing one system prompt; each request of an agent resends its
    whole context, grown by `step_tokens` (a tool result) since its previous request,
    until `max_context` restarts it."""

    vocab: Vocab
    agents: int
    system_tokens: int
    step_tokens: Lengths
    output_lengths: Lengths
    max_context: int

    def requests(self, seed: int) -> Iterator[LoadRequest]:
        rng = random.Random(seed)
        system = self.vocab.tokens(rng, self.system_tokens)
        contexts = [system for _ in range(self.agents)]
        while True:
            agent = rng.randrange(self.agents)
            grown = contexts[agent] + self.vocab.tokens(rng, self.step_tokens.sample(rng))
            contexts[agent] = grown if len(grown) < self.max_context else system
            yield LoadRequest(contexts[agent], self.output_lengths.sample(rng), f"agent{agent}")


@dataclass(frozen=True)
class MooncakeTrace(Workload):
    """Replays a Mooncake trace file. Each hash id stands for one block of
    `block_tokens` prompt tokens (512 in the published traces), drawn from a generator
    seeded by the id, so equal ids give equal blocks. `time_scale` stretches time (2.0:
    half the rate), `length_scale` shrinks lengths (for a small model)."""

    path: Path
    vocab: Vocab
    block_tokens: int = 512
    time_scale: float = 1.0
    length_scale: float = 1.0

    def requests(self, seed: int) -> Iterator[LoadRequest]:
        block = max(1, round(self.block_tokens * self.length_scale))
        with open(self.path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    at_s = float(row["timestamp"]) / 1000.0 * self.time_scale
                    input_length = max(1, round(int(row["input_length"]) * self.length_scale))
                    output_length = max(1, round(int(row["output_length"]) * self.length_scale))
                    hash_ids = [int(h) for h in row.get("hash_ids", [])]
                except (ValueError, KeyError, TypeError) as err:
                    raise ValueError(
                        f"{self.path}:{number}: not a Mooncake trace line ({err})"
                    ) from None
                prompt: list[int] = []
                for h in hash_ids:
                    prompt += self.vocab.tokens(random.Random(f"{seed}/{h}"), block)
                tail = random.Random(f"{seed}/line{number}")
                prompt += self.vocab.tokens(tail, max(0, input_length - len(prompt)))
                yield LoadRequest(tuple(prompt[:input_length]), output_length, f"line{number}",
                                  at_s)


@dataclass(frozen=True)
class ChatSessions:
    """Closed-loop multi-turn chat: `conversations` at once, each of `turns` turns; a
    turn's prompt is the previous prompt + the answer the server gave + a new user
    message; `think_s` (mean, exponential) passes between an answer and the next turn.
    Every conversation starts with the same system prompt."""

    vocab: Vocab
    conversations: int
    turns: int
    system_tokens: int
    user_tokens: Lengths
    output_lengths: Lengths
    think_s: float = 1.0

    def __post_init__(self) -> None:
        if self.conversations < 1 or self.turns < 1:
            raise ValueError("chat needs at least one conversation of at least one turn")
