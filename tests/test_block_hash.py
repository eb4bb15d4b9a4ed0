"""Chained block hashes: pinned encoding, chaining, stability across processes."""

import hashlib
import os
import struct
import subprocess
import sys

import pytest

from tandem.workers.kv.block_hash import (
    BLOCK_HASH_BYTES,
    encode_tokens,
    hash_block,
    hash_prompt_blocks,
    iter_block_hashes,
    iter_encoded_block_hashes,
)


def _reference_hash(parent: bytes | None, tokens: list[int], extra: bytes) -> bytes:
    """The documented encoding, written out independently with int.to_bytes."""
    data = b"tandem.kv.block.v2"
    data += b"\x00" if parent is None else b"\x01" + parent
    data += len(extra).to_bytes(4, "little") + extra
    data += len(tokens).to_bytes(4, "little")
    data += b"".join(t.to_bytes(4, "little") for t in tokens)
    return hashlib.blake2b(data, digest_size=16).digest()


def test_matches_documented_encoding():
    h0 = hash_block(None, [1, 2, 3, 70000], b"salt")
    assert h0 == _reference_hash(None, [1, 2, 3, 70000], b"salt")
    h1 = hash_block(h0, [2**32 - 1, 0])
    assert h1 == _reference_hash(h0, [2**32 - 1, 0], b"")
    assert len(h1) == BLOCK_HASH_BYTES


def test_pinned_values():
    """Literal values of the v2 encoding: a change of the hash function, the encoding or
    the library's BLAKE2b shows here even if the reference above changed along with it
    (the workers' Redis streams and every router's index depend on these bytes)."""
    assert hash_block(None, [1, 2, 3, 70000], b"salt").hex() == "4fca5d1cf85f114865ae1cf7290ae9e8"
    assert b"".join(hash_prompt_blocks(list(range(24)), 8)).hex() == (
        "094c7c8bbeee9afd1326fbc911de5f07"
        "61d2b516b998fb0201746cfaf7a65486"
        "94d9a87194535d3761b9fb93eee54d46"
    )


def test_every_input_changes_the_hash():
    base = hash_block(None, [5, 6, 7, 8])
    parent = hash_block(None, [9])
    variants = {
        base,
        hash_block(None, [5, 6, 7, 9]),
        hash_block(None, [6, 5, 7, 8]),
        hash_block(None, [5, 6, 7]),
        hash_block(parent, [5, 6, 7, 8]),
        hash_block(None, [5, 6, 7, 8], b"x"),
    }
    assert len(variants) == 6
    # An extra of tokens-looking bytes must not alias a longer token list.
    assert hash_block(None, [1], (2).to_bytes(4, "little")) != hash_block(None, [1, 2])


def test_prompt_blocks_are_the_chain_of_full_blocks():
    tokens = list(range(100, 123))  # 23 tokens, block 8: 2 full blocks + 7 tokens
    hashes = hash_prompt_blocks(tokens, 8, b"e")
    h0 = hash_block(None, tokens[0:8], b"e")
    h1 = hash_block(h0, tokens[8:16], b"e")
    assert hashes == [h0, h1]
    assert hash_prompt_blocks(tokens[:7], 8) == []
    # A longer sequence extends, never rewrites, the chain.
    assert hash_prompt_blocks(tokens + [1], 8, b"e") == [
        h0,
        h1,
        hash_block(h1, tokens[16:] + [1], b"e"),
    ]


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="token_ids"):
        hash_block(None, [-1])
    with pytest.raises(ValueError, match="token_ids"):
        hash_block(None, [2**32])
    with pytest.raises(ValueError, match="parent"):
        hash_block(b"short", [1])
    with pytest.raises(ValueError, match="block_size"):
        hash_prompt_blocks([1, 2], 0)


def test_stable_across_processes_and_hash_seeds():
    code = (
        "from tandem.workers.kv.block_hash import hash_prompt_blocks;"
        "print(b''.join(hash_prompt_blocks(list(range(40)), 8, b'm')).hex())"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=root)
        outs.add(subprocess.check_output([sys.executable, "-c", code], env=env, cwd=root).strip())
    assert outs == {b"".join(hash_prompt_blocks(list(range(40)), 8, b"m")).hex().encode()}


def test_iter_block_hashes_is_the_chain_hash_block_computes():
    """The bulk path (one encoding for many blocks, in chunks) against hash_block chained
    by hand, across chunk boundaries, with a salt, and cut at num_blocks."""
    tokens = [(i * 7919) % 2**32 for i in range(8 * 70 + 5)]  # 70 full blocks + 5 tokens
    for block_size in (1, 3, 8):
        chain = _chained_by_hand(tokens, block_size, b"s")
        assert list(iter_block_hashes(tokens, block_size, b"s")) == chain
        assert hash_prompt_blocks(tokens, block_size, b"s") == chain
        for n in (0, 1, 33, 69, 10_000):
            assert list(iter_block_hashes(tokens, block_size, b"s", num_blocks=n)) == chain[:n]
    assert list(iter_block_hashes(tokens[:7], 8)) == []


def test_iter_block_hashes_is_lazy_and_checks_tokens():
    blocks = iter_block_hashes([5] * 800, 8)
    assert next(blocks) == hash_block(None, [5] * 8)
    with pytest.raises(ValueError, match="token_ids"):
        list(iter_block_hashes([1] * 8 + [-1] * 8, 8))
    with pytest.raises(ValueError, match="token_ids"):
        hash_prompt_blocks([2**32] * 8, 8)
    with pytest.raises(ValueError, match="block_size"):
        next(iter_block_hashes([1, 2], 0))


def _chained_by_hand(tokens: list[int], block_size: int, salt: bytes) -> list[bytes]:
    """hash_block over each full block in turn, each block's parent the previous hash."""
    chain, parent = [], None
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash_block(parent, tokens[start : start + block_size], salt)
        chain.append(parent)
    return chain


def test_iter_block_hashes_continues_a_chain_from_its_parent():
    """Resuming at block k from block k-1's hash gives the whole chain's hashes from k on
    (hash_block chained by hand), across chunk boundaries and with a salt; the pinned
    chain's last two blocks come back from its first hash alone."""
    tokens = [(i * 104729) % 2**32 for i in range(5 * 70 + 3)]
    for block_size in (1, 5):
        chain = _chained_by_hand(tokens, block_size, b"s")
        for k in (1, 2, 31, 32, 33, 69, len(chain) - 1):
            resumed = iter_block_hashes(
                tokens, block_size, b"s", parent=chain[k - 1], start_block=k
            )
            assert list(resumed) == chain[k:]
            cut = iter_block_hashes(
                tokens, block_size, b"s", num_blocks=k + 3, parent=chain[k - 1], start_block=k
            )
            assert list(cut) == chain[k : k + 3]
        # At or past the end there is nothing left to hash.
        end = iter_block_hashes(tokens, block_size, b"s", parent=chain[-1], start_block=len(chain))
        assert list(end) == []
    first = bytes.fromhex("094c7c8bbeee9afd1326fbc911de5f07")
    assert b"".join(iter_block_hashes(list(range(24)), 8, parent=first, start_block=1)).hex() == (
        "61d2b516b998fb0201746cfaf7a6548694d9a87194535d3761b9fb93eee54d46"
    )


def test_iter_block_hashes_continuation_arguments_are_checked():
    h = hash_block(None, [1])
    for kwargs, match in (
        ({"start_block": 1}, "parent"),
        ({"parent": h}, "parent"),
        ({"parent": h[:8], "start_block": 1}, "16-byte"),
        ({"parent": h, "start_block": -1}, "start_block"),
    ):
        with pytest.raises(ValueError, match=match):
            next(iter_block_hashes([1] * 16, 8, **kwargs))


def test_encode_tokens_is_little_endian_u32():
    tokens = [0, 1, 255, 256, 70000, 2**32 - 1]
    assert encode_tokens(tokens) == b"".join(struct.pack("<I", t) for t in tokens)
    assert encode_tokens(tuple(tokens)) == encode_tokens(tokens)
    with pytest.raises(ValueError, match="token_ids"):
        encode_tokens([1, -1])
    with pytest.raises(ValueError, match="token_ids"):
        encode_tokens([2**32])


def test_encoded_and_into_paths_are_the_same_chain():
    """iter_encoded_block_hashes over encode_tokens, and `into`, against hash_block
    chained by hand: across the doubling chunk boundaries (blocks 16, 48, 112), resumed
    mid-chain, cut at num_blocks, with a salt."""
    tokens = [(i * 2654435761) % 2**32 for i in range(2 * 130 + 1)]
    for block_size in (1, 2):
        chain = _chained_by_hand(tokens, block_size, b"x")
        encoded = encode_tokens(tokens)
        for k in (0, 1, 15, 16, 17, 47, 48, 111, 112, len(chain) - 1, len(chain)):
            for n in (None, k + 1, k + 40, 10_000):
                kwargs = {"parent": chain[k - 1], "start_block": k} if k else {}
                want = chain[k:n]
                got = list(iter_encoded_block_hashes(encoded, block_size, b"x", n, **kwargs))
                assert got == want
                into: list[bytes] = []
                lazy = iter_block_hashes(tokens, block_size, b"x", n, into=into, **kwargs)
                assert [h for h in lazy] == want and into == want


def test_into_holds_only_what_was_yielded():
    into: list[bytes] = []
    blocks = iter_block_hashes(list(range(80)), 8, into=into)
    first, second = next(blocks), next(blocks)
    assert into == [first, second]
    encoded_into: list[bytes] = []
    encoded = iter_encoded_block_hashes(encode_tokens(list(range(80))), 8, into=encoded_into)
    assert next(encoded) == first and encoded_into == [first]
    with pytest.raises(ValueError, match="parent"):
        iter_encoded_block_hashes(b"", 8, start_block=1)
