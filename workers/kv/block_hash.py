"""Chained block hashes over token ids: the key of the prefix cache and of the router's index.

A block's hash covers its parent's hash and its own tokens, so equal hashes mean equal
*prefixes*, not merely equal blocks:

    tokens   [ t0 .. t7 ][ t8 .. t15 ][ t16 .. t23 ][ t24 t25 ]   (block_size 8)
    hashes      h0 ----->   h1 ------>   h2                        (partial block: no hash)
    h0 = H(None, t0..t7)   h1 = H(h0, t8..t15)   h2 = H(h1, t16..t23)

The workers (block pool, cache manager) and the router (prefix index) must compute the very
same values in different processes and Python runs, so the hash is BLAKE2b (16-byte digest)
over a fixed byte encoding, never Python's salted `hash()`. BLAKE2b rather than SHA-256:
the same strength for this use, and about 1.4x faster per block in CPython (the digest
is sized, not truncated). This module imports only the standard library, because the
router imports it.

The router hashes every prompt it places on the request path, so the chain is computed
from one encoding of many blocks at once (`iter_block_hashes`, or
`iter_encoded_block_hashes` over an encoding the caller keeps), about 2.5x faster than
block by block, and lazily, so a lookup stops hashing where the cached prefix ends. It
can also resume a chain from a known block's hash (`parent`, `start_block`), so a prompt
extending one hashed before (an ingress's next chat turn) hashes only its new blocks.
Per block the bulk path costs one state copy, three updates and a digest (~0.7-1 us in
CPython, most of it the digest's compression); the bytes of every hash are those above.
"""

import hashlib
import struct
import sys
from array import array
from collections.abc import Generator, Iterator, Sequence

BlockHash = bytes
"""A block hash: a BLAKE2b digest of `BLOCK_HASH_BYTES` bytes."""

BLOCK_HASH_BYTES = 16
"""128 bits: collisions are astronomically rare, and the pool still checks token equality."""

# Bumping the domain tag changes every hash, which is how an incompatible change of the
# encoding would invalidate indices kept elsewhere (Redis) instead of silently mismatching.
# v1 was SHA-256 over the same encoding.
_DOMAIN = b"tandem.kv.block.v2"
_NO_PARENT = b"\x00"
_HAS_PARENT = b"\x01"
_MAX_TOKEN_ID = 2**32 - 1
_DOMAIN_STATE = hashlib.blake2b(_DOMAIN, digest_size=BLOCK_HASH_BYTES)
_CHAINED_STATE = hashlib.blake2b(_DOMAIN + _HAS_PARENT, digest_size=BLOCK_HASH_BYTES)
_U32 = struct.Struct("<I").pack
# Tokens are encoded through array("I"): a C loop over the list, little-endian u32 each
# (swapped on a big-endian host), the same bytes as struct "<I" per token.
if array("I").itemsize != 4:
    raise ImportError("tandem.workers.kv.block_hash needs a 4-byte C unsigned int")
_SWAP = sys.byteorder != "little"
# Blocks encoded by iter_block_hashes' first call (then twice as many each time): enough
# to amortise the encoding, few enough that a lookup ending early (a cold prompt) encodes
# little of a long prompt.
_FIRST_CHUNK_BLOCKS = 16


def encode_tokens(token_ids: Sequence[int]) -> bytes:
    """Token ids as the hash encodes them: little-endian u32 each (ValueError if one is
    not an int in [0, 2**32 - 1])."""
    # array.fromlist converts a list ~30% faster than the array("I", ...) constructor.
    tokens = array("I")
    try:
        tokens.fromlist(token_ids if type(token_ids) is list else list(token_ids))
    except (OverflowError, TypeError) as e:
        raise ValueError(f"token_ids must be ints in [0, {_MAX_TOKEN_ID}]: {e}") from None
    if _SWAP:
        tokens.byteswap()
    return tokens.tobytes()


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], extra: bytes = b"") -> BlockHash:
    """Hash one block given its parent's hash (None for the first block of a sequence).

    `extra` separates caches that must never share KV for equal tokens (a model revision,
    a per-tenant salt); it is mixed into every block so a chain never crosses between salts.
    Encoding (little-endian): domain tag, parent flag [+ parent], len(extra) u32, extra,
    len(tokens) u32, tokens as u32 each.
    """
    if parent is not None and len(parent) != BLOCK_HASH_BYTES:
        raise ValueError(f"parent must be a {BLOCK_HASH_BYTES}-byte block hash, got {parent!r}")
    head = _NO_PARENT if parent is None else _HAS_PARENT + parent
    # One update of the whole encoding on a copy of the pre-fed domain state: the same
    # bytes as feeding each field in turn, at a fraction of the per-call overhead.
    h = _DOMAIN_STATE.copy()
    tokens = encode_tokens(token_ids)
    h.update(b"".join((head, _U32(len(extra)), extra, _U32(len(token_ids)), tokens)))
    return h.digest()


def _chain_plan(
    block_size: int,
    extra: bytes,
    num_blocks: int | None,
    num_tokens: int,
    parent: BlockHash | None,
    start_block: int,
) -> tuple[int, bytes]:
    """Checked arguments of a chain over num_tokens tokens: (blocks to hash up to, at most
    the full blocks there are; the bytes fed between each block's parent and its tokens)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if start_block < 0:
        raise ValueError(f"start_block must be >= 0, got {start_block}")
    if (parent is None) != (start_block == 0):
        raise ValueError(
            f"parent must be given exactly when start_block > 0 (start_block {start_block})"
        )
    if parent is not None and len(parent) != BLOCK_HASH_BYTES:
        raise ValueError(f"parent must be a {BLOCK_HASH_BYTES}-byte block hash, got {parent!r}")
    full = num_tokens // block_size
    if num_blocks is None or num_blocks > full:
        num_blocks = full
    return num_blocks, _U32(len(extra)) + extra + _U32(block_size)


def _hash_run(
    data: bytes,
    parent: BlockHash | None,
    middle: bytes,
    step: int,
    into: list[BlockHash] | None,
) -> Generator[BlockHash, None, BlockHash | None]:
    """The chained hashes of the whole blocks encoded in `data` (`step` bytes each),
    after the block whose hash is `parent` (None: data starts at block 0). Returns the
    last hash, to chain the next run from."""
    first_offset = 0
    if parent is None and data:
        h = _DOMAIN_STATE.copy()
        h.update(_NO_PARENT + middle)
        h.update(data[:step])
        parent = h.digest()
        if into is not None:
            into.append(parent)
        yield parent
        first_offset = step
    # Every block after the first feeds the same bytes around its parent and tokens:
    # domain tag + _HAS_PARENT (pre-fed in _CHAINED_STATE), parent, `middle`, tokens.
    chained = _CHAINED_STATE.copy
    for offset in range(first_offset, len(data), step):
        h = chained()
        h.update(parent)
        h.update(middle)
        h.update(data[offset : offset + step])
        parent = h.digest()
        if into is not None:
            into.append(parent)
        yield parent
    return parent


def iter_block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    extra: bytes = b"",
    num_blocks: int | None = None,
    *,
    parent: BlockHash | None = None,
    start_block: int = 0,
    into: list[BlockHash] | None = None,
) -> Iterator[BlockHash]:
    """The chained hashes of the first `num_blocks` full blocks of `token_ids` (default:
    every full block), each equal to hash_block's, computed only as they are asked for.

    parent, start_block: continue a chain already hashed up to block start_block - 1,
    whose hash is `parent`: yields the hashes of blocks start_block .. num_blocks - 1
    only, the very values the whole chain has there. Both or neither: a block after
    the first always has a parent.
    into: a list each hash is appended to before it is yielded (a caller keeping what a
    lazy lookup computed, without a generator of its own around this one).
    """
    num_blocks, middle = _chain_plan(
        block_size, extra, num_blocks, len(token_ids), parent, start_block
    )
    first, chunk = start_block, _FIRST_CHUNK_BLOCKS
    while first < num_blocks:
        last = min(num_blocks, first + chunk)
        data = encode_tokens(token_ids[first * block_size : last * block_size])
        parent = yield from _hash_run(data, parent, middle, 4 * block_size, into)
        # Chunks double: a lookup that ends early encodes little past its end, a long
        # one encodes in a few calls.
        first, chunk = last, 2 * chunk


def iter_encoded_block_hashes(
    encoded: bytes,
    block_size: int,
    extra: bytes = b"",
    num_blocks: int | None = None,
    *,
    parent: BlockHash | None = None,
    start_block: int = 0,
    into: list[BlockHash] | None = None,
) -> Iterator[BlockHash]:
    """iter_block_hashes over tokens already encoded by encode_tokens (a caller that keeps
    the encoding anyway, as the router's hash cache does): the same values, and the same
    arguments, block counts in blocks. The arguments are checked at once, not lazily."""
    num_blocks, middle = _chain_plan(
        block_size, extra, num_blocks, len(encoded) // 4, parent, start_block
    )
    step = 4 * block_size
    data = encoded[start_block * step : max(start_block, num_blocks) * step]
    return _hash_run(data, parent, middle, step, into)


def hash_prompt_blocks(
    token_ids: Sequence[int], block_size: int, extra: bytes = b""
) -> list[BlockHash]:
    """Chained hashes of the full blocks of `token_ids` (a trailing partial block has none)."""
    return list(iter_block_hashes(token_ids, block_size, extra))
