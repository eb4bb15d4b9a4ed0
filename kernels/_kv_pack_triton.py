"""Triton code of the KV block gather / scatter (private; see kernels/kv_pack.py).

Everything is moved as integer words (the widest of 8, 4, 2, 1 bytes that divides the block
and every address), so the copy is bit-exact whatever the cache dtype. The grid is
(listed blocks, chunks of a block); program (i, c) copies chunk c of block block_ids[i]
of both the key and the value cache:

    packed words  [ key block 0 | key block 1 | ... | value block 0 | value block 1 | ... ]
                    ^ i * block_words                 ^ (n + i) * block_words

Ids outside [0, num_cache_blocks) touch no memory (their packed slot is left as it was):
a guard against corrupting memory, not a way to skip blocks.
"""

import triton
import triton.language as tl


@triton.jit
def _kv_blocks_copy_kernel(
    key_ptr, value_ptr, packed_ptr, block_ids_ptr,
    num_listed, num_cache_blocks, block_words, stride_kb, stride_vb,
    BLOCK: tl.constexpr, UNPACK: tl.constexpr,
):
    index = tl.program_id(0).to(tl.int64)
    words = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    block = tl.load(block_ids_ptr + index).to(tl.int64)
    in_range = (block >= 0) & (block < num_cache_blocks)
    mask = words < tl.where(in_range, block_words, 0)
    key_words = key_ptr + block * stride_kb + words
    value_words = value_ptr + block * stride_vb + words
    packed_key = packed_ptr + index * block_words + words
    packed_value = packed_ptr + (num_listed + index) * block_words + words
    if UNPACK:
        tl.store(key_words, tl.load(packed_key, mask=mask), mask=mask)
        tl.store(value_words, tl.load(packed_value, mask=mask), mask=mask)
    else:
        tl.store(packed_key, tl.load(key_words, mask=mask), mask=mask)
        tl.store(packed_value, tl.load(value_words, mask=mask), mask=mask)
