"""SamplingParams: every rule rejects what it should, names the field, and accepts the rest."""

import math

import pytest

from tandem.workers.engine.sampling_params import (
    MAX_LOGPROBS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    SamplingParams,
    SamplingParamsError,
)

INVALID = [
    # (constructor kwargs, field named by the error)
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": math.nan}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": math.nan}, "min_p"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"presence_penalty": -math.inf}, "presence_penalty"),
    ({"frequency_penalty": -3.0}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"repetition_penalty": math.inf}, "repetition_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"min_tokens": 17}, "min_tokens"),  # > max_tokens = 16
    ({"min_tokens": -1}, "min_tokens"),
    ({"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"seed": 2**63}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"seed": 1.0}, "seed"),
    ({"stop": ("ok", "")}, "stop"),
    ({"stop": ("x" * (MAX_STOP_STRING_CHARS + 1),)}, "stop"),
    ({"stop": tuple(str(i) for i in range(MAX_STOP_STRINGS + 1))}, "stop"),
    ({"stop": (1,)}, "stop"),
    ({"stop_token_ids": (3, -1)}, "stop_token_ids"),
    ({"stop_token_ids": (3.0,)}, "stop_token_ids"),
    ({"ignore_eos": 1}, "ignore_eos"),
]


@pytest.mark.parametrize(("kwargs", "field"), INVALID, ids=[str(k) for k, _ in INVALID])
def test_invalid_value_names_field(kwargs: dict, field: str) -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)
    assert field in str(info.value)


@pytest.mark.parametrize(("kwargs", "field"), INVALID, ids=[str(k) for k, _ in INVALID])
def test_from_dict_rejects_the_same(kwargs: dict, field: str) -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.from_dict(kwargs)
    assert info.value.field == field


def test_message_shows_bad_value() -> None:
    with pytest.raises(SamplingParamsError, match=r"top_p .*1\.5") as info:
        SamplingParams(top_p=1.5)
    assert info.value.value == 1.5


VALID_EDGES = [
    {"temperature": 0.0},
    {"temperature": 0, "top_p": 0.5, "top_k": 3},  # greedy with truncation still validated
    {"top_p": 1.0},
    {"top_p": 1e-6},
    {"top_k": -1},
    {"top_k": 0},
    {"top_k": 1},
    {"min_p": 0.0},
    {"min_p": 1.0},
    {"presence_penalty": -2.0, "frequency_penalty": 2.0},
    {"repetition_penalty": 1e-3},
    {"max_tokens": 1},
    {"min_tokens": 16},
    {"logprobs": 0},
    {"logprobs": MAX_LOGPROBS},
    {"seed": 2**63 - 1},
    {"seed": -(2**63)},
    {"stop": ("x" * MAX_STOP_STRING_CHARS,) * MAX_STOP_STRINGS},
    {"stop_token_ids": (0, 5)},
]


@pytest.mark.parametrize("kwargs", VALID_EDGES, ids=[str(k) for k in VALID_EDGES])
def test_boundary_values_accepted(kwargs: dict) -> None:
    SamplingParams(**kwargs)


def test_defaults() -> None:
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.seed, p.logprobs) == (16, 0, None, None)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.include_stop_str_in_output) == (
        (),
        (),
        False,
        False,
    )
    assert not p.is_greedy and not p.uses_top_k and not p.uses_penalties


def test_greedy_and_flags() -> None:
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams(temperature=0.01).is_greedy
    assert not SamplingParams(top_k=-1).uses_top_k
    assert SamplingParams(top_k=5).uses_top_k
    assert SamplingParams(presence_penalty=0.1).uses_penalties
    assert SamplingParams(repetition_penalty=1.1).uses_penalties


def test_frozen_and_normalised() -> None:
    p = SamplingParams(stop="END", stop_token_ids=[7, 9])  # type: ignore[arg-type]
    assert p.stop == ("END",) and p.stop_token_ids == (7, 9)
    hash(p)
    with pytest.raises(AttributeError):
        p.temperature = 0.5  # type: ignore[misc]


def test_from_dict() -> None:
    p = SamplingParams.from_dict(
        {"temperature": 0.7, "stop": ["a", "b"], "stop_token_ids": [3], "top_p": None}
    )
    assert p == SamplingParams(temperature=0.7, stop=("a", "b"), stop_token_ids=(3,))
    assert SamplingParams.from_dict({"stop": "x"}).stop == ("x",)


def test_from_dict_unknown_keys_named() -> None:
    with pytest.raises(SamplingParamsError, match="best_of, n") as info:
        SamplingParams.from_dict({"temperature": 1.0, "n": 2, "best_of": 3})
    assert info.value.field == "best_of"


def test_from_dict_needs_a_mapping() -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.from_dict([("temperature", 1.0)])  # type: ignore[arg-type]
    assert info.value.field == "params"


MODEL_CHECKS = [
    # (params kwargs, prompt_len, max_model_len, vocab_size, field or None when valid)
    ({"max_tokens": 10}, 90, 100, 50, None),
    ({"max_tokens": 11}, 90, 100, 50, "max_tokens"),
    ({"max_tokens": 1}, 100, 100, 50, "prompt"),  # prompt alone fills the window
    ({"max_tokens": 1}, 150, 100, 50, "prompt"),
    ({"max_tokens": 1}, 0, 100, 50, "prompt"),
    ({"stop_token_ids": (49,)}, 5, 100, 50, None),
    ({"stop_token_ids": (3, 50)}, 5, 100, 50, "stop_token_ids"),
]


@pytest.mark.parametrize(
    ("kwargs", "prompt_len", "max_model_len", "vocab_size", "field"), MODEL_CHECKS
)
def test_check_against_model(
    kwargs: dict, prompt_len: int, max_model_len: int, vocab_size: int, field: str | None
) -> None:
    p = SamplingParams(**kwargs)
    if field is None:
        p.check_against_model(prompt_len, max_model_len, vocab_size)
        return
    with pytest.raises(SamplingParamsError) as info:
        p.check_against_model(prompt_len, max_model_len, vocab_size)
    assert info.value.field == field
