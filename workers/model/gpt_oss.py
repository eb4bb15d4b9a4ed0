"""The gpt-oss decoder over a paged KV cache.

    x = embed[tokens]                                    # no sqrt(d) scaling
    for each layer: x = x + attn(norm(x)); x = x + moe(norm(x))
                    (each add fused into the norm after it; see DecoderLayer)
    hidden = norm(x)                                     # forward() returns this
    logits = lm_head(hidden)                             # compute_logits(), untied, no bias

Attention and MoE are pluggable backends (torch references by default); the model owns
only parameters and the order of operations.
"""

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from tandem.workers.model.attention import (
    AttentionBackend,
    AttentionMetadata,
    TorchPagedAttention,
    build_attention_metadata,
)
from tandem.workers.model.config import GptOssConfig
from tandem.workers.model.layers import (
    DecoderLayer,
    Linear,
    LinearBackend,
    NormBackend,
    RMSNorm,
    RotaryBackend,
    RotaryEmbedding,
    TorchLinear,
    TorchNorm,
    TorchRotary,
    empty_parameter,
)
from tandem.workers.model.moe import MoEBackend, TorchMoE

KVCache = tuple[torch.Tensor, torch.Tensor]


class GptOssModel(nn.Module):
    """gpt-oss with uninitialised parameters (fill them with tandem.workers.model.weights)."""

    def __init__(
        self,
        config: GptOssConfig,
        dtype: torch.dtype = torch.bfloat16,
        attention: AttentionBackend | None = None,
        moe: MoEBackend | None = None,
        device: torch.device | str = "cpu",
        expert_ids: Sequence[int] | None = None,
    ) -> None:
        """expert_ids: the global ids of the experts this process holds, ascending (expert
        parallelism: tandem.workers.expert_parallel); None: every expert."""
        super().__init__()
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point type, got {dtype}")
        self.config = config
        self.dtype = dtype
        self.attention = attention if attention is not None else TorchPagedAttention()
        self.moe = moe if moe is not None else TorchMoE()
        all_experts = tuple(range(config.num_local_experts))
        self.expert_ids = all_experts if expert_ids is None else tuple(expert_ids)
        if any(e not in all_experts for e in self.expert_ids) or list(self.expert_ids) != sorted(
            set(self.expert_ids)
        ):
            raise ValueError(
                f"expert_ids must be distinct ascending ids in [0, {config.num_local_experts}), "
                f"got {list(self.expert_ids)}"
            )
        d = config.hidden_size
        self.embed_tokens = empty_parameter((config.vocab_size, d), dtype, device)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, self.attention, self.moe, dtype, device, len(self.expert_ids))
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(d, config.rms_norm_eps, dtype, device)
        self.lm_head = Linear(d, config.vocab_size, False, dtype, device)
        self.rotary = RotaryEmbedding(config, device)
        self.set_backends(self.attention, self.moe)

    def set_backends(self, attention: AttentionBackend, moe: MoEBackend) -> None:
        """Swap the kernels of every layer: attention, and the rotary, norms and dense
        projections when the attention backend also provides them (the torch references
        otherwise), and MoE.
        The benchmarks check one model both ways with it."""
        self.attention, self.moe = attention, moe
        norm = attention if isinstance(attention, NormBackend) else TorchNorm()
        rotary = attention if isinstance(attention, RotaryBackend) else TorchRotary()
        linear = attention if isinstance(attention, LinearBackend) else TorchLinear()
        self.norm.backend = norm
        self.lm_head.backend = linear
        for layer in self.layers:
            layer.input_layernorm.backend = layer.post_attention_layernorm.backend = norm
            layer.self_attn.backend, layer.self_attn.rotary = attention, rotary
            layer.self_attn.qkv_proj.backend = layer.self_attn.o_proj.backend = linear
            layer.mlp.backend = moe

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        metadata: AttentionMetadata,
        kv_caches: Sequence[KVCache],
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """input_ids, positions [T] (flattened over sequences) -> final-normed hidden [T, d].

        Writes the new tokens' k/v into kv_caches (one (key, value) pair per layer), and
        calls after_layer(i) once layer i's k/v are in the cache (KV transfer sends each
        layer while the next one computes).
        """
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"need {len(self.layers)} kv caches, got {len(kv_caches)}")
        x = nn.functional.embedding(input_ids, self.embed_tokens)  # [T, d]
        cos, sin = self.rotary(positions)  # [T, D/2] each
        residual = None
        for index, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            x, residual = layer(x, residual, cos, sin, metadata, kv_cache)
            if after_layer is not None:
                after_layer(index)
        return self.norm(x, residual)[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, d] -> logits [N, vocab] float32."""
        return self.lm_head(hidden).float()

    @torch.inference_mode()
    def forward_full(self, input_ids: list[int], block_size: int = 16) -> torch.Tensor:
        """Logits [L, vocab] of one whole prompt through the paged path with a fresh cache."""
        if not input_ids:
            raise ValueError("input_ids is empty")
        length = len(input_ids)
        num_blocks = math.ceil(length / block_size)
        groups = self.config.kv_groups
        kv_caches = allocate_kv_caches(
            self.config, [num_blocks] * len(groups), block_size, self.dtype, self.device
        )
        table = list(range(num_blocks))
        metadata = build_attention_metadata(
            [length], [length], [[table] for _ in groups], block_size, self.device
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        positions = torch.arange(length, device=self.device)
        return self.compute_logits(self.forward(ids, positions, metadata, kv_caches))


def allocate_kv_caches(
    config: GptOssConfig,
    blocks_per_group: Sequence[int],
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[KVCache]:
    """Zeroed (key, value) caches per layer, each [blocks of its group, block_size, K, D]."""
    if len(blocks_per_group) != len(config.kv_groups):
        raise ValueError(
            f"blocks_per_group has {len(blocks_per_group)} entries for "
            f"{len(config.kv_groups)} kv groups"
        )
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    caches = []
    for layer in range(config.num_hidden_layers):
        num_blocks = blocks_per_group[config.kv_group_of_layer(layer)]
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        caches.append(
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
        )
    return caches
