"""Chained block hashes over token ids: the key of the prefix cache and of the router's index.

A block's hash covers its parent's hash and its own tokens, so equal hashes mean equal
*prefixes*, not merely equal blocks:

    tokens   [ t0 .. t7 ][ t8 .. t15 ][ t16 .. t23 ][ t24 t25 ]   (block_size 8)
    hashes      h0 ----->   h1 ------>   h2                        (partial block: no hash)
    h0 = H(None, t0..t7)   h1 = H(h0, t8..t15)   h2 = H(h1, t16..t23)

The workers (block pool, cache manager) and the router (prefix index) must compute the very
same values in different processes and Python runs, so the hash is SHA-256 over a fixed byte
encoding, never Python's salted `hash()`. This module imports only the standard library,
because the router imports it.
"""

import hashlib
import struct
from collections.abc import Sequence

BlockHash = bytes
"""A block hash: the first `BLOCK_HASH_BYTES` bytes of a SHA-256 digest."""

BLOCK_HASH_BYTES = 16
"""128 bits: collisions are astronomically rare, and the pool still checks token equality."""

# Bumping the domain tag changes every hash, which is how an incompatible change of the
# encoding would invalidate indices kept elsewhere (Redis) instead of silently mismatching.
_DOMAIN = b"tandem.kv.block.v1"
_NO_PARENT = b"\x00"
_HAS_PARENT = b"\x01"
_MAX_TOKEN_ID = 2**32 - 1
_DOMAIN_STATE = hashlib.sha256(_DOMAIN)


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], extra: bytes = b"") -> BlockHash:
    """Hash one block given its parent's hash (None for the first block of a sequence).

    `extra` separates caches that must never share KV for equal tokens (a model revision,
    a per-tenant salt); it is mixed into every block so a chain never crosses between salts.
    Encoding (little-endian): domain tag, parent flag [+ parent], len(extra) u32, extra,
    len(tokens) u32, tokens as u32 each.
    """
    if parent is not None and len(parent) != BLOCK_HASH_BYTES:
        raise ValueError(f"parent must be a {BLOCK_HASH_BYTES}-byte block hash, got {parent!r}")
    try:
        tokens = struct.pack(f"<I{len(token_ids)}I", len(token_ids), *token_ids)
    except struct.error as e:
        raise ValueError(f"token_ids must be ints in [0, {_MAX_TOKEN_ID}]: {e}") from None
    head = _NO_PARENT if parent is None else _HAS_PARENT + parent
    # One update of the whole encoding on a copy of the pre-fed domain state: the same
    # bytes as feeding each field in turn, at a fraction of the per-call overhead (the
    # router hashes every block of every prompt it places).
    h = _DOMAIN_STATE.copy()
    h.update(b"".join((head, struct.pack("<I", len(extra)), extra, tokens)))
    return h.digest()[:BLOCK_HASH_BYTES]


def hash_prompt_blocks(
    token_ids: Sequence[int], block_size: int, extra: bytes = b""
) -> list[BlockHash]:
    """Chained hashes of the full blocks of `token_ids` (a trailing partial block has none)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    hashes: list[BlockHash] = []
    parent: BlockHash | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], extra)
        hashes.append(parent)
    return hashes
