"""MXFP4 reference: byte layout pinned against hand-built blocks, and the quantiser.

Expected values are written out by hand from the format (GPT_OSS.md 3.2), not computed by
the code under test.
"""

import math

import pytest
import torch

from tandem.kernels.mxfp4 import dequantize_mxfp4, quantize_mxfp4


def _one_block(first_bytes: list[int], scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A single MXFP4 block [1, 16] whose leading bytes are given (rest zero) and its scale [1]."""
    data = first_bytes + [0] * (16 - len(first_bytes))
    return torch.tensor([data], dtype=torch.uint8), torch.tensor([scale], dtype=torch.uint8)


def test_nibble_order_and_sign() -> None:
    # byte 0x21: low nibble 1 -> element 0 = +0.5; high nibble 2 -> element 1 = +1.0
    # byte 0x98: low 8 -> element 2 = -0.0;      high 9 -> element 3 = -0.5
    # byte 0xF7: low 7 -> element 4 = +6.0;      high F -> element 5 = -6.0
    # byte 0x3C: low C -> element 6 = -2.0;      high 3 -> element 7 = +1.5
    # byte 0xA5: low 5 -> element 8 = +3.0;      high A -> element 9 = -1.0
    # byte 0xDE: low E -> element 10 = -4.0;     high D -> element 11 = -3.0
    # byte 0xB6: low 6 -> element 12 = +4.0;     high B -> element 13 = -1.5
    # byte 0x04: low 4 -> element 14 = +2.0;     high 0 -> element 15 = +0.0
    blocks, scales = _one_block([0x21, 0x98, 0xF7, 0x3C, 0xA5, 0xDE, 0xB6, 0x04], scale=127)
    out = dequantize_mxfp4(blocks, scales)
    assert out.dtype == torch.float32 and out.shape == (32,)
    expected = [0.5, 1.0, -0.0, -0.5, 6.0, -6.0, -2.0, 1.5]
    expected += [3.0, -1.0, -4.0, -3.0, 4.0, -1.5, 2.0, 0.0]
    expected += [0.0] * 16
    assert out.tolist() == expected
    # Nibble 8 is negative zero, nibble 0 positive zero.
    assert math.copysign(1.0, out[2].item()) == -1.0
    assert math.copysign(1.0, out[15].item()) == 1.0


@pytest.mark.parametrize(
    ("scale", "factor"),
    [
        (127, 1.0),
        (128, 2.0),
        (126, 0.5),
        (130, 8.0),
        (120, 1 / 128),
        (0, 2.0**-127),
        (200, 2.0**73),
    ],
)
def test_scale_bias(scale: int, factor: float) -> None:
    # element 0 = nibble 2 (+1.0), element 1 = nibble 0xF (-6.0), element 2 = nibble 3 (+1.5)
    blocks, scales = _one_block([0xF2, 0x03], scale=scale)
    out = dequantize_mxfp4(blocks, scales)
    assert out[:3].tolist() == [1.0 * factor, -6.0 * factor, 1.5 * factor]


def test_matches_elementwise_formula_on_batched_shapes() -> None:
    # W[e, n, c] = LUT[nibble(blocks[e, n, c // 32, (c % 32) // 2], c % 2)] * 2^(scale - 127),
    # evaluated one element at a time in plain Python.
    lut = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (2, 3, 2, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(117, 137, (2, 3, 2), generator=gen, dtype=torch.uint8)
    out = dequantize_mxfp4(blocks, scales)
    assert out.shape == (2, 3, 64)
    for e in range(2):
        for n in range(3):
            for c in range(64):
                byte = int(blocks[e, n, c // 32, (c % 32) // 2])
                nibble = byte & 0x0F if c % 2 == 0 else byte >> 4
                value = lut[nibble] * 2.0 ** (int(scales[e, n, c // 32]) - 127)
                assert out[e, n, c].item() == value


def test_round_trip_exact_on_representable_values() -> None:
    gen = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (4, 5, 3, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(100, 150, (4, 5, 3), generator=gen, dtype=torch.uint8)
    values = dequantize_mxfp4(blocks, scales)
    again = dequantize_mxfp4(*quantize_mxfp4(values))
    assert torch.equal(again, values)


def test_quantize_rounds_to_nearest_with_ties_to_even_code() -> None:
    # Element 0 is 6.0 so the block scale is 2^0 (byte 127); the other elements probe rounding.
    inputs = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.3, 5.1, -0.74, -2.9, 0.0, -0.1]
    expected = [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 6.0, -0.5, -3.0, 0.0, -0.0]
    w = torch.tensor(inputs + [0.0] * (32 - len(inputs)))
    blocks, scales = quantize_mxfp4(w)
    assert scales.tolist() == [127]
    out = dequantize_mxfp4(blocks, scales)
    assert out[: len(expected)].tolist() == expected
    # Bytes of the first pair: element 0 = 6.0 (nibble 7), element 1 = 0.25 -> +0 (nibble 0).
    assert blocks[0, 0].item() == 0x07


@pytest.mark.parametrize(
    ("amax", "scale_byte"),
    [(6.0, 127), (12.0, 128), (3.0, 126), (6.5, 128), (5.9, 127), (0.75, 124), (0.0, 0)],
)
def test_quantize_scale_is_smallest_power_fitting_the_block(amax: float, scale_byte: int) -> None:
    w = torch.zeros(2, 32)
    w[0, 7] = amax
    w[1, 3] = -amax
    _, scales = quantize_mxfp4(w)
    assert scales.tolist() == [[scale_byte], [scale_byte]]


def test_quantize_keeps_sign_and_block_structure() -> None:
    w = torch.zeros(64)
    w[33] = -3.0  # block 1, byte 0, high nibble
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (2, 16) and scales.shape == (2,)
    # Block 1 scale 2^-1 (3 <= 6 * 2^-1): -3 / 0.5 = -6 -> nibble 0xF in the high half.
    assert scales.tolist() == [0, 126]
    assert blocks[1, 0].item() == 0xF0
    assert blocks[0].tolist() == [0] * 16


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.zeros(3, 48))
    with pytest.raises(ValueError, match="finite"):
        quantize_mxfp4(torch.full((32,), math.inf))
    with pytest.raises(ValueError, match="uint8"):
        dequantize_mxfp4(torch.zeros(1, 16), torch.zeros(1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="blocks must be"):
        dequantize_mxfp4(torch.zeros(2, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8))
