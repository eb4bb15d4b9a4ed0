"""Per-request sampling parameters, validated once when the request enters the engine.

The rules follow vLLM's `SamplingParams._verify_args` (ranges of the OpenAI completion API)
with two deliberate differences:

- every float must be finite (vLLM checks this for temperature and repetition_penalty
  only; a NaN top_p or min_p would silently disable the comparison-based checks);
- list-valued fields have caps (stop strings, stop token ids), so one request cannot make
  every decode step scan an unbounded list.

Checks that need the model (prompt length against the context window, stop ids against the
vocabulary) live in `check_against_model`, called by the engine once it knows the prompt.
The tensor side of these parameters is `workers/engine/sampler.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn

# Temperatures below this are greedy (vLLM's _SAMPLING_EPS): dividing logits by ~1e-6 would
# give the same argmax as greedy anyway, but with overflow risk.
GREEDY_TEMPERATURE = 1e-5
# Most top-n logprobs a request may ask for (vLLM's default max_logprobs).
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
# Seeds are stored in an int64 (the OpenAI protocol of vLLM bounds them the same way).
SEED_MIN = -(2**63)
SEED_MAX = 2**63 - 1


class SamplingParamsError(ValueError):
    """A sampling parameter is invalid; `field` names it, `value` is what was given."""

    def __init__(self, field: str, value: object, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. Immutable; validated at construction."""

    temperature: float = 1.0
    # Logits are divided by it; below GREEDY_TEMPERATURE (0 in practice) means greedy,
    # and then top_p, top_k and min_p are ignored.
    top_p: float = 1.0
    # Nucleus: keep the smallest set of most likely tokens whose mass reaches top_p. In (0, 1].
    top_k: int = 0
    # Keep the top_k most likely tokens (ties at the boundary kept). 0 or -1: off.
    min_p: float = 0.0
    # Drop tokens whose probability is below min_p times the top token's. In [0, 1].
    seed: int | None = None
    # Seeds a per-request generator: the same request samples the same tokens in any batch.
    repetition_penalty: float = 1.0
    # Tokens seen in prompt or output: positive logits divided by it, negative multiplied.
    presence_penalty: float = 0.0
    # Subtracted once from the logit of every token already in the output. In [-2, 2].
    frequency_penalty: float = 0.0
    # Subtracted per occurrence in the output. In [-2, 2].
    max_tokens: int = 16
    # Most tokens to generate (>= 1); the prompt plus these must fit the context window.
    min_tokens: int = 0
    # Stop tokens (eos included) are masked until this many tokens are generated.
    stop: tuple[str, ...] = ()
    # Strings that end the generation when they appear in the output text.
    stop_token_ids: tuple[int, ...] = ()
    # Token ids that end the generation (in addition to the model's eos ids).
    ignore_eos: bool = False
    # Keep generating past the model's eos ids (stop_token_ids still stop).
    logprobs: int | None = None
    # None: no logprobs. n >= 0: the sampled token's logprob plus the top n (0: sampled only).
    include_stop_str_in_output: bool = False
    # Whether the matched stop string stays in the returned text.

    def __post_init__(self) -> None:
        # Accept the natural JSON shapes (a lone string, lists) but store tuples, so the
        # object stays hashable and immutable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def uses_top_k(self) -> bool:
        return self.top_k > 0

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def validate(self) -> None:
        _finite("temperature", self.temperature)
        if self.temperature < 0.0:
            _fail("temperature", self.temperature, "must be >= 0")
        _finite("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            _fail("top_p", self.top_p, "must be in (0, 1]")
        _integer("top_k", self.top_k)
        if self.top_k < -1:
            _fail("top_k", self.top_k, "must be -1 or 0 (off) or >= 1")
        _finite("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            _fail("min_p", self.min_p, "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _finite(name, value)
            if not -2.0 <= value <= 2.0:
                _fail(name, value, "must be in [-2, 2]")
        _finite("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0.0:
            _fail("repetition_penalty", self.repetition_penalty, "must be > 0")
        _integer("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            _fail("max_tokens", self.max_tokens, "must be >= 1")
        _integer("min_tokens", self.min_tokens)
        if not 0 <= self.min_tokens <= self.max_tokens:
            _fail("min_tokens", self.min_tokens, f"must be in [0, max_tokens={self.max_tokens}]")
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                _fail("logprobs", self.logprobs, f"must be in [0, {MAX_LOGPROBS}] or None")
        if self.seed is not None:
            _integer("seed", self.seed)
            if not SEED_MIN <= self.seed <= SEED_MAX:
                _fail("seed", self.seed, "must fit in a signed 64-bit integer")
        self._validate_stop()
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be a bool")

    def _validate_stop(self) -> None:
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) for s in self.stop):
            _fail("stop", self.stop, "must be a string or a sequence of strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            _fail("stop", len(self.stop), f"must hold at most {MAX_STOP_STRINGS} strings")
        for s in self.stop:
            if not s:
                _fail("stop", s, "must not contain an empty string")
            if len(s) > MAX_STOP_STRING_CHARS:
                _fail("stop", s, f"strings must be at most {MAX_STOP_STRING_CHARS} characters")
        if not isinstance(self.stop_token_ids, tuple):
            _fail("stop_token_ids", self.stop_token_ids, "must be a sequence of ints")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            _fail(
                "stop_token_ids",
                len(self.stop_token_ids),
                f"must hold at most {MAX_STOP_TOKEN_IDS} ids",
            )
        for token_id in self.stop_token_ids:
            _integer("stop_token_ids", token_id)
            if token_id < 0:
                _fail("stop_token_ids", token_id, "must be >= 0")

    def check_against_model(self, prompt_len: int, max_model_len: int, vocab_size: int) -> None:
        """Checks that need the model and the prompt; raises SamplingParamsError."""
        if prompt_len < 1:
            _fail("prompt", prompt_len, "must hold at least one token")
        if prompt_len >= max_model_len:
            # No room for even one output token: the prompt itself is at fault.
            _fail("prompt", prompt_len, f"length must be < max_model_len={max_model_len}")
        if prompt_len + self.max_tokens > max_model_len:
            _fail(
                "max_tokens",
                self.max_tokens,
                f"plus the prompt ({prompt_len} tokens) must be <= max_model_len="
                f"{max_model_len}; at most {max_model_len - prompt_len} fit",
            )
        for token_id in self.stop_token_ids:
            if token_id >= vocab_size:
                _fail("stop_token_ids", token_id, f"must be < vocab_size={vocab_size}")

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> SamplingParams:
        """From request JSON: unknown keys are rejected, a None value means the default."""
        if not isinstance(d, Mapping):
            _fail("params", d, "must be a mapping of parameter names to values")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise SamplingParamsError(
                unknown[0], d[unknown[0]], f"unknown sampling parameter(s): {', '.join(unknown)}"
            )
        kwargs = {k: v for k, v in d.items() if v is not None}
        for name in ("stop", "stop_token_ids"):
            # JSON has no tuples; a string stays a lone stop string (handled in __post_init__).
            if isinstance(kwargs.get(name), list):
                kwargs[name] = tuple(kwargs[name])
        return cls(**kwargs)  # type: ignore[arg-type]


def _fail(field: str, value: object, rule: str) -> NoReturn:
    raise SamplingParamsError(field, value, f"{field} {rule}, got {value!r}")


def _finite(field: str, value: object) -> None:
    # bool is an int subclass; True as a temperature is a client bug, not 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(field, value, "must be a number")
    if not math.isfinite(value):  # type: ignore[arg-type]
        _fail(field, value, "must be finite")


def _integer(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(field, value, "must be an integer")
