"""Write a randomly initialised gpt-oss checkpoint (any size) in the HF or OpenAI original layout.

Used for the embedded tiny model and for tests. Files match the real checkpoints: bf16
tensors, MXFP4 experts (random weights rounded by quantize_mxfp4), the real config keys.
The same seed gives the same weights in either layout, byte for byte.

Initial scales are chosen so that the model is a useful test subject: next-token logits
are spread out (few near-ties, so greedy decoding is stable across implementations),
attention is neither uniform nor one-hot, and a few percent of the expert gate/up
pre-activations pass the SwiGLU clamp (so the clamp is exercised).
"""

import json
import math
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from tandem.kernels.mxfp4 import quantize_mxfp4
from tandem.workers.model.config import (
    FULL,
    OPENAI_RMS_NORM_EPS,
    SLIDING,
    GptOssConfig,
    YarnScaling,
)

HF_MODULES_NOT_CONVERTED = (
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
)
"""quantization_config.modules_to_not_convert of the real gpt-oss checkpoints."""


def tiny_config(**overrides: object) -> GptOssConfig:
    """The embedded tiny shape (gpt-oss architecture in miniature); fields can be overridden.

    hidden 64, intermediate 64, 4 layers (sliding, full, sliding, full), 4 q heads over 2 kv
    heads of 16, 6 experts top-2, window 16, gpt-oss YaRN, 4096 positions.
    """
    fields: dict[str, object] = {
        "vocab_size": 1100,
        "hidden_size": 64,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_local_experts": 6,
        "num_experts_per_tok": 2,
        "sliding_window": 16,
        "layer_types": (SLIDING, FULL, SLIDING, FULL),
        "rope_theta": 150000.0,
        "rope_scaling": YarnScaling(
            factor=32.0,
            beta_fast=32.0,
            beta_slow=1.0,
            original_max_position_embeddings=4096,
            truncate=False,
        ),
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "swiglu_limit": 7.0,
        "attention_bias": True,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    unknown = set(overrides) - set(fields)
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}")
    fields.update(overrides)
    return GptOssConfig(**fields)  # type: ignore[arg-type]


def write_random_checkpoint(
    directory: str | Path,
    config: GptOssConfig,
    seed: int,
    *,
    layout: Literal["hf", "original"] = "hf",
    num_shards: int = 1,
    generation_eos_ids: list[int] | None = None,
    boost_ids_from: int | None = None,
    boost: float = 1.0,
) -> Path:
    """Write config.json and safetensors for random weights into `directory`; returns it.

    HF layout also writes generation_config.json (eos ids: generation_eos_ids, else the
    config's eos) and, for num_shards > 1, model.safetensors.index.json. The original
    layout writes OpenAI names and keys; it cannot express every config (layer types must
    alternate starting with sliding, attention must have biases, YaRN must not truncate).

    `boost_ids_from`: unembedding rows from this id on are multiplied by `boost`, so that a
    model whose vocabulary is padded past its tokenizer (as gpt-oss's is) samples those
    ids often; the other tensors are the same as without it.
    """
    if layout not in ("hf", "original"):
        raise ValueError(f"layout must be 'hf' or 'original', got {layout!r}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if boost_ids_from is not None and not 0 <= boost_ids_from < config.vocab_size:
        raise ValueError(
            f"boost_ids_from must lie in [0, vocab_size={config.vocab_size}), got {boost_ids_from}"
        )
    if not (isinstance(boost, (int, float)) and math.isfinite(boost) and boost > 0):
        raise ValueError(f"boost must be a positive finite number, got {boost!r}")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    tensors = random_hf_tensors(config, seed)
    if boost_ids_from is not None:
        lm_head = tensors["lm_head.weight"].clone()
        lm_head[boost_ids_from:] = (lm_head[boost_ids_from:].float() * boost).to(lm_head.dtype)
        tensors["lm_head.weight"] = lm_head
    if layout == "hf":
        _write_json(root / "config.json", hf_config_dict(config))
        _write_json(root / "generation_config.json", _generation_config(config, generation_eos_ids))
    else:
        _write_json(root / "config.json", original_config_dict(config))
        tensors = to_original_names(config, tensors)
    _write_shards(root, tensors, num_shards, with_index=layout == "hf")
    return root


def random_hf_tensors(config: GptOssConfig, seed: int) -> dict[str, torch.Tensor]:
    """All tensors of a random gpt-oss checkpoint under HF names (bf16, experts MXFP4)."""
    c = config
    gen = torch.Generator().manual_seed(seed)
    d, v, e, i = c.hidden_size, c.vocab_size, c.num_local_experts, c.intermediate_size
    q_rows, kv_rows = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim

    def normal(shape: tuple[int, ...], std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std + mean

    def bf16(shape: tuple[int, ...], std: float, mean: float = 0.0) -> torch.Tensor:
        return normal(shape, std, mean).to(torch.bfloat16)

    def norm_weight() -> torch.Tensor:
        return (0.8 + 0.4 * torch.rand((d,), generator=gen)).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": bf16((v, d), 1.0)}
    for n in range(c.num_hidden_layers):
        p = f"model.layers.{n}."
        tensors[p + "input_layernorm.weight"] = norm_weight()
        # q and k components of unit scale: scores of a few units after the YaRN mscale^2.
        tensors[p + "self_attn.q_proj.weight"] = bf16((q_rows, d), 1 / math.sqrt(d))
        tensors[p + "self_attn.k_proj.weight"] = bf16((kv_rows, d), 1 / math.sqrt(d))
        tensors[p + "self_attn.v_proj.weight"] = bf16((kv_rows, d), 1 / math.sqrt(d))
        tensors[p + "self_attn.o_proj.weight"] = bf16((d, q_rows), 1 / math.sqrt(q_rows))
        if c.attention_bias:
            tensors[p + "self_attn.q_proj.bias"] = bf16((q_rows,), 0.1)
            tensors[p + "self_attn.k_proj.bias"] = bf16((kv_rows,), 0.1)
            tensors[p + "self_attn.v_proj.bias"] = bf16((kv_rows,), 0.1)
            tensors[p + "self_attn.o_proj.bias"] = bf16((d,), 0.1)
        # Sinks comparable to the scores, so they take a real share of the softmax.
        tensors[p + "self_attn.sinks"] = bf16((c.num_attention_heads,), 1.0, mean=1.0)
        tensors[p + "post_attention_layernorm.weight"] = norm_weight()
        # Router logits a few units apart: top-k choices are not near-ties.
        tensors[p + "mlp.router.weight"] = bf16((e, d), 2 / math.sqrt(d))
        tensors[p + "mlp.router.bias"] = bf16((e,), 0.5)
        # Gate/up pre-activations with std ~3.5: a few percent exceed the clamp of 7.
        gate_up = normal((e, 2 * i, d), 3.5 / math.sqrt(d))
        blocks, scales = quantize_mxfp4(gate_up)
        tensors[p + "mlp.experts.gate_up_proj_blocks"] = blocks
        tensors[p + "mlp.experts.gate_up_proj_scales"] = scales
        tensors[p + "mlp.experts.gate_up_proj_bias"] = bf16((e, 2 * i), 0.5)
        down = normal((e, d, i), 0.5 / math.sqrt(i))
        blocks, scales = quantize_mxfp4(down)
        tensors[p + "mlp.experts.down_proj_blocks"] = blocks
        tensors[p + "mlp.experts.down_proj_scales"] = scales
        tensors[p + "mlp.experts.down_proj_bias"] = bf16((e, d), 0.1)
    tensors["model.norm.weight"] = norm_weight()
    # Logits with std ~2.5 over the vocabulary: the top two are rarely within 1e-3.
    tensors["lm_head.weight"] = bf16((v, d), 2.5 / math.sqrt(d))
    return tensors


def to_original_names(
    config: GptOssConfig, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename HF tensors to the OpenAI original/ layout (q, k, v fused by rows)."""
    out = {
        "embedding.weight": tensors["model.embed_tokens.weight"],
        "norm.scale": tensors["model.norm.weight"],
        "unembedding.weight": tensors["lm_head.weight"],
    }
    renames = {
        "input_layernorm.weight": "attn.norm.scale",
        "self_attn.sinks": "attn.sinks",
        "self_attn.o_proj.weight": "attn.out.weight",
        "self_attn.o_proj.bias": "attn.out.bias",
        "post_attention_layernorm.weight": "mlp.norm.scale",
        "mlp.router.weight": "mlp.gate.weight",
        "mlp.router.bias": "mlp.gate.bias",
        "mlp.experts.gate_up_proj_blocks": "mlp.mlp1_weight.blocks",
        "mlp.experts.gate_up_proj_scales": "mlp.mlp1_weight.scales",
        "mlp.experts.gate_up_proj_bias": "mlp.mlp1_bias",
        "mlp.experts.down_proj_blocks": "mlp.mlp2_weight.blocks",
        "mlp.experts.down_proj_scales": "mlp.mlp2_weight.scales",
        "mlp.experts.down_proj_bias": "mlp.mlp2_bias",
    }
    for n in range(config.num_hidden_layers):
        p, q = f"model.layers.{n}.", f"block.{n}."
        for hf_name, original_name in renames.items():
            out[q + original_name] = tensors[p + hf_name]
        for kind in ("weight", "bias"):
            parts = [tensors[p + f"self_attn.{proj}_proj.{kind}"] for proj in "qkv"]
            out[q + f"attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    return out


def hf_config_dict(config: GptOssConfig) -> dict:
    """config.json of the HF layout, with the key names of the real checkpoints."""
    c = config
    rope_scaling: dict = {"rope_type": "default"}  # null would read as gpt-oss's YaRN
    initial_context = c.max_position_embeddings
    if c.rope_scaling is not None:
        y = c.rope_scaling
        initial_context = y.original_max_position_embeddings
        rope_scaling = {
            "beta_fast": y.beta_fast,
            "beta_slow": y.beta_slow,
            "factor": y.factor,
            "original_max_position_embeddings": y.original_max_position_embeddings,
            "rope_type": "yarn",
            "truncate": y.truncate,
        }
    d = {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": c.attention_bias,
        "attention_dropout": 0.0,
        "experts_per_token": c.num_experts_per_tok,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "initial_context_length": initial_context,
        "initializer_range": 0.02,
        "intermediate_size": c.intermediate_size,
        "layer_types": list(c.layer_types),
        "max_position_embeddings": c.max_position_embeddings,
        "model_type": "gpt_oss",
        "num_attention_heads": c.num_attention_heads,
        "num_experts_per_tok": c.num_experts_per_tok,
        "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": c.num_key_value_heads,
        "num_local_experts": c.num_local_experts,
        "output_router_logits": False,
        "quantization_config": {
            "modules_to_not_convert": list(HF_MODULES_NOT_CONVERTED),
            "quant_method": "mxfp4",
        },
        "rms_norm_eps": c.rms_norm_eps,
        "rope_scaling": rope_scaling,
        "rope_theta": c.rope_theta,
        "router_aux_loss_coef": 0.9,
        "sliding_window": c.sliding_window,
        "swiglu_limit": c.swiglu_limit,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": c.vocab_size,
    }
    if c.eos_token_id is not None:
        d["eos_token_id"] = c.eos_token_id
    if c.pad_token_id is not None:
        d["pad_token_id"] = c.pad_token_id
    return d


def original_config_dict(config: GptOssConfig) -> dict:
    """config.json of the OpenAI original/ layout; ValueError for what it cannot express.

    Exactly the fields of OpenAI's `ModelConfig` (gpt_oss/torch/model.py), whose loader
    builds `ModelConfig(**config)` and so rejects any other key. The position limit is
    implicit there (initial_context_length * rope_scaling_factor, which is what our loader
    derives); eps is fixed at 1e-5, so another eps cannot be written.
    """
    c = config
    alternating = tuple(SLIDING if n % 2 == 0 else FULL for n in range(c.num_hidden_layers))
    if c.layer_types != alternating:
        raise ValueError("original layout: layer_types must alternate sliding, full, ...")
    if not c.attention_bias:
        raise ValueError("original layout: attention_bias must be True (fused qkv has a bias)")
    if c.rope_scaling is not None and c.rope_scaling.truncate:
        raise ValueError("original layout: YaRN truncate must be False")
    y = c.rope_scaling
    d = {
        "num_hidden_layers": c.num_hidden_layers,
        "num_experts": c.num_local_experts,
        "experts_per_token": c.num_experts_per_tok,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "swiglu_limit": c.swiglu_limit,
        "head_dim": c.head_dim,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "sliding_window": c.sliding_window,
        "initial_context_length": (
            y.original_max_position_embeddings if y else c.max_position_embeddings
        ),
        "rope_theta": c.rope_theta,
        "rope_scaling_factor": y.factor if y else 1.0,
        "rope_ntk_alpha": y.beta_slow if y else 1.0,
        "rope_ntk_beta": y.beta_fast if y else 32.0,
    }
    if c.rms_norm_eps != OPENAI_RMS_NORM_EPS:
        raise ValueError(
            f"original layout: rms_norm_eps must be {OPENAI_RMS_NORM_EPS} (OpenAI's config has "
            f"no such key), got {c.rms_norm_eps}"
        )
    return d


def _generation_config(config: GptOssConfig, eos_ids: list[int] | None) -> dict:
    d: dict = {"do_sample": True}
    if eos_ids is None and config.eos_token_id is not None:
        eos_ids = [config.eos_token_id]
    if eos_ids is not None:
        d["eos_token_id"] = list(eos_ids)
    if config.pad_token_id is not None:
        d["pad_token_id"] = config.pad_token_id
    return d


def _write_shards(
    root: Path, tensors: dict[str, torch.Tensor], num_shards: int, with_index: bool
) -> None:
    names = list(tensors)
    if num_shards > len(names):
        raise ValueError(f"num_shards {num_shards} exceeds the {len(names)} tensors")
    if num_shards == 1:
        save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    total_size = 0
    for s in range(num_shards):
        file_name = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        first, last = s * len(names) // num_shards, (s + 1) * len(names) // num_shards
        shard = {n: tensors[n].contiguous() for n in names[first:last]}
        save_file(shard, str(root / file_name), metadata={"format": "pt"})
        for n, t in shard.items():
            weight_map[n] = file_name
            total_size += t.numel() * t.element_size()
    if with_index:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        _write_json(root / "model.safetensors.index.json", index)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
