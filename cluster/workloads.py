"""Realistic request workloads as token-id sessions: multi-turn chat, agentic loops, RAG
over per-tenant documents, and prompts that share nothing.

    Workload.sessions(duration_s)  ->  SessionSpec(start_s, prefix, steps, keep_history)
        request k of a session:  prompt_k = prefix + new_0              (k = 0)
                                 prompt_k = prompt_{k-1} + answer_{k-1} + new_k
                                            (keep_history: chat, agents)
                                 prompt_k = prefix + new_k  (otherwise: RAG, no reuse)
        request k is sent think_s after answer k - 1 arrived (closed loop per session);
        sessions start as a Poisson process (open loop across sessions).

The generators only describe the sessions; whoever drives them (bench/router_sim.py's
simulated pool, a load test against a live cluster) supplies the answers, so a real
answer can take the place of the synthetic one `synthetic_answer` gives. Everything is
drawn from one seeded `random.Random`: the same seed gives the same sessions.
Pure Python (no torch), so the router benchmark and the load generator share it.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from bisect import bisect_left
from dataclasses import dataclass
from itertools import accumulate


@dataclass(frozen=True)
class Step:
    """One request of a session."""

    new_tokens: tuple[int, ...]
    # Appended to the conversation before this request (a user message, a tool result,
    # a question).
    output_tokens: int
    # Tokens the answer has (max_tokens with ignore_eos in a load test).
    think_s: float
    # Delay between the previous answer's last token and this request (0 for the first).


@dataclass(frozen=True)
class SessionSpec:
    session_id: int
    start_s: float
    # When the first request is sent.
    prefix: tuple[int, ...]
    # Content the session's prompts start with: a system prompt, tool definitions, a
    # tenant's document (shared with other sessions of the same kind).
    steps: tuple[Step, ...]
    keep_history: bool
    # True: each prompt extends the previous prompt and its answer (chat, agents);
    # False: each prompt is prefix + the step's new tokens (independent questions).

    def prompt(self, k: int, history: tuple[int, ...] = ()) -> tuple[int, ...]:
        """Prompt of request k; `history` is the previous prompt + its answer."""
        new = self.steps[k].new_tokens
        if k == 0 or not self.keep_history:
            return self.prefix + new
        return history + new


def synthetic_answer(session_id: int, k: int, n: int, vocab_size: int) -> tuple[int, ...]:
    """A deterministic stand-in for a generated answer (same session, step: same ids)."""
    return _tokens(random.Random(session_id * 1_000_003 + k), n, vocab_size)


def _tokens(rng: random.Random, n: int, vocab_size: int) -> tuple[int, ...]:
    # choices: uniform like randrange, several times faster (a trace is millions of ids).
    return tuple(rng.choices(range(vocab_size), k=n))


def _uniform(rng: random.Random, bounds: tuple[int, int]) -> int:
    return rng.randint(bounds[0], bounds[1])


def _check_range(name: str, bounds: tuple[int, int], low: int = 0) -> None:
    if len(bounds) != 2 or not low <= bounds[0] <= bounds[1]:
        raise ValueError(f"{name} must be (min, max) with {low} <= min <= max, got {bounds}")


class Workload(ABC):
    """A family of sessions; `session_rate` sessions start per second on average."""

    name: str
    vocab_size: int
    seed: int
    session_rate: float

    @abstractmethod
    def _session(self, rng: random.Random, session_id: int, start_s: float) -> SessionSpec:
        """One session drawn from `rng`."""

    def with_rate(self, session_rate: float) -> Workload:
        from dataclasses import replace

        return replace(self, session_rate=session_rate)  # type: ignore[type-var]

    def sessions(self, duration_s: float) -> list[SessionSpec]:
        """Sessions starting within [0, duration_s), in start order."""
        if not duration_s > 0:
            raise ValueError(f"duration_s must be > 0, got {duration_s}")
        rng = random.Random(self.seed)
        out: list[SessionSpec] = []
        t = rng.expovariate(self.session_rate)
        while t < duration_s:
            out.append(self._session(rng, len(out), t))
            t += rng.expovariate(self.session_rate)
        return out


def _check_common(w: Workload) -> None:
    if w.vocab_size < 2:
        raise ValueError(f"{type(w).__name__}.vocab_size must be >= 2, got {w.vocab_size}")
    if not (math.isfinite(w.session_rate) and w.session_rate > 0):
        raise ValueError(f"{type(w).__name__}.session_rate must be > 0, got {w.session_rate}")


@dataclass(frozen=True)
class ChatWorkload(Workload):
    """Many concurrent conversations behind one shared system prompt; users read and
    think between turns."""

    name = "chat"
    vocab_size: int = 32000
    seed: int = 0
    session_rate: float = 1.0
    system_tokens: int = 512
    # The system prompt every conversation starts with.
    turns: tuple[int, int] = (3, 8)
    first_user_tokens: tuple[int, int] = (50, 400)
    user_tokens: tuple[int, int] = (20, 200)
    answer_tokens: tuple[int, int] = (50, 300)
    think_s: tuple[float, float] = (3.0, 15.0)
    # Uniform think time between an answer and the next user message.

    def __post_init__(self) -> None:
        _check_common(self)
        _check_range("ChatWorkload.turns", self.turns, 1)
        for name in ("first_user_tokens", "user_tokens", "answer_tokens"):
            _check_range(f"ChatWorkload.{name}", getattr(self, name), 1)
        if not 0 <= self.think_s[0] <= self.think_s[1]:
            raise ValueError(f"ChatWorkload.think_s must be (min, max) >= 0, got {self.think_s}")

    def _session(self, rng: random.Random, session_id: int, start_s: float) -> SessionSpec:
        system = _tokens(random.Random(self.seed * 7919 + 1), self.system_tokens, self.vocab_size)
        steps = []
        for k in range(_uniform(rng, self.turns)):
            bounds = self.first_user_tokens if k == 0 else self.user_tokens
            steps.append(
                Step(
                    new_tokens=_tokens(rng, _uniform(rng, bounds), self.vocab_size),
                    output_tokens=_uniform(rng, self.answer_tokens),
                    think_s=0.0 if k == 0 else rng.uniform(*self.think_s),
                )
            )
        return SessionSpec(session_id, start_s, system, tuple(steps), keep_history=True)


@dataclass(frozen=True)
class AgenticWorkload(Workload):
    """Agent loops: a long prefix (instructions and tool definitions, shared by every
    agent of a tenant) and a task, then many short steps, each appending a tool result to
    the whole history; short gaps (tool calls), short outputs."""

    name = "agentic"
    vocab_size: int = 32000
    seed: int = 0
    session_rate: float = 0.2
    tenants: int = 4
    tools_tokens: int = 2048
    # Each tenant's shared prefix.
    task_tokens: tuple[int, int] = (100, 400)
    steps: tuple[int, int] = (8, 24)
    tool_result_tokens: tuple[int, int] = (20, 150)
    answer_tokens: tuple[int, int] = (20, 80)
    think_s: tuple[float, float] = (0.1, 1.0)

    def __post_init__(self) -> None:
        _check_common(self)
        if self.tenants < 1:
            raise ValueError(f"AgenticWorkload.tenants must be >= 1, got {self.tenants}")
        _check_range("AgenticWorkload.steps", self.steps, 1)
        for name in ("task_tokens", "tool_result_tokens", "answer_tokens"):
            _check_range(f"AgenticWorkload.{name}", getattr(self, name), 1)

    def _session(self, rng: random.Random, session_id: int, start_s: float) -> SessionSpec:
        tenant = rng.randrange(self.tenants)
        prefix = _tokens(
            random.Random(self.seed * 7919 + 100 + tenant), self.tools_tokens, self.vocab_size
        )
        steps = []
        for k in range(_uniform(rng, self.steps)):
            bounds = self.task_tokens if k == 0 else self.tool_result_tokens
            steps.append(
                Step(
                    new_tokens=_tokens(rng, _uniform(rng, bounds), self.vocab_size),
                    output_tokens=_uniform(rng, self.answer_tokens),
                    think_s=0.0 if k == 0 else rng.uniform(*self.think_s),
                )
            )
        return SessionSpec(session_id, start_s, prefix, tuple(steps), keep_history=True)


@dataclass(frozen=True)
class RagWorkload(Workload):
    """Retrieval-augmented questions: tenant system prompt + one retrieved document
    (Zipf-popular within its tenant) + a question; each session asks a few questions
    about its document, think time apart."""

    name = "rag"
    vocab_size: int = 32000
    seed: int = 0
    session_rate: float = 2.0
    tenants: int = 8
    documents_per_tenant: int = 64
    zipf_s: float = 1.1
    # Document popularity within a tenant: P(rank k) ~ 1 / k**zipf_s.
    system_tokens: int = 256
    document_tokens: tuple[int, int] = (1000, 3000)
    question_tokens: tuple[int, int] = (20, 100)
    questions: tuple[int, int] = (1, 3)
    answer_tokens: tuple[int, int] = (50, 250)
    think_s: tuple[float, float] = (2.0, 10.0)

    def __post_init__(self) -> None:
        _check_common(self)
        if self.tenants < 1 or self.documents_per_tenant < 1:
            raise ValueError("RagWorkload.tenants and documents_per_tenant must be >= 1")
        if not self.zipf_s > 0:
            raise ValueError(f"RagWorkload.zipf_s must be > 0, got {self.zipf_s}")
        for name in ("document_tokens", "question_tokens", "questions", "answer_tokens"):
            _check_range(f"RagWorkload.{name}", getattr(self, name), 1)

    def _document(self, tenant: int, doc: int) -> tuple[int, ...]:
        rng = random.Random((self.seed * 7919 + tenant) * 100_003 + doc)
        system = _tokens(
            random.Random(self.seed * 7919 + 200 + tenant), self.system_tokens, self.vocab_size
        )
        return system + _tokens(rng, _uniform(rng, self.document_tokens), self.vocab_size)

    def _session(self, rng: random.Random, session_id: int, start_s: float) -> SessionSpec:
        weights = list(
            accumulate(1.0 / (k + 1) ** self.zipf_s for k in range(self.documents_per_tenant))
        )
        tenant = rng.randrange(self.tenants)
        doc = bisect_left(weights, rng.random() * weights[-1])
        steps = tuple(
            Step(
                new_tokens=_tokens(rng, _uniform(rng, self.question_tokens), self.vocab_size),
                output_tokens=_uniform(rng, self.answer_tokens),
                think_s=0.0 if k == 0 else rng.uniform(*self.think_s),
            )
            for k in range(_uniform(rng, self.questions))
        )
        return SessionSpec(session_id, start_s, self._document(tenant, doc), steps, False)


@dataclass(frozen=True)
class NoReuseWorkload(Workload):
    """Single requests that share no block with anything: placement can only balance."""

    name = "no_reuse"
    vocab_size: int = 32000
    seed: int = 0
    session_rate: float = 4.0
    prompt_tokens: tuple[int, int] = (200, 2000)
    answer_tokens: tuple[int, int] = (50, 300)

    def __post_init__(self) -> None:
        _check_common(self)
        _check_range("NoReuseWorkload.prompt_tokens", self.prompt_tokens, 1)
        _check_range("NoReuseWorkload.answer_tokens", self.answer_tokens, 1)

    def _session(self, rng: random.Random, session_id: int, start_s: float) -> SessionSpec:
        step = Step(
            new_tokens=_tokens(rng, _uniform(rng, self.prompt_tokens), self.vocab_size),
            output_tokens=_uniform(rng, self.answer_tokens),
            think_s=0.0,
        )
        return SessionSpec(session_id, start_s, (), (step,), keep_history=False)


WORKLOADS: dict[str, type[Workload]] = {
    w.name: w for w in (ChatWorkload, AgenticWorkload, RagWorkload, NoReuseWorkload)
}


def make_workload(name: str, **fields) -> Workload:
    """A workload by name (chat, agentic, rag, no_reuse) with its fields overridden."""
    if name not in WORKLOADS:
        raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, got {name!r}")
    return WORKLOADS[name](**fields)
