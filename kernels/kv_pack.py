"""Gather blocks of one layer's key and value caches into one buffer, and scatter them back.

Caches are [num_blocks, block_size, kv_heads, head_dim] (each block contiguous; blocks may
be strided). Packed layout, n = len(block_ids), any dtype, contiguous:

    packed = [2, n, block_size, kv_heads, head_dim] of the cache dtype, as raw bytes
             [0, i] = key_cache[block_ids[i]]        [1, i] = value_cache[block_ids[i]]

One launch moves both caches of a layer (the torch path, index_select / index_copy_, takes
two). It is one launch per layer, not one per transfer: the sender packs a layer as soon as
the model has written it, while the next layer computes, and the receiver unpacks a layer
as soon as it has arrived, so a launch over all layers would only wait for the slowest.

The copy is of integer words, bit-exact for any dtype. Block ids must lie in
[0, num_blocks): ids outside touch no memory (the kernel cannot raise without a host sync;
the torch references raise).

Public: `pack_kv_blocks`, `unpack_kv_blocks` and the torch references
`pack_kv_blocks_reference`, `unpack_kv_blocks_reference` at the bottom.
"""

import math

import torch
import triton

from tandem.kernels._kv_pack_triton import _kv_blocks_copy_kernel

_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
# Words one program moves per cache (8 KiB as int64: half a gpt-oss block of 16 tokens).
_CHUNK_WORDS = 1024


def _check_caches(key_cache: torch.Tensor, value_cache: torch.Tensor,
                  block_ids: torch.Tensor) -> None:
    if key_cache.dim() != 4:
        raise ValueError(f"key_cache must be [num_blocks, block_size, K, D], got "
                         f"{tuple(key_cache.shape)}")
    if value_cache.shape != key_cache.shape or value_cache.dtype != key_cache.dtype:
        raise ValueError(f"value_cache {value_cache.dtype} {tuple(value_cache.shape)} must match "
                         f"key_cache {key_cache.dtype} {tuple(key_cache.shape)}")
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if cache.shape[0] and not cache[0].is_contiguous():
            raise ValueError(f"{name} blocks must be contiguous, got strides {cache.stride()}")
    if block_ids.dim() != 1 or block_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_ids must be 1-D int32 or int64, got {block_ids.dtype} "
                         f"{tuple(block_ids.shape)}")
    if not (key_cache.device == value_cache.device == block_ids.device):
        raise ValueError("key_cache, value_cache and block_ids must be on one device")


def _block_bytes(cache: torch.Tensor) -> int:
    return math.prod(cache.shape[1:]) * cache.element_size()


def _check_packed(packed: torch.Tensor, key_cache: torch.Tensor, num_listed: int) -> None:
    if num_listed and not key_cache.shape[0]:
        raise ValueError(f"{num_listed} block_ids listed for caches with no blocks")
    nbytes = 2 * num_listed * _block_bytes(key_cache)
    if not packed.is_contiguous() or packed.numel() * packed.element_size() != nbytes:
        raise ValueError(f"packed must be contiguous with {nbytes} bytes for {num_listed} "
                         f"blocks, got {packed.numel() * packed.element_size()}")
    if packed.device != key_cache.device:
        raise ValueError("packed must be on the caches' device")


def _word_bytes(block_bytes: int, tensors: tuple[torch.Tensor, ...],
                block_strides_bytes: tuple[int, ...]) -> int:
    """Widest word that divides the block, every block stride and every start address."""
    return next((size for size in (8, 4, 2)
                 if block_bytes % size == 0 and all(s % size == 0 for s in block_strides_bytes)
                 and all(t.data_ptr() % size == 0 for t in tensors)), 1)


def _as_block_words(cache: torch.Tensor, word: torch.dtype) -> torch.Tensor:
    """[num_blocks, block words] view of a cache whose blocks are contiguous."""
    return cache.view(cache.shape[0], -1).view(torch.uint8).view(word)


def _launch(key_cache: torch.Tensor, value_cache: torch.Tensor, packed: torch.Tensor,
            block_ids: torch.Tensor, unpack: bool) -> None:
    num_listed = block_ids.numel()
    block_bytes = _block_bytes(key_cache)
    if num_listed == 0 or block_bytes == 0:
        return
    strides = (key_cache.stride(0) * key_cache.element_size(),
               value_cache.stride(0) * value_cache.element_size())
    size = _word_bytes(block_bytes, (key_cache, value_cache, packed), strides)
    word = _WORD_DTYPES[size]
    key_words = _as_block_words(key_cache, word)          # [num_blocks, block_words]
    value_words = _as_block_words(value_cache, word)
    packed_words = packed.reshape(-1).view(torch.uint8).view(word)   # [2 * n * block_words]
    block_words = block_bytes // size
    chunk = min(_CHUNK_WORDS, triton.next_power_of_2(block_words))
    grid = (num_listed, triton.cdiv(block_words, chunk))
    _kv_blocks_copy_kernel[grid](
        key_words, value_words, packed_words, block_ids,
        num_listed, key_cache.shape[0], block_words, key_words.stride(0), value_words.stride(0),
        BLOCK=chunk, UNPACK=unpack, num_warps=4 if chunk >= 512 else 1,
    )


def pack_kv_blocks(key_cache: torch.Tensor, value_cache: torch.Tensor,
                   block_ids: torch.Tensor, out: torch.Tensor) -> None:
    """out <- blocks block_ids of key_cache then of value_cache (see the module docstring).

    key_cache, value_cache [NB, BS, K, D]; block_ids [n] int32/int64 on the same device;
    out contiguous, any dtype, 2 * n * BS * K * D * element_size bytes.
    """
    _check_caches(key_cache, value_cache, block_ids)
    _check_packed(out, key_cache, block_ids.numel())
    _launch(key_cache, value_cache, out, block_ids, unpack=False)


def unpack_kv_blocks(packed: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     block_ids: torch.Tensor) -> None:
    """key_cache[block_ids[i]] <- packed key block i, value_cache likewise (in place).

    packed as `pack_kv_blocks` writes it; block_ids distinct (with a repeated id, which copy
    lands is undefined).
    """
    _check_caches(key_cache, value_cache, block_ids)
    _check_packed(packed, key_cache, block_ids.numel())
    _launch(key_cache, value_cache, packed, block_ids, unpack=True)


# ---------------------------------------------------------------------------------------
# Reference: plain torch indexing.
# ---------------------------------------------------------------------------------------

def pack_kv_blocks_reference(key_cache: torch.Tensor, value_cache: torch.Tensor,
                             block_ids: torch.Tensor) -> torch.Tensor:
    """[2, n, BS, K, D] in the cache dtype: the packed blocks, as a new tensor."""
    ids = block_ids.long()
    return torch.stack((key_cache[ids], value_cache[ids]))


def unpack_kv_blocks_reference(packed: torch.Tensor, key_cache: torch.Tensor,
                               value_cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    """Writes packed (any dtype, the bytes of [2, n, BS, K, D]) into the caches in place."""
    ids = block_ids.long()
    blocks = packed.reshape(-1).view(torch.uint8).view(key_cache.dtype)
    blocks = blocks.view(2, ids.numel(), *key_cache.shape[1:])
    key_cache[ids] = blocks[0]
    value_cache[ids] = blocks[1]
