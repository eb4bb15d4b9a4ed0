"""Building blocks of a gpt-oss decoder layer: RMSNorm, YaRN rotary, attention and MoE blocks.

Parameters are allocated empty (never initialised): the weight loader fills them in place,
tensor by tensor, so a model never exists twice in memory. Module and parameter names
follow the Hugging Face checkpoint (without its `model.` prefix).
"""

import math
from abc import ABC, abstractmethod

import torch
from torch import nn

from tandem.workers.model.attention import AttentionBackend, AttentionMetadata
from tandem.workers.model.config import GptOssConfig, YarnScaling
from tandem.workers.model.moe import MoEBackend, MoEWeights


def empty_parameter(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> nn.Parameter:
    """An uninitialised, frozen parameter (inference only; uint8 cannot require grad anyway)."""
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class LinearBackend(ABC):
    """How a dense projection runs: y = x W^T (+ b), x [T, in], W [out, in] -> [T, out]
    in x's dtype. An attention backend may also be one (TritonPagedAttention is: a one-token
    GEMV kernel for decode); GptOssModel.set_backends uses `TorchLinear` otherwise."""

    @abstractmethod
    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor: ...


class TorchLinear(LinearBackend):
    """The reference and CPU path (cuBLAS on CUDA)."""

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return nn.functional.linear(x, weight, bias)


class Linear(nn.Module):
    """y = x W^T + b with W [out, in]; no initialisation."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.weight = empty_parameter((out_features, in_features), dtype, device)
        self.bias = empty_parameter((out_features,), dtype, device) if bias else None
        self.backend: LinearBackend = TorchLinear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.linear(x, self.weight, self.bias)


class Rows:
    """Output rows [start, stop) of a Linear, as views into its weight and bias: what the
    weight loader fills when one fused projection holds several checkpoint tensors."""

    def __init__(self, linear: Linear, start: int, stop: int) -> None:
        self.weight = linear.weight[start:stop]
        self.bias = None if linear.bias is None else linear.bias[start:stop]


class NormBackend(ABC):
    """How RMSNorm runs, with the residual add before it fused in.

    Contract of `rms_norm`: x [T, d], weight [d], residual [T, d] or None ->
    (y, h) with h = x + residual rounded to x's dtype (h = x without a residual) and
    y = weight * h / sqrt(mean(h^2) + eps) computed in float32 and rounded to x's dtype.
    h is the residual stream the next block adds to.

    An attention backend may also be a NormBackend (TritonPagedAttention is), so the norms
    follow the kernel choice of make_backends; GptOssModel.set_backends uses `TorchNorm`
    otherwise.
    """

    @abstractmethod
    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class TorchNorm(NormBackend):
    """The reference and CPU path."""

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = x if residual is None else x + residual
        h32 = h.float()
        normed = h32 * torch.rsqrt(h32.pow(2).mean(dim=-1, keepdim=True) + eps)
        return (weight.float() * normed).to(x.dtype), h


class RMSNorm(nn.Module):
    """y = w * h / sqrt(mean(h^2) + eps), h = x (+ residual), in float32, cast back; w is
    not offset by 1. Returns (y, h): see NormBackend."""

    def __init__(
        self,
        size: int,
        eps: float,
        dtype: torch.dtype,
        device: torch.device | str,
        backend: NormBackend | None = None,
    ):
        super().__init__()
        self.weight = empty_parameter((size,), dtype, device)
        self.eps = eps
        self.backend = backend if backend is not None else TorchNorm()

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backend.rms_norm(x, self.weight, self.eps, residual)


def rotary_inv_freq(
    head_dim: int, theta: float, scaling: YarnScaling | None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim / 2] (float32) and the cos/sin multiplier (YaRN mscale).

    YaRN blends, per dimension i, the original frequency 1/f_i with the interpolated
    1/(s f_i) along a ramp between the dimensions that turn beta_fast and beta_slow times
    over the original context. With truncate False the ramp ends stay fractional
    (gpt-oss: 8.09 and 17.40); rounding them to 8 and 18 measurably changes logprobs.
    """
    half = head_dim // 2
    exponent = torch.arange(half, dtype=torch.float64) * 2 / head_dim
    base_freq = theta**exponent  # f_i, [half]
    if scaling is None:
        return (1.0 / base_freq).float(), 1.0

    def correction_dim(rotations: float) -> float:
        context = scaling.original_max_position_embeddings
        return half * math.log(context / (rotations * 2 * math.pi)) / math.log(theta)

    low = correction_dim(scaling.beta_fast)
    high = correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    # Keep the ramp inside the dimensions that exist (as transformers does); gpt-oss' range
    # is well inside, so this only matters for unusual configs.
    low, high = max(low, 0.0), min(high, head_dim - 1.0)
    ramp = ((torch.arange(half, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = (1 - ramp) / base_freq + ramp / (scaling.factor * base_freq)
    return inv_freq.float(), scaling.mscale


class RotaryEmbedding(nn.Module):
    """cos/sin tables for arbitrary positions, already multiplied by the YaRN mscale."""

    def __init__(self, config: GptOssConfig, device: torch.device | str) -> None:
        super().__init__()
        inv_freq, mscale = rotary_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.mscale = mscale

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, head_dim / 2] float32."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        return angles.cos() * self.mscale, angles.sin() * self.mscale


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split (NeoX) rotation of x [T, heads, D] with cos/sin [T, D/2]; float32 math."""
    x1, x2 = x.float().chunk(2, dim=-1)  # [T, heads, D/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype)


class RotaryBackend(ABC):
    """How a layer rotates its q and k (the torch path below, or a kernel).

    Contract of `rotate`: q [T, H, D], k [T, K, D], cos / sin [T, D/2] float32 (YaRN mscale
    included) -> (q', k') in q's and k's dtypes, each the half-split rotation of
    `apply_rotary` (computed in float32, rounded once). An implementation may rotate the
    inputs in place and return them, so callers use only the returned tensors.

    An attention backend may also be a RotaryBackend (TritonPagedAttention is): the rotary
    then follows the kernel choice of make_backends, and a kernel that fuses the rotation
    into the KV write belongs to the attention backend anyway. SelfAttention uses
    `TorchRotary` when its attention backend is not one.
    """

    @abstractmethod
    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class TorchRotary(RotaryBackend):
    """`apply_rotary` on q and k: the reference and CPU path; returns new tensors."""

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


class SelfAttention(nn.Module):
    """Projections, rotary and sinks of one layer; the paged attention itself is the backend's
    (and the rotary too when the backend is also a RotaryBackend)."""

    def __init__(
        self,
        config: GptOssConfig,
        layer: int,
        backend: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        d, heads, kv_heads, head_dim = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        bias = config.attention_bias
        self.q_size, self.kv_size = heads * head_dim, kv_heads * head_dim
        # q, k and v as one projection: one GEMM launch instead of three. The checkpoint's
        # q_proj / k_proj / v_proj are row ranges of it (properties below).
        self.qkv_proj = Linear(d, self.q_size + 2 * self.kv_size, bias, dtype, device)
        self.o_proj = Linear(heads * head_dim, d, bias, dtype, device)
        self.sinks = empty_parameter((heads,), dtype, device)
        self.backend = backend
        self.rotary = backend if isinstance(backend, RotaryBackend) else TorchRotary()
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.group_index = config.kv_group_of_layer(layer)
        self.sliding_window = config.layer_window(layer)
        self.scale = 1.0 / math.sqrt(head_dim)

    @property
    def q_proj(self) -> Rows:
        return Rows(self.qkv_proj, 0, self.q_size)

    @property
    def k_proj(self) -> Rows:
        return Rows(self.qkv_proj, self.q_size, self.q_size + self.kv_size)

    @property
    def v_proj(self) -> Rows:
        return Rows(self.qkv_proj, self.q_size + self.kv_size, self.q_size + 2 * self.kv_size)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        metadata: AttentionMetadata,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """x [T, d] (normalised) -> [T, d]."""
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, q + 2 kv]; q, k, v below are strided views of it
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, K, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, K, D]
        q, k = self.rotary.rotate(q, k, cos, sin)
        key_cache, value_cache = kv_cache
        attended = self.backend.forward(
            q,
            k,
            v,
            key_cache,
            value_cache,
            metadata,
            self.group_index,
            self.sinks,
            self.sliding_window,
            self.scale,
        )  # [T, H, D]
        return self.o_proj(attended.reshape(num_tokens, self.num_heads * self.head_dim))


class Experts(nn.Module):
    """Packed MXFP4 expert matrices and their biases (names as in the HF checkpoint)."""

    def __init__(
        self,
        config: GptOssConfig,
        dtype: torch.dtype,
        device: torch.device | str,
        num_experts: int | None = None,
    ):
        """num_experts: how many of the layer's experts this process holds (expert
        parallelism); None: all config.num_local_experts."""
        super().__init__()
        e = config.num_local_experts if num_experts is None else num_experts
        d, i = config.hidden_size, config.intermediate_size
        u8 = torch.uint8
        self.gate_up_proj_blocks = empty_parameter((e, 2 * i, d // 32, 16), u8, device)
        self.gate_up_proj_scales = empty_parameter((e, 2 * i, d // 32), u8, device)
        self.gate_up_proj_bias = empty_parameter((e, 2 * i), dtype, device)
        self.down_proj_blocks = empty_parameter((e, d, i // 32, 16), u8, device)
        self.down_proj_scales = empty_parameter((e, d, i // 32), u8, device)
        self.down_proj_bias = empty_parameter((e, d), dtype, device)


class MoEBlock(nn.Module):
    """Router plus experts of one layer; the computation is the MoE backend's."""

    def __init__(
        self,
        config: GptOssConfig,
        backend: MoEBackend,
        dtype: torch.dtype,
        device: torch.device | str,
        num_experts: int | None = None,
    ) -> None:
        super().__init__()
        # The router always scores every expert; the experts may be a subset (see Experts).
        self.router = Linear(config.hidden_size, config.num_local_experts, True, dtype, device)
        self.experts = Experts(config, dtype, device, num_experts)
        self.backend = backend
        self.top_k = config.num_experts_per_tok
        self.swiglu_limit = config.swiglu_limit

    def weights(self) -> MoEWeights:
        assert self.router.bias is not None
        return MoEWeights(
            router_weight=self.router.weight,
            router_bias=self.router.bias,
            gate_up_blocks=self.experts.gate_up_proj_blocks,
            gate_up_scales=self.experts.gate_up_proj_scales,
            gate_up_bias=self.experts.gate_up_proj_bias,
            down_blocks=self.experts.down_proj_blocks,
            down_scales=self.experts.down_proj_scales,
            down_bias=self.experts.down_proj_bias,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] (normalised) -> [T, d]."""
        return self.backend.forward(x, self.weights(), self.top_k, self.swiglu_limit)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: h = x + attn(norm(x)); out = h + moe(norm(h))."""

    def __init__(
        self,
        config: GptOssConfig,
        layer: int,
        attention: AttentionBackend,
        moe: MoEBackend,
        dtype: torch.dtype,
        device: torch.device | str,
        num_experts: int | None = None,
    ) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        # The norms' backend is the model's choice (GptOssModel.set_backends).
        self.input_layernorm = RMSNorm(d, eps, dtype, device)
        self.self_attn = SelfAttention(config, layer, attention, dtype, device)
        self.post_attention_layernorm = RMSNorm(d, eps, dtype, device)
        self.mlp = MoEBlock(config, moe, dtype, device, num_experts)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        metadata: AttentionMetadata,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) [T, d] -> (moe output, residual stream before it).

        The residual stream is carried unsummed between layers so that each add fuses into
        the norm after it: the layer's input is x + residual (x alone for the first layer),
        its output the pair whose sum is the next layer's input.
        """
        normed, residual = self.input_layernorm(x, residual)
        attended = self.self_attn(normed, cos, sin, metadata, kv_cache)
        normed, residual = self.post_attention_layernorm(attended, residual)
        return self.mlp(normed), residual
