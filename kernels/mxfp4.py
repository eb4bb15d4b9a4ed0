"""MXFP4 (OCP microscaling FP4) packing used by gpt-oss expert weights: plain-torch reference.

A row of C values is cut into G = C / 32 blocks along the last (contraction) dimension.
Each block is 16 bytes of E2M1 nibbles plus one E8M0 scale byte:

    blocks [..., G, 16] uint8          scales [..., G] uint8
    byte b of block g:  low nibble  -> element g*32 + 2b
                        high nibble -> element g*32 + 2b + 1
    nibble n (4 bits):  sign = n >> 3, magnitude code = n & 7
                        code -> 0, 0.5, 1, 1.5, 2, 3, 4, 6
    value = E2M1[n] * 2 ** (scale - 127)

Nibble 8 is -0.0. Scale byte 255 (E8M0_NAN) is NaN in E8M0; the quantiser never writes it,
the checkpoint loader rejects it, and the Triton MoE does not decode it as NaN.
"""

import torch

MXFP4_BLOCK_SIZE = 32
"""Values sharing one scale byte."""

MXFP4_BYTES_PER_BLOCK = MXFP4_BLOCK_SIZE // 2
"""Two nibbles per byte."""

MXFP4_SCALE_BIAS = 127
"""E8M0 exponent bias: scale byte 127 means a factor of 1."""

E8M0_NAN = 255
"""The one E8M0 scale byte that is not a power of two."""

E2M1_VALUES: tuple[float, ...] = (
    +0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip
"""FP4 E2M1 value of each nibble 0..15."""

_E2M1_MAX = 6.0
# Midpoints between consecutive magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 (codes 0..7).
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Unpack MXFP4 to float32.

    blocks [..., G, 16] uint8, scales [..., G] uint8 -> [..., G * 32] float32.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != MXFP4_BYTES_PER_BLOCK or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"blocks must be [..., G, {MXFP4_BYTES_PER_BLOCK}] and scales [..., G]; "
            f"got {tuple(blocks.shape)} and {tuple(scales.shape)}"
        )
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    low = lut[(blocks & 0x0F).long()]  # [..., G, 16] elements 0, 2, 4, ...
    high = lut[(blocks >> 4).long()]  # [..., G, 16] elements 1, 3, 5, ...
    values = torch.stack((low, high), dim=-1).flatten(-2)  # [..., G, 32]
    exponent = scales.to(torch.int32) - MXFP4_SCALE_BIAS  # [..., G]
    values = torch.ldexp(values, exponent.unsqueeze(-1).to(torch.float32))
    return values.flatten(-2)  # [..., G * 32]


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round w [..., C] (C a multiple of 32) to MXFP4 -> (blocks [..., G, 16], scales [..., G]).

    Each block of 32 gets the smallest power-of-two scale that fits its largest magnitude
    under 6 (so values already representable come back exactly); each value then rounds to
    the nearest E2M1 magnitude, ties to the even code (as IEEE round-to-nearest-even).
    """
    if w.shape[-1] % MXFP4_BLOCK_SIZE != 0:
        raise ValueError(f"last dimension {w.shape[-1]} is not a multiple of {MXFP4_BLOCK_SIZE}")
    if not torch.isfinite(w).all():
        raise ValueError("quantize_mxfp4 needs finite values")
    groups = w.to(torch.float32).unflatten(-1, (-1, MXFP4_BLOCK_SIZE))  # [..., G, 32]
    amax = groups.abs().amax(dim=-1)  # [..., G]

    # Smallest e with amax <= 6 * 2^e. log2 gives a first guess; the two corrections make it
    # exact when amax / 6 is not an exact power of two in float32.
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    exponent = torch.ceil(torch.log2(safe / _E2M1_MAX))
    exponent = torch.where(safe > _E2M1_MAX * torch.exp2(exponent), exponent + 1, exponent)
    exponent = torch.where(safe <= _E2M1_MAX * torch.exp2(exponent - 1), exponent - 1, exponent)
    exponent = torch.where(amax > 0, exponent, torch.full_like(exponent, -MXFP4_SCALE_BIAS))
    exponent = exponent.clamp(-MXFP4_SCALE_BIAS, MXFP4_SCALE_BIAS)

    scaled = torch.ldexp(groups, -exponent.unsqueeze(-1))  # [..., G, 32], |x| <= 6 unless clamped
    magnitude = scaled.abs()
    midpoints = torch.tensor(_E2M1_MIDPOINTS, dtype=torch.float32, device=w.device)
    # bucketize(right=False) sends a value equal to midpoint i to code i (the lower one);
    # ties whose lower code is odd move up so that ties always land on an even code.
    code = torch.bucketize(magnitude, midpoints)  # [..., G, 32] in 0..7
    at_midpoint = magnitude == midpoints[code.clamp(max=len(_E2M1_MIDPOINTS) - 1)]
    code = code + (at_midpoint & (code % 2 == 1)).long()
    nibble = code | (torch.signbit(scaled).long() << 3)  # [..., G, 32]

    nibble = nibble.unflatten(-1, (MXFP4_BYTES_PER_BLOCK, 2))  # [..., G, 16, 2]
    blocks = (nibble[..., 0] | (nibble[..., 1] << 4)).to(torch.uint8)  # [..., G, 16]
    scales = (exponent + MXFP4_SCALE_BIAS).to(torch.uint8)  # [..., G]
    return blocks, scales
