"""KV block pack / unpack kernels against plain torch indexing, compared bit for bit.

On CPU the kernels run through the Triton interpreter (tests/conftest.py); on a GPU,
compiled (`pytest --noconftest`), where workers/disagg/transfer/pack.py also routes through them.
Packed buffers start filled with 0xA5 bytes and caches with random bits including NaN
patterns, so an unwritten or stray byte shows; floats are compared as raw bytes.
"""

import pytest
import torch

from tandem.kernels.kv_pack import (
    pack_kv_blocks,
    pack_kv_blocks_reference,
    unpack_kv_blocks,
    unpack_kv_blocks_reference,
)
from tandem.workers.disagg.transfer.pack import pack_layer, packed_nbytes, unpack_layer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
POISON = 0xA5


def random_cache(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator,
                 device: str = DEVICE) -> torch.Tensor:
    """Random bytes reinterpreted as dtype: every bit pattern, NaNs included."""
    nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).view(shape).to(device)


def raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of t, flat, on the CPU."""
    return t.contiguous().reshape(-1).view(torch.uint8).cpu()


def poisoned_buffer(nbytes: int, offset: int = 0) -> torch.Tensor:
    """uint8 [nbytes] filled with POISON, starting `offset` bytes into its allocation."""
    base = torch.full((nbytes + offset,), POISON, dtype=torch.uint8, device=DEVICE)
    return base[offset:]


CASES = [
    # (num_blocks, block_size, kv_heads, head_dim, dtype): block bytes and so word size vary.
    (9, 8, 2, 16, torch.bfloat16),      # 512 B blocks: int64 words
    (7, 3, 1, 3, torch.bfloat16),       # 18 B: int16 words
    (6, 3, 1, 3, torch.uint8),          # 9 B: byte words
    (5, 4, 3, 2, torch.float32),        # 96 B: int64 words
    (4, 8, 2, 160, torch.float32),      # 10 KiB: 1280 int64 words, two chunks per block
]


@pytest.mark.parametrize(("num_blocks", "block_size", "kv_heads", "head_dim", "dtype"), CASES)
def test_pack_then_unpack_bit_exact(num_blocks: int, block_size: int, kv_heads: int,
                                    head_dim: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(num_blocks * 31 + head_dim)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    key, value = random_cache(shape, dtype, gen), random_cache(shape, dtype, gen)
    src = torch.tensor([num_blocks - 1, 0, 2, 2], device=DEVICE)  # repeats are fine to read
    nbytes = packed_nbytes(key, src.numel())
    packed = poisoned_buffer(nbytes)
    pack_kv_blocks(key, value, src, packed)
    assert torch.equal(packed.cpu(), raw(pack_kv_blocks_reference(key, value, src)))

    dest_shape = (num_blocks + 2, *shape[1:])
    dest_key, dest_value = random_cache(dest_shape, dtype, gen), random_cache(dest_shape, dtype,
                                                                              gen)
    want_key, want_value = dest_key.clone(), dest_value.clone()
    dest = torch.tensor([3, num_blocks + 1, 0, 1], device=DEVICE, dtype=torch.int32)
    unpack_kv_blocks(packed, dest_key, dest_value, dest)
    unpack_kv_blocks_reference(packed, want_key, want_value, dest)
    assert torch.equal(raw(dest_key), raw(want_key))        # listed blocks and no others
    assert torch.equal(raw(dest_value), raw(want_value))
    for i, (s, d) in enumerate(zip(src.tolist(), dest.tolist(), strict=True)):
        assert torch.equal(raw(dest_key[d]), raw(key[s])), i
        assert torch.equal(raw(dest_value[d]), raw(value[s])), i


def test_strided_caches_and_unaligned_buffer() -> None:
    """Caches whose blocks are every other block of a larger tensor, key and value with
    different block strides, and a packed buffer 2 bytes off (int16 words)."""
    gen = torch.Generator().manual_seed(4)
    key_big = random_cache((12, 4, 2, 8), torch.bfloat16, gen)
    value_big = random_cache((9, 4, 2, 8), torch.bfloat16, gen)
    key, value = key_big[::3], value_big[1::2]            # 4 blocks each, strides differ
    ids = torch.tensor([3, 1, 0], device=DEVICE)
    packed = poisoned_buffer(packed_nbytes(key, 3), offset=2)
    pack_kv_blocks(key, value, ids, packed)
    assert torch.equal(packed.cpu(), raw(pack_kv_blocks_reference(key, value, ids)))

    key_before, value_before = key_big.clone(), value_big.clone()
    back = torch.tensor([2, 0, 3], device=DEVICE)
    unpack_kv_blocks(packed, key, value, back)
    want_key, want_value = key_before.clone(), value_before.clone()
    unpack_kv_blocks_reference(packed, want_key[::3], want_value[1::2], back)
    assert torch.equal(raw(key_big), raw(want_key))       # the skipped blocks are untouched
    assert torch.equal(raw(value_big), raw(want_value))


def test_out_of_range_ids_touch_no_memory() -> None:
    gen = torch.Generator().manual_seed(5)
    key = random_cache((4, 2, 1, 8), torch.float32, gen)
    value = random_cache((4, 2, 1, 8), torch.float32, gen)
    ids = torch.tensor([1, -1, 4, 2], device=DEVICE)
    packed = poisoned_buffer(packed_nbytes(key, 4))
    pack_kv_blocks(key, value, ids, packed)
    blocks = packed.view(2, 4, -1).cpu()                  # [key/value, listed, block bytes]
    assert (blocks[:, 1:3] == POISON).all()               # slots of -1 and 4 left as they were
    assert torch.equal(blocks[0, 0], raw(key[1])) and torch.equal(blocks[1, 3], raw(value[2]))

    before_key, before_value = key.clone(), value.clone()
    unpack_kv_blocks(packed, key, value, ids)
    for b in (0, 3):
        assert torch.equal(raw(key[b]), raw(before_key[b]))
        assert torch.equal(raw(value[b]), raw(before_value[b]))


def test_empty_and_bad_arguments() -> None:
    key = torch.zeros(3, 2, 1, 4, device=DEVICE)
    value = torch.zeros_like(key)
    none = torch.empty(0, dtype=torch.int64, device=DEVICE)
    pack_kv_blocks(key, value, none, torch.empty(0, dtype=torch.uint8, device=DEVICE))
    unpack_kv_blocks(torch.empty(0, device=DEVICE), key, value, none)
    ids = torch.tensor([0, 2], device=DEVICE)
    with pytest.raises(ValueError, match="bytes"):
        pack_kv_blocks(key, value, ids, torch.empty(63, dtype=torch.uint8, device=DEVICE))
    with pytest.raises(ValueError, match="value_cache"):
        pack_kv_blocks(key, value.half(), ids, torch.empty(128, dtype=torch.uint8,
                                                           device=DEVICE))
    with pytest.raises(ValueError, match="block_ids"):
        unpack_kv_blocks(torch.empty(32, device=DEVICE), key, value, ids.float())
    with pytest.raises(ValueError, match="contiguous"):
        pack_kv_blocks(key.transpose(1, 3), value.transpose(1, 3), ids,
                       torch.empty(128, dtype=torch.uint8, device=DEVICE))


# ---------------------------------------------------------------------------------------
# gpt-oss-20b shapes on the GPU, through workers/disagg/transfer/pack.py (the kernels on CUDA):
# block 16 tokens x 8 kv heads x 64 dims bf16 = 16 KiB per cache block.
# ---------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="real shapes need a GPU")
@pytest.mark.parametrize("num_listed", [1, 64, 512])
def test_pack_layer_gpt_oss_20b_shapes(num_listed: int) -> None:
    gen = torch.Generator().manual_seed(num_listed)
    shape = (2048, 16, 8, 64)                              # 32 MiB per cache
    key = random_cache(shape, torch.bfloat16, gen, "cuda")
    value = random_cache(shape, torch.bfloat16, gen, "cuda")
    src = torch.randperm(2048, generator=gen)[:num_listed].to("cuda")
    packed = pack_layer(key, value, src)
    expected = pack_layer(key.cpu(), value.cpu(), src.cpu())   # the torch path
    assert torch.equal(packed.cpu(), expected)
    assert torch.equal(packed.cpu(), raw(pack_kv_blocks_reference(key, value, src)))

    dest_key = random_cache(shape, torch.bfloat16, gen, "cuda")
    dest_value = random_cache(shape, torch.bfloat16, gen, "cuda")
    want_key, want_value = dest_key.cpu(), dest_value.cpu()
    dest = torch.randperm(2048, generator=gen)[:num_listed].to("cuda")
    unpack_layer(packed, dest_key, dest_value, dest)
    unpack_layer(expected, want_key, want_value, dest.cpu())   # the torch path
    assert torch.equal(raw(dest_key), raw(want_key))
    assert torch.equal(raw(dest_value), raw(want_value))
