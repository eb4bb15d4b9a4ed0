"""When requests arrive: open-loop arrival processes over a rate that may change in time.

A `RateSchedule` is a list of phases, each holding a rate or ramping linearly between two
rates; an `ArrivalProcess` turns it into arrival times (seconds from the start), seeded:

    Poisson(schedule)      exponential gaps (a memoryless stream of independent users)
    Gamma(schedule, cv)    gamma gaps with coefficient of variation cv (> 1: bursty)
    Constant(schedule)     evenly spaced

A time-varying rate is handled by time change: draw the gaps of a unit-rate process and
map the cumulative count back through the integrated rate Lambda(t) = int_0^t rate. The
count in any phase then has the phase's expected value whatever the process, and a zero
rate phase has no arrivals.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    """`duration_s` seconds during which the rate goes linearly from `rate` to `end_rate`
    (requests per second; `end_rate` None: constant)."""

    duration_s: float
    rate: float
    end_rate: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise ValueError(f"phase duration_s must be > 0, got {self.duration_s}")
        for name in ("rate", "end_rate"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"phase {name} must be >= 0 requests/s, got {value}")

    @property
    def final_rate(self) -> float:
        return self.rate if self.end_rate is None else self.end_rate

    def expected_count(self) -> float:
        return 0.5 * (self.rate + self.final_rate) * self.duration_s


@dataclass(frozen=True)
class RateSchedule:
    phases: tuple[Phase, ...]

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError("a rate schedule needs at least one phase")

    @classmethod
    def constant(cls, rate: float, duration_s: float) -> RateSchedule:
        return cls((Phase(duration_s, rate),))

    @classmethod
    def parse(cls, text: str) -> RateSchedule:
        """'30s@2,60s@2->8,30s@8->1': phases of DURATION@RATE or DURATION@START->END."""
        phases = []
        for part in text.split(","):
            try:
                duration, rates = part.strip().split("@")
                start, _, end = rates.partition("->")
                phases.append(
                    Phase(float(duration.rstrip("s")), float(start), float(end) if end else None)
                )
            except ValueError as err:
                raise ValueError(
                    f"--schedule: bad phase {part!r} (DURATION@RATE or DURATION@START->END, "
                    f"for example 30s@2 or 60s@2->8): {err}"
                ) from None
        return cls(tuple(phases))

    @property
    def duration_s(self) -> float:
        return sum(p.duration_s for p in self.phases)

    def rate_at(self, t: float) -> float:
        for phase in self.phases:
            if t < phase.duration_s:
                return phase.rate + (phase.final_rate - phase.rate) * t / phase.duration_s
            t -= phase.duration_s
        return 0.0

    def time_of(self, count: float) -> float | None:
        """The t with Lambda(t) == count, or None past the schedule's end."""
        start = 0.0
        for phase in self.phases:
            total = phase.expected_count()
            if count <= total and total > 0:
                a, b = phase.rate, (phase.final_rate - phase.rate) / phase.duration_s
                # count = a*u + b*u^2/2 on this phase's own clock u
                if abs(b) < 1e-12:
                    u = count / a
                else:
                    u = (-a + math.sqrt(max(a * a + 2 * b * count, 0.0))) / b
                return start + min(max(u, 0.0), phase.duration_s)
            count -= total
            start += phase.duration_s
        return None


class ArrivalProcess(ABC):
    """Arrival times over a schedule. Contract: `times(seed)` yields non-decreasing times
    in [0, schedule.duration_s), the same sequence for the same seed."""

    def __init__(self, schedule: RateSchedule) -> None:
        self.schedule = schedule

    @abstractmethod
    def unit_gap(self, rng: random.Random) -> float:
        """One gap of the process at rate 1 (mean 1)."""

    def times(self, seed: int) -> Iterator[float]:
        rng = random.Random(seed)
        count = 0.0
        while True:
            count += self.unit_gap(rng)
            t = self.schedule.time_of(count)
            if t is None or t >= self.schedule.duration_s:
                return
            yield t


class Poisson(ArrivalProcess):
    def unit_gap(self, rng: random.Random) -> float:
        return rng.expovariate(1.0)


class Gamma(ArrivalProcess):
    """Gamma gaps of mean 1 and coefficient of variation `cv` (shape 1/cv^2)."""

    def __init__(self, schedule: RateSchedule, cv: float) -> None:
        if not (math.isfinite(cv) and cv > 0):
            raise ValueError(f"gamma cv must be > 0, got {cv}")
        super().__init__(schedule)
        self.shape = 1.0 / (cv * cv)

    def unit_gap(self, rng: random.Random) -> float:
        return rng.gammavariate(self.shape, 1.0 / self.shape)


class Constant(ArrivalProcess):
    def unit_gap(self, rng: random.Random) -> float:
        return 1.0


def make_arrivals(kind: str, schedule: RateSchedule, cv: float = 2.0) -> ArrivalProcess:
    kinds = {"poisson": Poisson, "constant": Constant}
    if kind == "gamma":
        return Gamma(schedule, cv)
    if kind not in kinds:
        raise ValueError(f"--arrival must be one of poisson, gamma, constant; got {kind!r}")
    return kinds[kind](schedule)

