"""Paged attention for gpt-oss: per-step metadata, the backend contract, a torch reference.

Cache layout (one block space per KV group, see GptOssConfig.kv_groups). Every layer of a
group has its own key and value tensors, but all of them use the same block ids:

    key_cache [num_blocks, block_size, K, D]      slot = block_id * block_size + offset

    block_tables[b] = [ 7, 2, -1, ... ]           logical block i of sequence b -> physical id
    sequence b, position p  ->  slot block_tables[b][p // block_size] * block_size
                                     + p % block_size

A step flattens the new tokens of all its sequences (varlen):

    tokens     | a0 a1 a2 a3 | b0 | c0 c1 |     query_start_loc = [0, 4, 5, 7]
    seq_lens   |      4      | 9  |  13   |     (context after the step: cached + new)

so sequence b's new tokens sit at positions seq_lens[b] - n_b .. seq_lens[b] - 1.

Sliding-window layers only read positions p with q - W < p <= q. The engine may therefore
release sliding-group blocks that lie wholly before that range and put -1 in their table
entries; a backend must never read a table entry outside the window.
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class KVGroupTables:
    """Where one KV group's blocks are, for the sequences of a step."""

    block_tables: torch.Tensor
    # [B, max_blocks] int32: logical block -> physical block of this group; -1 = none.
    slot_mapping: torch.Tensor
    # [T] int64: slot each new token's k/v is written to; -1 = do not write (padding).


@dataclass
class AttentionMetadata:
    """Per-step description of the flattened batch, shared by every layer."""

    query_start_loc: torch.Tensor
    # [B + 1] int32: cumulative new-token counts; tokens of b are [qsl[b], qsl[b+1]).
    seq_lens: torch.Tensor
    # [B] int32: context length of each sequence after this step (cached + new tokens).
    groups: tuple[KVGroupTables, ...]
    # Indexed like GptOssConfig.kv_groups.


class AttentionBackend(ABC):
    """Causal paged attention with sinks, GQA and an optional sliding window.

    Contract of `forward`:
      - first writes k[t], v[t] into key_cache/value_cache at slot_mapping[t] of the
        layer's group (skipping -1), then attends: each new token of a sequence sees the
        sequence's cached and new positions p <= its own, and with a window W only
        p > own - W; reads of the cache go through the group's block table and never
        touch entries outside that range;
      - query head h reads kv head h // (H // K);
      - scores are q.k * scale; the sink S_h is one more softmax column (not scaled, no
        value); softmax in float32;
      - returns [T, H, D] in q's dtype; mutates only the two cache tensors.
    """

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        group_index: int,
        sinks: torch.Tensor,
        sliding_window: int | None,
        scale: float,
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, K, D], caches [N, block_size, K, D], sinks [H] -> [T, H, D]."""


class TorchPagedAttention(AttentionBackend):
    """Reference backend: one sequence at a time, gathering its context slot by slot."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        group_index: int,
        sinks: torch.Tensor,
        sliding_window: int | None,
        scale: float,
    ) -> torch.Tensor:
        tables = metadata.groups[group_index]
        write_kv_to_cache(k, v, key_cache, value_cache, tables.slot_mapping)

        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads = k.shape[1]
        group = num_heads // num_kv_heads
        block_size = key_cache.shape[1]
        flat_keys = key_cache.view(-1, num_kv_heads, head_dim)  # [N * block_size, K, D]
        flat_values = value_cache.view(-1, num_kv_heads, head_dim)
        sink_logits = sinks.float().view(num_kv_heads, group, 1, 1)  # [K, G, 1, 1]

        out = torch.empty_like(q)
        starts = metadata.query_start_loc.tolist()
        lengths = metadata.seq_lens.tolist()
        for b, context_len in enumerate(lengths):
            first, last = starts[b], starts[b + 1]
            num_new = last - first
            if num_new == 0:
                continue
            first_pos = context_len - num_new
            # Oldest position any query of this sequence may read.
            lowest = 0 if sliding_window is None else max(0, first_pos - sliding_window + 1)
            slots = context_slots(tables.block_tables[b], lowest, context_len, block_size)
            keys = flat_keys[slots].float()  # [C, K, D]
            values = flat_values[slots].float()  # [C, K, D]

            query = q[first:last].float().view(num_new, num_kv_heads, group, head_dim)
            scores = torch.einsum("nkgd,ckd->kgnc", query, keys) * scale  # [K, G, n, C]
            q_pos = torch.arange(first_pos, context_len, device=q.device)  # [n]
            k_pos = torch.arange(lowest, context_len, device=q.device)  # [C]
            visible = k_pos[None, :] <= q_pos[:, None]  # [n, C]
            if sliding_window is not None:
                visible &= k_pos[None, :] > q_pos[:, None] - sliding_window
            scores = scores.masked_fill(~visible, -math.inf)
            sink_col = sink_logits.expand(num_kv_heads, group, num_new, 1)
            probs = torch.softmax(torch.cat((scores, sink_col), dim=-1), dim=-1)[..., :-1]
            attended = torch.einsum("kgnc,ckd->nkgd", probs, values)  # [n, K, G, D]
            out[first:last] = attended.reshape(num_new, num_heads, head_dim).to(q.dtype)
        return out


def write_kv_to_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store k/v [T, K, D] at their slots of caches [N, block_size, K, D]; slot -1 is skipped."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    key_cache.view(-1, num_kv_heads, head_dim)[slots] = k[keep].to(key_cache.dtype)
    value_cache.view(-1, num_kv_heads, head_dim)[slots] = v[keep].to(value_cache.dtype)


def context_slots(block_table: torch.Tensor, start: int, end: int, block_size: int) -> torch.Tensor:
    """Slots of positions start..end-1 of one sequence; reads only the table entries they need.

    block_table [max_blocks] int32 -> [end - start] int64. A needed entry that is -1 means the
    caller released a block still inside the window: a broken engine invariant, raised here.
    """
    positions = torch.arange(start, end, device=block_table.device)  # [C]
    needed = block_table[start // block_size : (end - 1) // block_size + 1].long()
    if bool((needed < 0).any()):
        raise ValueError(
            f"block table has -1 inside the attended range of positions {start}..{end - 1}"
        )
    blocks = needed[positions // block_size - start // block_size]  # [C]
    return blocks * block_size + positions % block_size


def build_attention_metadata(
    seq_lens: Sequence[int],
    num_new_tokens: Sequence[int],
    block_tables: Sequence[Sequence[Sequence[int]]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Metadata for one step from plain lists.

    seq_lens[b]: context length after the step; num_new_tokens[b]: new tokens of b this
    step; block_tables[g][b]: physical block ids of sequence b in KV group g (-1 = released).
    Every new token must land in a block that exists.
    """
    if len(seq_lens) != len(num_new_tokens):
        raise ValueError("seq_lens and num_new_tokens differ in length")
    query_start_loc = [0]
    for n in num_new_tokens:
        query_start_loc.append(query_start_loc[-1] + n)
    groups = []
    for g, tables in enumerate(block_tables):
        if len(tables) != len(seq_lens):
            raise ValueError(f"block_tables[{g}] has {len(tables)} rows for {len(seq_lens)} seqs")
        slots: list[int] = []
        for b, (context_len, n) in enumerate(zip(seq_lens, num_new_tokens, strict=True)):
            pos = context_len - n
            while pos < context_len:  # one run of consecutive slots per block, not per token
                index = pos // block_size
                if index >= len(tables[b]) or tables[b][index] < 0:
                    raise ValueError(
                        f"group {g} sequence {b}: no block for new token at position {pos}"
                    )
                run_end = min(context_len, (index + 1) * block_size)
                base = tables[b][index] * block_size - index * block_size
                slots.extend(range(base + pos, base + run_end))
                pos = run_end
        width = max([len(row) for row in tables] + [1])
        padded = [list(row) + [-1] * (width - len(row)) for row in tables]
        groups.append(
            KVGroupTables(
                block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
                slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            )
        )
    return AttentionMetadata(
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(list(seq_lens), dtype=torch.int32, device=device),
        groups=tuple(groups),
    )
