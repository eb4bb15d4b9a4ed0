"""Admission control on a controlled clock: exact limits, refusals and retry-after."""

from __future__ import annotations

import functools
import random

import pytest

from tandem.cluster.admission import AdmissionConfig, AdmissionControl, Overloaded


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _control(**config) -> tuple[AdmissionControl, Clock]:
    clock = Clock()
    defaults = {"max_start_delay_s": 1.0, "initial_limit_tokens": 1000, "min_limit_tokens": 100}
    return AdmissionControl(AdmissionConfig(**{**defaults, **config}), clock), clock


def test_admits_up_to_the_limit_and_one_request_always():
    control, _ = _control()
    control.admit(5000)  # an empty backlog admits any one request
    control.started(5000)
    with pytest.raises(Overloaded) as err:
        control.admit(1)
    assert err.value.retry_after_s == 1 and "5000 prompt tokens are waiting" in str(err.value)
    control.abandoned(5000)
    for _ in range(10):
        control.admit(100)
        control.started(100)
    with pytest.raises(Overloaded):
        control.admit(1)


def test_slow_starts_cut_the_limit_to_what_started_in_time():
    control, clock = _control()
    for _ in range(8):
        control.started(100)
    # 800 tokens were waiting and this start took 2 s against a 1 s bound: 400 fit
    control.first_token(100, ttft_s=2.0)
    assert control.limit_tokens == 400 and control.backlog_tokens == 700
    # admitted before that cut: it measured the old limit, no second cut
    clock.t += 0.5
    control.first_token(100, ttft_s=3.0)
    assert control.limit_tokens == 400
    # admitted 0.5 s after the cut, slow again: 400 * 0.8 = 320 < 600 waiting * 1 / 1.5
    clock.t += 1.5
    control.first_token(100, ttft_s=1.5)
    assert control.limit_tokens == 320
    # the retry-after follows the recent starts: 2.0, then 0.8 * 2.0 + 0.2 * 3.0 = 2.2,
    # then 0.8 * 2.2 + 0.2 * 1.5 = 2.06 -> 3 s
    with pytest.raises(Overloaded) as err:
        control.admit(100)
    assert err.value.retry_after_s == 3
    clock.t += 50.0
    control.first_token(100, ttft_s=50.0)
    assert control.limit_tokens == 100  # never below min_limit_tokens


def test_fast_starts_near_the_limit_raise_it():
    control, _ = _control(increase=0.5)
    for _ in range(7):
        control.started(100)
    # slow start: 700 waiting >= half the limit, a start within half the bound: + 100
    control.first_token(100, ttft_s=0.2)
    assert control.limit_tokens == 1100 and control.slow_start
    # 600 waiting; a start past half the bound ends slow start: + 100 * 0.5 from now on
    control.first_token(100, ttft_s=0.6)
    assert control.limit_tokens == 1150 and not control.slow_start
    for _ in range(3):
        control.first_token(100, ttft_s=0.2)  # 500, 400, 300 waiting: under half (575)
    assert control.limit_tokens == 1150


def test_a_cut_ends_slow_start():
    control, clock = _control()
    for _ in range(8):
        control.started(100)
    control.first_token(100, ttft_s=2.0)
    assert not control.slow_start
    clock.t += 5.0
    control.first_token(100, ttft_s=0.1)  # 700 waiting >= 200: additive, + 100 * 0.25
    assert control.limit_tokens == 425


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="admission.max_start_delay_s must be > 0"):
        AdmissionConfig(max_start_delay_s=0)
    with pytest.raises(ValueError, match="min_limit_tokens"):
        AdmissionConfig(min_limit_tokens=0)


# ---------------------------------------------------------------- against a modelled pool


class BatchingPool:
    """A prefill pool as a discrete-event model: one server takes every waiting request
    (up to `max_batch`) into a batch that costs `overhead_s + per_token_s * tokens`; each
    request of the batch starts (first token) when the batch ends. Batching makes the
    throughput grow with the backlog, which is what a concurrency limit must not mistake
    for the pool's capacity."""

    def __init__(self, overhead_s: float, per_token_s: float, max_batch: int) -> None:
        self.overhead_s, self.per_token_s, self.max_batch = overhead_s, per_token_s, max_batch

    def run(self, arrivals: list[float], tokens: int, admit) -> list[float]:
        """Feed `arrivals` (sorted times) through `admit(now, tokens)`, which returns None
        (refused) or the callback `done(now, ttft)` for the request's first token, in time
        order with the arrivals; returns the admitted requests' TTFTs."""
        queue: list[tuple[float, object]] = []
        batch: list[tuple[float, object]] = []
        ends_at, ttfts, i = 0.0, [], 0
        while i < len(arrivals) or queue or batch:
            now = arrivals[i] if i < len(arrivals) else float("inf")
            if batch and ends_at <= now:
                now = ends_at
                for sent, done in batch:
                    ttfts.append(now - sent)
                    done(now, now - sent)
                batch = []
            else:
                done = admit(now, tokens)
                if done is not None:
                    queue.append((now, done))
                i += 1
            if queue and not batch:
                batch, queue = queue[: self.max_batch], queue[self.max_batch :]
                ends_at = now + self.overhead_s + self.per_token_s * tokens * len(batch)
        return ttfts


def _poisson(rate: float, duration_s: float, seed: int) -> list[float]:
    rng, t, out = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return out
        out.append(t)


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def _adaptive(bound_s: float, initial_limit_tokens: int):
    clock = Clock()
    config = AdmissionConfig(max_start_delay_s=bound_s, initial_limit_tokens=initial_limit_tokens)
    control = AdmissionControl(config, clock)

    def admit(now: float, tokens: int):
        clock.t = now
        try:
            control.admit(tokens)
        except Overloaded:
            return None
        control.started(tokens)

        def done(at: float, ttft: float) -> None:
            clock.t = at
            control.first_token(tokens, ttft)

        return done

    return admit


def _static(limit_tokens: int):
    backlog = [0]

    def admit(now: float, tokens: int):
        if backlog[0] and backlog[0] + tokens > limit_tokens:
            return None
        backlog[0] += tokens

        def done(at: float, ttft: float) -> None:
            backlog[0] -= tokens

        return done

    return admit


POOLS = {
    "cpu-160": (BatchingPool(0.1, 0.0002, 16), 160),  # the CPU cluster's: overhead dominates
    "512": (BatchingPool(0.05, 0.0001, 32), 512),
    "gpu-1024": (BatchingPool(0.02, 0.000025, 64), 1024),  # a GPU prefill pool: 40k tokens/s
}


def _bound(name: str) -> float:
    pool, tokens = POOLS[name]
    return 2 * (pool.overhead_s + pool.per_token_s * tokens)  # twice the unloaded TTFT


@functools.cache
def _best_static_rate(name: str) -> float:
    """The most requests/s a static backlog limit admits with TTFT p99 within the bound,
    under a flood (the best static limit in hindsight)."""
    pool, tokens = POOLS[name]
    flood = _poisson(1000.0, 60.0, seed=1)
    rates = []
    for k in range(1, 65):
        ttfts = pool.run(flood, tokens, _static(k * tokens))
        if _p99(ttfts) <= _bound(name):
            rates.append(len(ttfts) / 60.0)
    return max(rates)


@pytest.mark.parametrize("duration", [60.0, 10.0])
@pytest.mark.parametrize("name", POOLS)
def test_at_3x_capacity_the_limit_keeps_its_bound_near_the_best_static_limit(name, duration):
    """Offered 3x what the pool serves within the bound: the adaptive limit keeps admitted
    TTFT p99 within 1.5x the bound and admits at least 80% of what the best static limit
    admits, over a minute and over the first 10 s (where slow start's overshoot would
    show). Its initial limit is what AdmissionConfig says to set: about the prompt tokens
    the pools start within the bound."""
    pool, tokens = POOLS[name]
    best_rate = _best_static_rate(name)
    initial = int(best_rate * tokens * _bound(name))
    arrivals = _poisson(3 * best_rate, duration, seed=2)
    ttfts = pool.run(arrivals, tokens, _adaptive(_bound(name), initial))
    assert _p99(ttfts) <= 1.5 * _bound(name), (_p99(ttfts), _bound(name))
    assert len(ttfts) / duration >= 0.8 * best_rate, (len(ttfts) / duration, best_rate)
