"""Decoding through the paged cache equals the whole-prompt forward, whatever the batching.

A small scheduler simulation feeds three sequences in varlen steps of mixed chunk sizes
(prefill chunks and single-token decode steps in the same batch, shuffled order), with
physical blocks handed out from a shuffled free list so tables are non-contiguous and
interleaved. Every cache slot starts as NaN, so a read of anything never written shows.
With release on, sliding-group blocks leave the window as soon as no future query can see
them: their entries become -1, the blocks are poisoned again and go back to the free list,
where other sequences reuse them.
"""

import math
import random

import pytest
import torch

from tandem.workers.model.attention import TorchPagedAttention, build_attention_metadata
from tandem.workers.model.gpt_oss import GptOssModel, allocate_kv_caches
from tandem.workers.model.weights import load_model
from tandem.workers.synthetic.checkpoint_writer import tiny_config, write_random_checkpoint

BLOCK_SIZE = 8
LENGTHS = (45, 30, 61)
CHUNK_CHOICES = (1, 1, 1, 2, 5, 11, 17)


@pytest.fixture(scope="module", params=[16, 11], ids=["window16", "window11"])
def model(request, tmp_path_factory) -> GptOssModel:
    config = tiny_config(sliding_window=request.param)
    path = tmp_path_factory.mktemp(f"ckpt{request.param}")
    write_random_checkpoint(path, config, seed=21)
    loaded, _ = load_model(path, dtype=torch.float32)
    return loaded


def _sequences(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(4)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in LENGTHS]


def _run_batched(
    model: GptOssModel, seqs: list[list[int]], release: bool
) -> tuple[list[torch.Tensor], int]:
    """Feed all sequences through shuffled varlen steps -> (logits [L, vocab] per seq, releases)."""
    config = model.config
    rng = random.Random(0)
    groups = config.kv_groups
    total_blocks = sum(math.ceil(len(s) / BLOCK_SIZE) for s in seqs) + 3
    caches = allocate_kv_caches(
        config, [total_blocks] * len(groups), BLOCK_SIZE, torch.float32, "cpu"
    )
    for key, value in caches:
        key.fill_(math.nan)
        value.fill_(math.nan)
    free = [list(range(total_blocks)) for _ in groups]
    for pool in free:
        rng.shuffle(pool)
    tables: list[list[list[int]]] = [[[] for _ in seqs] for _ in groups]
    done = [0] * len(seqs)
    logits: list[list[torch.Tensor]] = [[] for _ in seqs]
    releases = 0

    while any(d < len(s) for d, s in zip(done, seqs, strict=True)):
        batch = [b for b in range(len(seqs)) if done[b] < len(seqs[b]) and rng.random() < 0.8]
        rng.shuffle(batch)
        if not batch:
            continue
        chunks = [min(rng.choice(CHUNK_CHOICES), len(seqs[b]) - done[b]) for b in batch]
        for b, n in zip(batch, chunks, strict=True):
            for g in range(len(groups)):
                while len(tables[g][b]) * BLOCK_SIZE < done[b] + n:
                    tables[g][b].append(free[g].pop())
        seq_lens = [done[b] + n for b, n in zip(batch, chunks, strict=True)]
        step_tables = [[tables[g][b] for b in batch] for g in range(len(groups))]
        metadata = build_attention_metadata(seq_lens, chunks, step_tables, BLOCK_SIZE)
        ids = torch.tensor(
            [t for b, n in zip(batch, chunks, strict=True) for t in seqs[b][done[b] : done[b] + n]]
        )
        positions = torch.tensor(
            [p for b, n in zip(batch, chunks, strict=True) for p in range(done[b], done[b] + n)]
        )
        step_logits = model.compute_logits(model(ids, positions, metadata, caches))
        for b, piece in zip(batch, step_logits.split(chunks), strict=True):
            logits[b].append(piece)
        for b, n in zip(batch, chunks, strict=True):
            done[b] += n
        if release:
            releases += _release_outside_window(model, caches, tables, free, done)
    return [torch.cat(parts) for parts in logits], releases


def _release_outside_window(model, caches, tables, free, done) -> int:
    """Free sliding blocks wholly before the oldest position a future query reads; count them."""
    config = model.config
    g = next(i for i, group in enumerate(config.kv_groups) if group.name == "sliding")
    window = config.kv_groups[g].sliding_window
    released = 0
    for b, table in enumerate(tables[g]):
        lowest_needed = done[b] - window + 1  # next query sits at position done[b]
        for index, block in enumerate(table):
            if block >= 0 and (index + 1) * BLOCK_SIZE <= lowest_needed:
                for layer in config.kv_groups[g].layers:
                    caches[layer][0][block].fill_(math.nan)
                    caches[layer][1][block].fill_(math.nan)
                free[g].append(block)
                table[index] = -1
                released += 1
    return released


def test_batched_paged_steps_match_forward_full(model: GptOssModel) -> None:
    seqs = _sequences(model.config.vocab_size)
    kept, _ = _run_batched(model, seqs, release=False)
    released, num_released = _run_batched(model, seqs, release=True)
    assert num_released >= 8
    for tokens, ours, ours_released in zip(seqs, kept, released, strict=True):
        expected = model.forward_full(tokens, block_size=BLOCK_SIZE)
        assert ours.shape == expected.shape
        bound = 2e-5 * max(1.0, expected.abs().max().item())
        assert (ours - expected).abs().max().item() <= bound
        # Released blocks were never read: the computation is the same, bit for bit.
        assert torch.equal(ours_released, ours)


def test_released_block_inside_window_is_refused(model: GptOssModel) -> None:
    config = model.config
    length = 40
    tokens = _sequences(config.vocab_size)[0][:length]
    blocks = math.ceil(length / BLOCK_SIZE)
    caches = allocate_kv_caches(
        config, [blocks] * len(config.kv_groups), BLOCK_SIZE, torch.float32, "cpu"
    )
    tables = [[list(range(blocks))] for _ in config.kv_groups]
    metadata = build_attention_metadata([length - 1], [length - 1], tables, BLOCK_SIZE)
    model(torch.tensor(tokens[:-1]), torch.arange(length - 1), metadata, caches)
    sliding = next(i for i, group in enumerate(config.kv_groups) if group.name == "sliding")
    window = config.kv_groups[sliding].sliding_window
    # The decode query at position 39 reads 39 - window + 1 .. 39; release that first block.
    tables[sliding][0][(length - window) // BLOCK_SIZE] = -1
    metadata = build_attention_metadata([length], [1], tables, BLOCK_SIZE)
    with pytest.raises(ValueError, match="-1 inside the attended range"):
        model(torch.tensor(tokens[-1:]), torch.tensor([length - 1]), metadata, caches)


def test_attention_reference_against_dense_formula() -> None:
    # The paged reference on one sequence against a dense formula written out directly:
    # p_ij = exp(s_ij) / (sum_j' exp(s_ij') + exp(S_h)), s_ij = q_i.k_j * scale, GQA h -> h // 2.
    gen = torch.Generator().manual_seed(0)
    length, heads, kv_heads, dim, window = 13, 4, 2, 8, 5
    q = torch.randn(length, heads, dim, generator=gen)
    k = torch.randn(length, kv_heads, dim, generator=gen)
    v = torch.randn(length, kv_heads, dim, generator=gen)
    sinks = torch.randn(heads, generator=gen)
    key_cache = torch.full((4, 4, kv_heads, dim), math.nan)
    value_cache = torch.full((4, 4, kv_heads, dim), math.nan)
    tables = [[[3, 0, 2, 1]]]
    metadata = build_attention_metadata([length], [length], tables, 4)
    out = TorchPagedAttention().forward(
        q, k, v, key_cache, value_cache, metadata, 0, sinks, window, 0.3
    )
    for i in range(length):
        for h in range(heads):
            keys = [j for j in range(length) if i - window < j <= i]
            scores = torch.stack([q[i, h] @ k[j, h // 2] * 0.3 for j in keys])
            weights = torch.exp(scores) / (torch.exp(scores).sum() + torch.exp(sinks[h]))
            expected = sum(w * v[j, h // 2] for w, j in zip(weights, keys, strict=True))
            torch.testing.assert_close(out[i, h], expected, rtol=1e-5, atol=1e-6)
    # Slot 4 * 3 + 0 holds position 0 (logical block 0 -> physical 3).
    assert torch.equal(key_cache[3, 0], k[0])


def test_slot_mapping_per_token() -> None:
    # Chunks that start and end inside blocks, over shuffled tables: each new token's slot
    # is table[pos // bs] * bs + pos % bs, and a token without a block is refused.
    rng = random.Random(3)
    block_size = 4
    seq_lens, new = [13, 1, 9, 20], [6, 1, 9, 3]
    physical = list(range(40))
    rng.shuffle(physical)
    tables = [[physical[10 * b : 10 * b + math.ceil(n / block_size)] for b, n in
               enumerate(seq_lens)]]
    metadata = build_attention_metadata(seq_lens, new, tables, block_size)
    expected = [tables[0][b][pos // block_size] * block_size + pos % block_size
                for b, (length, n) in enumerate(zip(seq_lens, new, strict=True))
                for pos in range(length - n, length)]
    assert metadata.groups[0].slot_mapping.tolist() == expected
    tables[0][0][2] = -1  # position 8 of sequence 0 is new this step
    with pytest.raises(ValueError, match="sequence 0: no block for new token at position 8"):
        build_attention_metadata(seq_lens, new, tables, block_size)
