"""Broken checkpoints fail with a CheckpointError that names the file and the tensor."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tandem.workers.model.config import CheckpointError, GptOssConfig, YarnScaling, load_config
from tandem.workers.model.weights import load_model
from tandem.workers.synthetic.checkpoint_writer import tiny_config, write_random_checkpoint

SHARDS = 3
SECOND_SHARD = "model-00002-of-00003.safetensors"
CONFIG = tiny_config(
    vocab_size=96, num_hidden_layers=2, layer_types=("sliding_attention", "full_attention")
)


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    return write_random_checkpoint(tmp_path / "ckpt", CONFIG, seed=1, num_shards=SHARDS)


def _weight_map(root: Path) -> dict[str, str]:
    return json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]


def _rewrite(path: Path, change) -> None:
    """Rewrite a safetensors file with change(dict of tensors) applied."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_config(root: Path, change) -> None:
    path = root / "config.json"
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def _first_in(root: Path, file_name: str, contains: str) -> str:
    return next(n for n, f in _weight_map(root).items() if f == file_name and contains in n)


def test_valid_checkpoint_loads(sharded: Path) -> None:
    model, config = load_model(sharded, dtype=torch.float32)
    assert config == CONFIG
    assert model.layers[1].mlp.experts.down_proj_blocks.dtype == torch.uint8


def test_missing_shard(sharded: Path) -> None:
    (sharded / SECOND_SHARD).unlink()
    with pytest.raises(CheckpointError, match=SECOND_SHARD) as info:
        load_model(sharded)
    assert "missing" in str(info.value)


def test_tensor_missing_from_its_shard(sharded: Path) -> None:
    name = _first_in(sharded, SECOND_SHARD, ".")
    _rewrite(sharded / SECOND_SHARD, lambda t: t.pop(name))
    with pytest.raises(CheckpointError) as info:
        load_model(sharded)
    assert name in str(info.value) and SECOND_SHARD in str(info.value)


def test_tensor_missing_from_index(sharded: Path) -> None:
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.norm.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as info:
        load_model(sharded)
    assert "model.norm.weight" in str(info.value) and "index.json" in str(info.value)


def test_wrong_shape(sharded: Path) -> None:
    name = _first_in(sharded, SECOND_SHARD, "q_proj.weight")
    _rewrite(sharded / SECOND_SHARD, lambda t: t.__setitem__(name, t[name][:-16].contiguous()))
    with pytest.raises(CheckpointError) as info:
        load_model(sharded)
    message = str(info.value)
    assert name in message and SECOND_SHARD in message
    assert "[48, 64]" in message and "expected [64, 64]" in message


@pytest.mark.parametrize(
    ("contains", "dtype", "expected"),
    [("proj_blocks", torch.float32, "U8"), ("router.weight", torch.int32, "BF16")],
)
def test_wrong_dtype(sharded: Path, contains: str, dtype: torch.dtype, expected: str) -> None:
    file_name = next(f for n, f in _weight_map(sharded).items() if contains in n)
    name = _first_in(sharded, file_name, contains)
    _rewrite(sharded / file_name, lambda t: t.__setitem__(name, t[name].to(dtype)))
    with pytest.raises(CheckpointError) as info:
        load_model(sharded)
    message = str(info.value)
    assert name in message and file_name in message and f"expected {expected}" in message


def test_nan_scale_byte(sharded: Path) -> None:
    file_name = next(f for n, f in _weight_map(sharded).items() if "proj_scales" in n)
    name = _first_in(sharded, file_name, "proj_scales")

    def poison(tensors: dict) -> None:
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[5] = 255

    _rewrite(sharded / file_name, poison)
    with pytest.raises(CheckpointError) as info:
        load_model(sharded)
    message = str(info.value)
    assert name in message and file_name in message and "255" in message


def test_float_tensors_may_be_float32(sharded: Path) -> None:
    name = _first_in(sharded, SECOND_SHARD, "q_proj.weight")
    _rewrite(sharded / SECOND_SHARD, lambda t: t.__setitem__(name, t[name].float()))
    load_model(sharded)


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_file(sharded: Path, keep: float) -> None:
    path = sharded / SECOND_SHARD
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=SECOND_SHARD):
        load_model(sharded)


def test_unknown_quant_method(sharded: Path) -> None:
    _edit_config(sharded, lambda d: d["quantization_config"].update(quant_method="gptq"))
    with pytest.raises(CheckpointError, match="gptq") as info:
        load_model(sharded)
    assert "config.json" in str(info.value)


def test_missing_quantization_config(sharded: Path) -> None:
    _edit_config(sharded, lambda d: d.pop("quantization_config"))
    with pytest.raises(CheckpointError, match="quantization_config is missing"):
        load_model(sharded)


def test_unknown_layout(sharded: Path) -> None:
    _edit_config(sharded, lambda d: [d.pop("model_type"), d.pop("num_local_experts")])
    with pytest.raises(CheckpointError, match="unknown checkpoint layout") as info:
        load_model(sharded)
    assert "config.json" in str(info.value)


def test_other_model_type(sharded: Path) -> None:
    _edit_config(sharded, lambda d: d.update(model_type="llama"))
    with pytest.raises(CheckpointError, match="model_type must be 'gpt_oss', got 'llama'"):
        load_model(sharded)


def test_no_weight_files(tmp_path: Path) -> None:
    root = write_random_checkpoint(tmp_path / "ckpt", CONFIG, seed=1)
    (root / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(root)


def test_unexpected_extra_tensor(tmp_path: Path) -> None:
    root = write_random_checkpoint(tmp_path / "ckpt", CONFIG, seed=1)
    _rewrite(
        root / "model.safetensors",
        lambda t: t.__setitem__("model.extra.weight", t["lm_head.weight"].clone()),
    )
    with pytest.raises(CheckpointError, match="unexpected tensor model.extra.weight") as info:
        load_model(root)
    assert "model.safetensors" in str(info.value)


def test_original_layout_missing_tensor(tmp_path: Path) -> None:
    root = write_random_checkpoint(tmp_path / "orig", CONFIG, seed=1, layout="original")
    _rewrite(root / "model.safetensors", lambda t: t.pop("block.1.attn.qkv.bias"))
    with pytest.raises(CheckpointError, match="block.1.attn.qkv.bias") as info:
        load_model(root)
    assert "model.safetensors" in str(info.value)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "absent")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_experts_per_tok", 7, "num_experts_per_tok (7) must be <= num_local_experts (6)"),
        ("hidden_size", 80, "hidden_size must be a multiple of 32"),
        ("intermediate_size", 48, "intermediate_size must be a multiple of 32"),
        ("num_key_value_heads", 3, "divisible by num_key_value_heads (3)"),
        ("tie_word_embeddings", True, "tie_word_embeddings must be False"),
        ("vocab_size", 0, "vocab_size must be a positive integer"),
        ("layer_types", ["sliding_attention"], "layer_types has 1 entries"),
        ("eos_token_id", [1, 2], "eos_token_id must be a single id"),
    ],
)
def test_invalid_config_field(tmp_path: Path, field: str, value, message: str) -> None:
    root = write_random_checkpoint(tmp_path / "ckpt", CONFIG, seed=1)
    _edit_config(root, lambda d: d.update({field: value}))
    with pytest.raises(CheckpointError) as info:
        load_config(root)
    assert message in str(info.value) and "config.json" in str(info.value)


def test_yarn_type_and_truncate_are_read() -> None:
    base = {
        "model_type": "gpt_oss",
        "quantization_config": {"quant_method": "mxfp4"},
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "num_local_experts": 2,
        "num_experts_per_tok": 1,
        "sliding_window": 4,
        "rope_theta": 150000,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "swiglu_limit": 7.0,
    }
    yarn = {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096}
    config = GptOssConfig.from_hf_dict({**base, "rope_scaling": {**yarn, "truncate": False}})
    assert config.rope_scaling is not None and config.rope_scaling.truncate is False
    assert config.layer_types == ("sliding_attention", "full_attention")
    # transformers' default when the key is absent is to truncate.
    assert GptOssConfig.from_hf_dict({**base, "rope_scaling": yarn}).rope_scaling.truncate is True
    # Absent or null: gpt-oss's YaRN, as transformers' GptOssConfig reads it; plain RoPE
    # must say so.
    default = YarnScaling(32.0, 32.0, 1.0, 4096, False)
    assert GptOssConfig.from_hf_dict(base).rope_scaling == default
    assert GptOssConfig.from_hf_dict({**base, "rope_scaling": None}).rope_scaling == default
    plain = GptOssConfig.from_hf_dict({**base, "rope_scaling": {"rope_type": "default"}})
    assert plain.rope_scaling is None
    with pytest.raises(ValueError, match="rope_type 'linear' is not supported"):
        GptOssConfig.from_hf_dict({**base, "rope_scaling": {**yarn, "rope_type": "linear"}})
    with pytest.raises(ValueError, match="config.json: rope_theta is missing"):
        GptOssConfig.from_hf_dict({k: v for k, v in base.items() if k != "rope_theta"})


def test_real_gpt_oss_20b_configs_agree() -> None:
    # The two config.json files of openai/gpt-oss-20b (HF root and original/), as published.
    layer_types = ["sliding_attention", "full_attention"] * 12
    hf = {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": 200002,
        "experts_per_token": 4,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 2880,
        "initial_context_length": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 2880,
        "layer_types": layer_types,
        "max_position_embeddings": 131072,
        "model_type": "gpt_oss",
        "num_attention_heads": 64,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 24,
        "num_key_value_heads": 8,
        "num_local_experts": 32,
        "output_router_logits": False,
        "pad_token_id": 199999,
        "quantization_config": {
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
            "quant_method": "mxfp4",
        },
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": 128,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "transformers_version": "4.55.0.dev0",
        "use_cache": True,
        "vocab_size": 201088,
    }
    original = {
        "num_hidden_layers": 24,
        "num_experts": 32,
        "experts_per_token": 4,
        "vocab_size": 201088,
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "swiglu_limit": 7.0,
        "head_dim": 64,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "sliding_window": 128,
        "initial_context_length": 4096,
        "rope_theta": 150000,
        "rope_scaling_factor": 32.0,
        "rope_ntk_alpha": 1,
        "rope_ntk_beta": 32,
    }
    from_hf = GptOssConfig.from_hf_dict(hf)
    from_original = GptOssConfig.from_original_dict(original)
    assert from_hf == replace(from_original, eos_token_id=200002, pad_token_id=199999)
    assert from_hf.rope_scaling == YarnScaling(32.0, 32.0, 1.0, 4096, truncate=False)
    assert from_hf.max_position_embeddings == 131072 and from_hf.rms_norm_eps == 1e-5
    assert [g.name for g in from_hf.kv_groups] == ["full", "sliding"]
    assert from_hf.kv_groups[0].layers == tuple(range(1, 24, 2))
    assert from_hf.kv_groups[1].layers == tuple(range(0, 24, 2))
    assert (
        from_hf.kv_groups[1].sliding_window == 128 and from_hf.kv_groups[0].sliding_window is None
    )
    assert from_hf.kv_group_of_layer(0) == 1 and from_hf.kv_group_of_layer(23) == 0
