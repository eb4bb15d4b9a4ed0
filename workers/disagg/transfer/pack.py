"""Gather the blocks of one layer into one contiguous buffer, and scatter them back.

One message per layer keeps the number of sends small (24 for gpt-oss-20b) while letting
the prefill side send a layer as soon as it is computed. Packed layout of one layer, as
raw bytes so the wire never depends on the cache dtype:

    packed  uint8 [2 * n * block_bytes]
            = view(dtype) [2, n, block_size, num_kv_heads, head_dim]
              [0, i] = key_cache[block_ids[i]]     [1, i] = value_cache[block_ids[i]]

The i-th packed block goes to the i-th destination block id on the other side, so sender
and receiver only have to agree on the order of blocks, not on their ids.

On CUDA one Triton launch copies a layer's key and value blocks (kernels/kv_pack.py, the
same layout); elsewhere torch's index_select / index_copy_ do it, one call per cache.
"""

from __future__ import annotations

import torch

from tandem.kernels.kv_pack import pack_kv_blocks, unpack_kv_blocks


def packed_nbytes(key_cache: torch.Tensor, num_blocks: int) -> int:
    """Bytes of the packed buffer of `num_blocks` blocks of a layer shaped like key_cache."""
    return 2 * num_blocks * key_cache[0].numel() * key_cache.element_size()


def pack_layer(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_ids: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Copy blocks `block_ids` of one layer into `out` (uint8, allocated when None).

    key_cache, value_cache: [num_blocks, block_size, kv_heads, head_dim], same dtype/device
    block_ids: [n] int64 on the caches' device
    returns:   uint8 [2 * n * block_bytes], see the module docstring
    """
    n = block_ids.numel()
    nbytes = packed_nbytes(key_cache, n)
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8, device=key_cache.device)
    elif out.dtype != torch.uint8 or out.numel() != nbytes or not out.is_contiguous():
        raise ValueError(f"out must be contiguous uint8 of {nbytes} bytes")
    if key_cache.is_cuda:
        pack_kv_blocks(key_cache, value_cache, block_ids, out)
        return out
    packed = out.view(key_cache.dtype).view(2, n, *key_cache.shape[1:])
    torch.index_select(key_cache, 0, block_ids, out=packed[0])
    torch.index_select(value_cache, 0, block_ids, out=packed[1])
    return out


def unpack_layer(
    packed: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_ids: torch.Tensor,
) -> None:
    """Write a packed layer into blocks `block_ids` of key_cache / value_cache (in place).

    packed:    uint8 [2 * n * block_bytes] from pack_layer on the other side
    block_ids: [n] int64, distinct (a repeated id would make the write order undefined)
    """
    n = block_ids.numel()
    if packed.numel() != packed_nbytes(key_cache, n):
        raise ValueError(
            f"packed buffer has {packed.numel()} bytes, {n} blocks need "
            f"{packed_nbytes(key_cache, n)}"
        )
    if key_cache.is_cuda:
        unpack_kv_blocks(packed, key_cache, value_cache, block_ids)
        return
    blocks = packed.view(key_cache.dtype).view(2, n, *key_cache.shape[1:])
    key_cache.index_copy_(0, block_ids, blocks[0])
    value_cache.index_copy_(0, block_ids, blocks[1])
