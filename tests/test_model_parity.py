"""Our gpt-oss against transformers' GptOssForCausalLM on random checkpoints, in float32.

transformers is the independent reference: it reads the same files with its own loader,
dequantises MXFP4 with its own code (Mxfp4Config(dequantize=True); on CPU it dequantises
anyway), runs eager attention with sinks and its own YaRN, and decodes with its own
DynamicCache. Configs vary every size the model takes from config.json.
"""

import dataclasses
import json
import math

import pytest
import torch

import tandem.workers.model.moe as moe_module
from tandem.workers.model.attention import build_attention_metadata
from tandem.workers.model.config import FULL, SLIDING, GptOssConfig, YarnScaling
from tandem.workers.model.gpt_oss import GptOssModel, allocate_kv_caches
from tandem.workers.model.layers import rotary_inv_freq
from tandem.workers.model.weights import load_model
from tandem.workers.synthetic.checkpoint_writer import tiny_config, write_random_checkpoint
from tests.support.hf_reference import greedy_with_logits, load_transformers

NEW_TOKENS = 64
BLOCK_SIZE = 8

CONFIGS = {
    "tiny": tiny_config(eos_token_id=1000, pad_token_id=999),
    "odd": tiny_config(
        vocab_size=300,
        hidden_size=96,
        intermediate_size=32,
        num_hidden_layers=3,
        layer_types=(SLIDING, FULL, SLIDING),
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=5,
        num_experts_per_tok=3,
        sliding_window=8,
    ),
    "wide_heads": tiny_config(
        vocab_size=517,
        hidden_size=32,
        intermediate_size=96,
        num_hidden_layers=2,
        layer_types=(FULL, SLIDING),
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        num_local_experts=4,
        num_experts_per_tok=4,
        sliding_window=12,
        rope_theta=10000.0,
        rope_scaling=YarnScaling(
            factor=8.0,
            beta_fast=16.0,
            beta_slow=2.0,
            original_max_position_embeddings=2048,
            truncate=False,
        ),
        max_position_embeddings=16384,
        attention_bias=False,
        swiglu_limit=5.0,
    ),
    # Plain RoPE: written as rope_type "default" (transformers reads a null as YaRN).
    "plain_rope": tiny_config(
        vocab_size=200, num_hidden_layers=2, layer_types=(FULL, SLIDING), rope_theta=10000.0,
        rope_scaling=None,
    ),
}


def _prompt(config: GptOssConfig, length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (length,), generator=gen).tolist()


def _assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    bound = 1e-4 * max(1.0, ref.abs().max().item())
    err = (ours - ref).abs().max().item()
    assert err <= bound, f"max abs diff {err:.3e} > {bound:.3e}"


def _greedy_ours(model: GptOssModel, prompt: list[int], steps: int) -> tuple[list[int], list]:
    """Prefill then one token per step through the paged cache; (tokens, per-step logits)."""
    config = model.config
    blocks = math.ceil((len(prompt) + steps) / BLOCK_SIZE)
    caches = allocate_kv_caches(
        config, [blocks] * len(config.kv_groups), BLOCK_SIZE, model.dtype, "cpu"
    )
    table = list(range(blocks))
    tables = [[table] for _ in config.kv_groups]
    tokens, step_logits = list(prompt), []
    new = list(prompt)
    for _ in range(steps):
        length = len(tokens)
        metadata = build_attention_metadata([length], [len(new)], tables, BLOCK_SIZE)
        positions = torch.arange(length - len(new), length)
        hidden = model(torch.tensor(new), positions, metadata, caches)
        logits = model.compute_logits(hidden[-1:])[0]
        step_logits.append(logits)
        new = [int(logits.argmax())]
        tokens += new
    return tokens[len(prompt) :], step_logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_greedy_match_transformers(name: str, tmp_path, monkeypatch) -> None:
    config = CONFIGS[name]
    write_random_checkpoint(tmp_path, config, seed=7)
    ours, loaded_config = load_model(tmp_path, dtype=torch.float32)
    assert loaded_config == config
    reference = load_transformers(tmp_path)
    prompt = _prompt(config, 40, seed=11)

    # Record how often the SwiGLU clamp bites, to show the checkpoint exercises it.
    seen = {"clamped": 0, "total": 0}
    original_swiglu = moe_module.clamped_swiglu

    def recording_swiglu(gate_up: torch.Tensor, limit: float) -> torch.Tensor:
        gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
        seen["clamped"] += int((gate > limit).sum() + (up.abs() > limit).sum())
        seen["total"] += gate_up.numel()
        return original_swiglu(gate_up, limit)

    monkeypatch.setattr(moe_module, "clamped_swiglu", recording_swiglu)
    logits = ours.forward_full(prompt, block_size=BLOCK_SIZE)
    monkeypatch.undo()
    assert 0 < seen["clamped"] < 0.2 * seen["total"], seen

    with torch.no_grad():
        ref_logits = reference(input_ids=torch.tensor([prompt])).logits[0]
    assert logits.shape == (len(prompt), config.vocab_size)
    _assert_logits_close(logits, ref_logits)

    our_tokens, our_steps = _greedy_ours(ours, prompt, NEW_TOKENS)
    ref_tokens, ref_steps = greedy_with_logits(reference, prompt, NEW_TOKENS)
    for step, (a, b) in enumerate(zip(our_steps, ref_steps, strict=True)):
        if our_tokens[:step] != ref_tokens[:step]:
            break
        _assert_logits_close(a, b)
        top2 = torch.topk(b, 2).values
        assert top2[0] - top2[1] > 1e-3, f"near-tie at step {step}: the checkpoint is a bad test"
    assert our_tokens == ref_tokens
    assert len(set(our_tokens)) > 8, "greedy output degenerate: the checkpoint is a bad test"


def test_transformers_honours_yarn_truncate_false(tmp_path) -> None:
    config = CONFIGS["tiny"]
    write_random_checkpoint(tmp_path, config, seed=3)
    reference = load_transformers(tmp_path)
    rotary = reference.model.rotary_emb
    assert reference.config.rope_parameters["truncate"] is False
    ours, mscale = rotary_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    torch.testing.assert_close(rotary.inv_freq, ours, rtol=1e-6, atol=0)
    assert rotary.attention_scaling == pytest.approx(mscale, rel=1e-12)
    truncated = dataclasses.replace(config.rope_scaling, truncate=True)
    rounded, _ = rotary_inv_freq(config.head_dim, config.rope_theta, truncated)
    assert (rounded - rotary.inv_freq).abs().max() > 1e-4 * rotary.inv_freq.abs().max()


def test_yarn_matches_gpt_oss_numbers() -> None:
    # GPT_OSS.md 2.4 at the real shape: D 64, theta 150000, s 32, L0 4096, betas 32 / 1.
    scaling = YarnScaling(32.0, 32.0, 1.0, 4096, truncate=False)
    inv_freq, mscale = rotary_inv_freq(64, 150000.0, scaling)
    assert mscale == pytest.approx(1.3465736, abs=1e-7)
    low = 32 * math.log(4096 / (32 * 2 * math.pi)) / math.log(150000.0)
    high = 32 * math.log(4096 / (1 * 2 * math.pi)) / math.log(150000.0)
    assert low == pytest.approx(8.0928, abs=1e-4) and high == pytest.approx(17.3980, abs=1e-4)
    for i in range(32):
        f = 150000.0 ** (2 * i / 64)
        r = min(max((i - low) / (high - low), 0.0), 1.0)
        assert inv_freq[i].item() == pytest.approx((1 - r) / f + r / (32 * f), rel=1e-6)


def test_original_layout_and_shards_give_identical_logits(tmp_path) -> None:
    config = CONFIGS["tiny"]
    write_random_checkpoint(tmp_path / "hf", config, seed=5)
    write_random_checkpoint(tmp_path / "sharded", config, seed=5, num_shards=3)
    write_random_checkpoint(tmp_path / "openai" / "original", config, seed=5, layout="original")
    prompt = _prompt(config, 40, seed=2)
    hf_model, hf_config = load_model(tmp_path / "hf", dtype=torch.float32)
    expected = hf_model.forward_full(prompt, block_size=BLOCK_SIZE)
    sharded, sharded_config = load_model(tmp_path / "sharded", dtype=torch.float32)
    assert sharded_config == hf_config
    assert torch.equal(sharded.forward_full(prompt, block_size=BLOCK_SIZE), expected)
    # The parent of original/ is accepted too; the OpenAI config carries no special ids and
    # no position limit (OpenAI's ModelConfig has neither): the limit is the implied one.
    original, original_config = load_model(tmp_path / "openai", dtype=torch.float32)
    written = json.loads((tmp_path / "openai" / "original" / "config.json").read_text())
    assert "max_position_embeddings" not in written and "rms_norm_eps" not in written
    implied = config.rope_scaling.original_max_position_embeddings * config.rope_scaling.factor
    assert original_config == dataclasses.replace(
        hf_config, eos_token_id=None, pad_token_id=None, max_position_embeddings=int(implied)
    )
    assert torch.equal(original.forward_full(prompt, block_size=BLOCK_SIZE), expected)
