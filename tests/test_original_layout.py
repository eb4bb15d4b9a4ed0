"""OpenAI's `original/` layout as the model repository ships it: the weights and OpenAI's
config.json in `original/`, tokenizer.json in the repository root beside it."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tandem.workers.engine.llm_engine import EngineConfig, LLMEngine
from tandem.workers.engine.sampling_params import SamplingParams
from tandem.workers.synthetic.checkpoint_writer import tiny_config, write_random_checkpoint
from tandem.workers.synthetic.tiny_model import TINY_CONFIG
from tandem.workers.synthetic.tokenizer_training import save_tokenizer, train_tiny_tokenizer
from tandem.workers.text.tokenizer import Tokenizer

# The fields of OpenAI's ModelConfig (gpt_oss/torch/model.py), whose loader builds
# `ModelConfig(**json.load(config.json))` and so fails on any other key.
OPENAI_MODEL_CONFIG_FIELDS = {
    "num_hidden_layers",
    "num_experts",
    "experts_per_token",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "swiglu_limit",
    "head_dim",
    "num_attention_heads",
    "num_key_value_heads",
    "sliding_window",
    "initial_context_length",
    "rope_theta",
    "rope_scaling_factor",
    "rope_ntk_alpha",
    "rope_ntk_beta",
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository: HF files at the root (tokenizer.json among them), original/."""
    root = tmp_path_factory.mktemp("gpt-oss-repo")
    save_tokenizer(train_tiny_tokenizer(), root)
    tok = Tokenizer.from_dir(root)
    config = replace(
        TINY_CONFIG,
        vocab_size=tok.vocab_size,
        eos_token_id=tok.special.return_,
        pad_token_id=tok.special.endoftext,
    )
    write_random_checkpoint(root, config, seed=3)
    write_random_checkpoint(root / "original", config, seed=3, layout="original")
    return root


def test_original_config_has_exactly_openai_fields(repo: Path) -> None:
    written = json.loads((repo / "original" / "config.json").read_text())
    assert set(written) == OPENAI_MODEL_CONFIG_FIELDS


def test_writer_refuses_what_openai_config_cannot_say(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rms_norm_eps"):
        write_random_checkpoint(tmp_path, tiny_config(rms_norm_eps=1e-6), 0, layout="original")


def test_tokenizer_found_beside_original(repo: Path, tmp_path: Path) -> None:
    beside = Tokenizer.from_dir(repo / "original")
    assert beside.source == str(repo / "tokenizer.json")
    lone = tmp_path / "original"
    lone.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        Tokenizer.from_dir(lone)
    assert str(lone / "tokenizer.json") in str(err.value)
    assert str(tmp_path / "tokenizer.json") in str(err.value)


def test_generate_cli_on_original_dir(repo: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "tandem.cluster.cli", "generate"]
        + ["--model", str(repo / "original"), "--prompt", "The model reads the tokens"]
        + ["--max-tokens", "8", "--temperature", "0", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    # Same weights in the HF layout at the root: the same greedy ids.
    engine = LLMEngine.from_model_dir(repo, EngineConfig(device="cpu", dtype="float32"))
    tok = Tokenizer.from_dir(repo)
    [expected] = engine.generate(
        [tok.encode("The model reads the tokens")], SamplingParams(temperature=0.0, max_tokens=8)
    )
    assert got["token_ids"] == expected.token_ids
    assert got["text"] == expected.text
