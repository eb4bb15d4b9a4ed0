"""Admission control on a controlled clock: exact limits, refusals and retry-after."""

from __future__ import annotations

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
    control.first_token(100, ttft_s=3.0)  # within the same bound interval: no second cut
    assert control.limit_tokens == 400
    clock.t += 1.0
    control.first_token(100, ttft_s=1.5)  # 400 * 0.8 = 320 < 600 waiting * 1 / 1.5
    assert control.limit_tokens == 320
    # the retry-after follows the recent starts: 2.0, then 0.8 * 2.0 + 0.2 * 3.0 = 2.2,
    # then 0.8 * 2.2 + 0.2 * 1.5 = 2.06 -> 3 s
    with pytest.raises(Overloaded) as err:
        control.admit(100)
    assert err.value.retry_after_s == 3
    clock.t += 1.0
    control.first_token(100, ttft_s=50.0)
    assert control.limit_tokens == 100  # never below min_limit_tokens


def test_fast_starts_near_the_limit_raise_it():
    control, _ = _control(increase=0.5)
    for _ in range(6):
        control.started(100)
    control.first_token(100, ttft_s=0.2)  # 600 waiting >= half the limit: grow by 50
    assert control.limit_tokens == 1050
    for _ in range(3):
        control.first_token(100, ttft_s=0.2)  # 500, 400, 300 waiting: under half (525)
    assert control.limit_tokens == 1050


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="admission.max_start_delay_s must be > 0"):
        AdmissionConfig(max_start_delay_s=0)
    with pytest.raises(ValueError, match="min_limit_tokens"):
        AdmissionConfig(min_limit_tokens=0)
