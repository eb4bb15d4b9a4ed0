"""gpt-oss configuration, from a Hugging Face `config.json` or an OpenAI `original/config.json`.

The two files describe the same model with different keys:

    Hugging Face (config.json)            OpenAI (original/config.json)
    num_local_experts                     num_experts
    num_experts_per_tok                   experts_per_token
    rope_scaling.factor                   rope_scaling_factor
    rope_scaling.beta_fast                rope_ntk_beta
    rope_scaling.beta_slow                rope_ntk_alpha
    rope_scaling.original_max_pos...      initial_context_length
    layer_types                           (implicit: layer i slides when i is even)
    max_position_embeddings               (implicit: initial_context_length * factor)
    rms_norm_eps                          (implicit: 1e-5)

Only MXFP4 checkpoints are accepted: the MoE weights of the model stay packed exactly as the
checkpoint stores them, so a bf16-expert checkpoint has nowhere to go.
"""

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

SLIDING = "sliding_attention"
FULL = "full_attention"
_LAYER_TYPES = (SLIDING, FULL)

MXFP4_BLOCK = 32
"""Sizes that are a contraction dimension of an MXFP4 matrix must be multiples of this."""

OPENAI_RMS_NORM_EPS = 1e-5
"""The OpenAI reference hard-codes this; its config has no key for it."""

SUPPORTED_QUANT_METHOD = "mxfp4"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file (and tensor)."""


GPT_OSS_DEFAULT_YARN = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "original_max_position_embeddings": 4096,
    "truncate": False,
}
"""An HF config's rope_scaling when it has none (transformers' GptOssConfig default)."""


@dataclass(frozen=True)
class YarnScaling:
    """YaRN rotary scaling (gpt-oss: factor 32, beta_fast 32, beta_slow 1, 4096, truncate False)."""

    factor: float
    # Context extension factor s; inverse frequencies of slow dimensions are divided by it.
    beta_fast: float
    # Rotations over the original context above which a dimension is left unscaled.
    beta_slow: float
    # Rotations below which a dimension is fully interpolated (beta_slow < beta_fast).
    original_max_position_embeddings: int
    # The pretraining context L0 the betas refer to.
    truncate: bool
    # True floors/ceils the correction range; gpt-oss sets False and must not be rounded.

    def __post_init__(self) -> None:
        if not self.factor >= 1.0:
            raise ValueError(f"rope_scaling.factor must be >= 1, got {self.factor}")
        if not self.beta_fast > 0 or not self.beta_slow > 0:
            raise ValueError(
                f"rope_scaling.beta_fast and beta_slow must be > 0, got {self.beta_fast}, "
                f"{self.beta_slow}"
            )
        if not self.beta_slow < self.beta_fast:
            raise ValueError(
                f"rope_scaling.beta_slow ({self.beta_slow}) must be < beta_fast ({self.beta_fast})"
            )
        if self.original_max_position_embeddings <= 0:
            raise ValueError(
                "rope_scaling.original_max_position_embeddings must be > 0, got "
                f"{self.original_max_position_embeddings}"
            )

    @property
    def mscale(self) -> float:
        """YaRN attention factor, folded into cos/sin (so scores grow by mscale^2)."""
        return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1.0 else 1.0


@dataclass(frozen=True)
class KVGroupSpec:
    """Layers that share one paged block space (same block ids, same window)."""

    name: Literal["full", "sliding"]
    layers: tuple[int, ...]
    # Layer indices in this group, ascending.
    sliding_window: int | None
    # Window of every layer in the group; None for full attention.


@dataclass(frozen=True)
class GptOssConfig:
    """Architecture of a gpt-oss checkpoint; nothing about 20b or 120b is assumed."""

    vocab_size: int
    hidden_size: int
    # Residual width d.
    intermediate_size: int
    # Per-expert SwiGLU width I (gate and up each have I rows).
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    # GQA: query head h reads kv head h // (num_attention_heads // num_key_value_heads).
    head_dim: int
    # Not hidden_size / heads: gpt-oss has q width 4096 over d = 2880.
    num_local_experts: int
    num_experts_per_tok: int
    sliding_window: int
    # Window W of sliding layers: query i sees keys j with i - W < j <= i.
    layer_types: tuple[str, ...]
    # "sliding_attention" or "full_attention" per layer.
    rope_theta: float
    rope_scaling: YarnScaling | None
    # None means plain RoPE.
    max_position_embeddings: int
    rms_norm_eps: float
    swiglu_limit: float
    # Clamp of the expert SwiGLU: gate <= limit, -limit <= up <= limit.
    attention_bias: bool
    # q, k, v and o projections carry biases.
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    # Always False for gpt-oss; kept so a checkpoint that says otherwise is rejected by name.

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "num_local_experts",
            "num_experts_per_tok",
            "sliding_window",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % MXFP4_BLOCK != 0:
                raise ValueError(
                    f"{name} must be a multiple of {MXFP4_BLOCK} (MXFP4 block), "
                    f"got {getattr(self, name)}"
                )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even (half-split rotary), got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= "
                f"num_local_experts ({self.num_local_experts})"
            )
        if not isinstance(self.layer_types, tuple):
            raise ValueError(f"layer_types must be a tuple, got {type(self.layer_types).__name__}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries, "
                f"num_hidden_layers is {self.num_hidden_layers}"
            )
        for i, kind in enumerate(self.layer_types):
            if kind not in _LAYER_TYPES:
                raise ValueError(f"layer_types[{i}] must be one of {_LAYER_TYPES}, got {kind!r}")
        if not self.rope_theta > 1.0:
            raise ValueError(f"rope_theta must be > 1, got {self.rope_theta}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, YarnScaling):
            raise ValueError(f"rope_scaling must be YarnScaling or None, got {self.rope_scaling!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.swiglu_limit > 0:
            raise ValueError(f"swiglu_limit must be > 0, got {self.swiglu_limit}")
        if not isinstance(self.attention_bias, bool):
            raise ValueError(f"attention_bias must be a bool, got {self.attention_bias!r}")
        for name in ("eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or not 0 <= value
            ):
                raise ValueError(f"{name} must be a non-negative integer or None, got {value!r}")
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings must be False: gpt-oss has its own lm_head")

    @cached_property
    def kv_groups(self) -> tuple[KVGroupSpec, ...]:
        """Paged-cache block spaces: full first, then sliding; empty groups omitted."""
        full = tuple(i for i, t in enumerate(self.layer_types) if t == FULL)
        sliding = tuple(i for i, t in enumerate(self.layer_types) if t == SLIDING)
        groups = []
        if full:
            groups.append(KVGroupSpec("full", full, None))
        if sliding:
            groups.append(KVGroupSpec("sliding", sliding, self.sliding_window))
        return tuple(groups)

    def kv_group_of_layer(self, layer: int) -> int:
        """Index into kv_groups of the group holding this layer."""
        for index, group in enumerate(self.kv_groups):
            if layer in group.layers:
                return index
        raise ValueError(f"layer {layer} out of range 0..{self.num_hidden_layers - 1}")

    def layer_window(self, layer: int) -> int | None:
        """Sliding window of a layer, None for full attention."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "GptOssConfig":
        """Read a Hugging Face gpt-oss config dict; errors name the field and `source`."""
        try:
            return cls._from_hf_dict(d)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{source}: {_describe(e)}") from e

    @classmethod
    def _from_hf_dict(cls, d: dict[str, Any]) -> "GptOssConfig":
        model_type = d.get("model_type")
        if model_type != "gpt_oss":
            raise ValueError(f"model_type must be 'gpt_oss', got {model_type!r}")
        _check_quantization(d.get("quantization_config"))
        if "swiglu_alpha" in d and float(d["swiglu_alpha"]) != 1.702:
            raise ValueError(
                f"swiglu_alpha must be 1.702 (fixed by gpt-oss), got {d['swiglu_alpha']}"
            )
        rope_params = d.get("rope_scaling") or d.get("rope_parameters")
        if rope_params is None:
            # transformers' GptOssConfig reads an absent or null rope_scaling as gpt-oss's
            # YaRN, not as plain RoPE; plain RoPE is written {"rope_type": "default"}.
            rope_params = dict(GPT_OSS_DEFAULT_YARN)
        rope_theta = d.get("rope_theta")
        if rope_theta is None and isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta")
        num_layers = _int(d, "num_hidden_layers")
        layer_types = d.get("layer_types")
        if layer_types is None:
            # transformers' default for gpt-oss: even layers slide.
            layer_types = [SLIDING if i % 2 == 0 else FULL for i in range(num_layers)]
        if not isinstance(layer_types, list):
            raise ValueError(f"layer_types must be a list, got {layer_types!r}")
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            raise ValueError(
                "eos_token_id must be a single id (stop-token lists belong in "
                f"generation_config.json), got {eos!r}"
            )
        return cls(
            vocab_size=_int(d, "vocab_size"),
            hidden_size=_int(d, "hidden_size"),
            intermediate_size=_int(d, "intermediate_size"),
            num_hidden_layers=num_layers,
            num_attention_heads=_int(d, "num_attention_heads"),
            num_key_value_heads=_int(d, "num_key_value_heads"),
            head_dim=_int(d, "head_dim"),
            num_local_experts=_int(d, "num_local_experts"),
            num_experts_per_tok=_int(d, "num_experts_per_tok"),
            sliding_window=_int(d, "sliding_window"),
            layer_types=tuple(layer_types),
            rope_theta=_float_value("rope_theta", rope_theta),
            rope_scaling=_yarn_from_hf(rope_params),
            max_position_embeddings=_int(d, "max_position_embeddings"),
            rms_norm_eps=_float(d, "rms_norm_eps"),
            swiglu_limit=_float(d, "swiglu_limit"),
            attention_bias=_bool(d, "attention_bias", default=True),
            eos_token_id=eos,
            pad_token_id=d.get("pad_token_id"),
            tie_word_embeddings=_bool(d, "tie_word_embeddings", default=False),
        )

    @classmethod
    def from_original_dict(
        cls, d: dict[str, Any], source: str = "original/config.json"
    ) -> "GptOssConfig":
        """Read an OpenAI reference config dict; errors name the field and `source`.

        That file has no layer types, eps, position limit or special ids: the reference
        hard-codes alternating windows (even layers slide), eps 1e-5, never truncates the
        YaRN range, and leaves stop tokens to the tokenizer. `max_position_embeddings` and
        `rms_norm_eps` are still read when a file has them, though OpenAI's loader rejects
        both keys and our writer never writes them.
        """
        try:
            return cls._from_original_dict(d)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{source}: {_describe(e)}") from e

    @classmethod
    def _from_original_dict(cls, d: dict[str, Any]) -> "GptOssConfig":
        num_layers = _int(d, "num_hidden_layers")
        factor = _float(d, "rope_scaling_factor")
        initial_context = _int(d, "initial_context_length")
        rope_scaling = None
        if factor > 1.0:
            rope_scaling = YarnScaling(
                factor=factor,
                beta_fast=_float(d, "rope_ntk_beta"),
                beta_slow=_float(d, "rope_ntk_alpha"),
                original_max_position_embeddings=initial_context,
                truncate=False,
            )
        max_positions = d.get("max_position_embeddings", int(initial_context * factor))
        return cls(
            vocab_size=_int(d, "vocab_size"),
            hidden_size=_int(d, "hidden_size"),
            intermediate_size=_int(d, "intermediate_size"),
            num_hidden_layers=num_layers,
            num_attention_heads=_int(d, "num_attention_heads"),
            num_key_value_heads=_int(d, "num_key_value_heads"),
            head_dim=_int(d, "head_dim"),
            num_local_experts=_int(d, "num_experts"),
            num_experts_per_tok=_int(d, "experts_per_token"),
            sliding_window=_int(d, "sliding_window"),
            layer_types=tuple(SLIDING if i % 2 == 0 else FULL for i in range(num_layers)),
            rope_theta=_float(d, "rope_theta"),
            rope_scaling=rope_scaling,
            max_position_embeddings=max_positions,
            rms_norm_eps=float(d.get("rms_norm_eps", OPENAI_RMS_NORM_EPS)),
            swiglu_limit=_float(d, "swiglu_limit"),
            attention_bias=True,
        )


def is_original_config(d: dict[str, Any]) -> bool:
    """True for an OpenAI reference config (no model_type, `num_experts` instead of local)."""
    return "model_type" not in d and "num_experts" in d and "experts_per_token" in d


def load_config(checkpoint_dir: str | Path) -> GptOssConfig:
    """Config of a checkpoint directory: HF config.json, or an OpenAI one (here or in original/)."""
    root = Path(checkpoint_dir)
    path = root / "config.json"
    if not path.is_file() and (root / "original" / "config.json").is_file():
        path = root / "original" / "config.json"
    d = read_config_json(path)
    try:
        if is_original_config(d):
            return GptOssConfig.from_original_dict(d, source=str(path))
        return GptOssConfig.from_hf_dict(d, source=str(path))
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def read_config_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: config file not found")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _check_quantization(q: Any) -> None:
    if q is None:
        raise ValueError(
            "quantization_config is missing: only MXFP4 checkpoints are supported "
            "(experts stay packed as the checkpoint stores them)"
        )
    if not isinstance(q, dict):
        raise ValueError(f"quantization_config must be an object, got {q!r}")
    method = q.get("quant_method")
    if method != SUPPORTED_QUANT_METHOD:
        raise ValueError(
            f"quantization_config.quant_method {method!r} is not supported "
            f"(only {SUPPORTED_QUANT_METHOD!r})"
        )


def _yarn_from_hf(params: Any) -> YarnScaling | None:
    if params is None:
        return None
    if not isinstance(params, dict):
        raise ValueError(f"rope_scaling must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "yarn":
        raise ValueError(f"rope_scaling.rope_type {rope_type!r} is not supported (only 'yarn')")
    truncate = params.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ValueError(f"rope_scaling.truncate must be a bool, got {truncate!r}")
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
        if params.get(key) is not None:
            raise ValueError(f"rope_scaling.{key} is not supported by gpt-oss YaRN")
    return YarnScaling(
        factor=_float(params, "factor", prefix="rope_scaling."),
        # transformers' defaults when the keys are absent.
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        original_max_position_embeddings=_int(
            params, "original_max_position_embeddings", prefix="rope_scaling."
        ),
        truncate=truncate,
    )


def _int(d: dict[str, Any], key: str, prefix: str = "") -> int:
    if key not in d:
        raise ValueError(f"{prefix}{key} is missing")
    value = d[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{prefix}{key} must be an integer, got {value!r}")
    return value


def _float(d: dict[str, Any], key: str, prefix: str = "") -> float:
    if key not in d:
        raise ValueError(f"{prefix}{key} is missing")
    return _float_value(prefix + key, d[key])


def _float_value(name: str, value: Any) -> float:
    if value is None:
        raise ValueError(f"{name} is missing")
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _bool(d: dict[str, Any], key: str, default: bool) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def _describe(e: Exception) -> str:
    return e.args[0] if isinstance(e, KeyError) and e.args else str(e)
