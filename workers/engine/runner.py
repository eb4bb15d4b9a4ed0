"""The model runner: scheduler output in, logits of the sampling positions out.

The scheduler works on ints and lists; this is the one place that turns a step into
tensors. For a step with two sequences, a 3-token prefill chunk of A and one decode
token of B, block size 4, the flattened (varlen) batch is

    input_ids        [a0 a1 a2 | b7]
    positions        [ 4  5  6 |  7]          A has 4 cached tokens, B has 7
    query_start_loc  [0, 3, 4]
    seq_lens         [7, 8]                   context after this step
    block_tables[g]  [[5, 2, -1], [9, 1, -1]] per KV group, padded with -1
    slot_mapping[g]  [2*4+0, 2*4+1, 2*4+2, 1*4+3]

and the logits are taken at the last new token of every sequence that samples.

Decode steps (one new token per sequence, no per-layer callback) on CUDA replay a CUDA
graph instead of launching ~20 kernels per layer from Python: `DecodeGraphs` captures the
whole forward plus the logits once per batch size (lazily, on first use), over static
input buffers that each step overwrites. A batch is padded up to the next captured size;
a padding row is a 1-token sequence at position 0 that reads cache block 0 and writes
nothing (slot -1), and its logits are dropped:

    rows        0 .. B-1 (the step)        | B .. S-1 (padding)
    input_ids   new tokens                 | 0
    positions   seq_len - 1                | 0
    seq_lens    seq_len                    | 1
    tables[g]   block tables (prefix)      | [0, stale...]   only entry 0 is read
    slots[g]    slot of the new token      | -1
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from tandem.workers.engine.scheduler import ScheduledRequest, SchedulerOutput
from tandem.workers.model.attention import (
    AttentionMetadata,
    KVGroupTables,
    build_attention_metadata,
)
from tandem.workers.model.gpt_oss import GptOssModel, KVCache, allocate_kv_caches
from tandem.workers.model.triton_backends import TritonMoE, TritonPagedAttention

DEFAULT_GRAPH_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
"""Decode batch sizes captured by default (on first use each): powers of two, so padding
costs at most half a step."""


def warm_up_lengths(max_tokens: int) -> list[int]:
    """Prefill step sizes that reach every kernel variant a step of up to `max_tokens`
    tokens can pick: each MoE tiling bucket (kernels/moe.py: 4 (token, expert) pairs a
    token, buckets at 1, <= 4, <= 128, <= 256, <= 1024 tokens and above) on both sides of
    its edge, and token counts of each of Triton's integer specialisations (1, a multiple
    of 16, neither)."""
    edges = (1, 2, 4, 5, 16, 17, 100, 128, 129, 256, 257, 1024, 1025, 2048, 4096, 8192)
    return sorted({n for n in edges if n <= max_tokens} | {max_tokens})


def graphs_supported(model: GptOssModel, device: torch.device) -> bool:
    """CUDA, and backends that never synchronise with the host (the Triton ones); the torch
    references read metadata with .tolist(), which a capture forbids."""
    return (
        device.type == "cuda"
        and isinstance(model.attention, TritonPagedAttention)
        and isinstance(model.moe, TritonMoE)
    )


class ModelRunner:
    """Owns the model and its KV cache tensors; runs one scheduled step at a time."""

    def __init__(
        self,
        model: GptOssModel,
        blocks_per_group: Sequence[int],
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        cuda_graph_sizes: Sequence[int] | None = None,
    ) -> None:
        """cuda_graph_sizes: decode batch sizes to replay as CUDA graphs; None: the defaults
        where graphs_supported(), else none; () turns graphs off."""
        self.model = model
        self.device = device
        self.block_size = block_size
        self.num_groups = len(model.config.kv_groups)
        self.kv_caches = allocate_kv_caches(
            model.config, blocks_per_group, block_size, dtype, device
        )
        supported = graphs_supported(model, device)
        if cuda_graph_sizes is None:
            cuda_graph_sizes = DEFAULT_GRAPH_SIZES if supported else ()
        if cuda_graph_sizes and not supported:
            raise ValueError(
                "cuda_graph_sizes needs a CUDA device and the Triton attention and MoE backends"
            )
        self.decode_graphs = (
            DecodeGraphs(model, self.kv_caches, block_size, cuda_graph_sizes)
            if cuda_graph_sizes
            else None
        )

    def warm_up(
        self,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        """Compile every kernel variant and capture every decode graph that steps of up to
        `max_num_batched_tokens` tokens and `max_num_seqs` sequences use, so that no request
        pays for either. Runs throwaway steps that write KV block 0 of every group: call it
        before any request holds blocks."""
        say = progress or (lambda message: None)
        for n in warm_up_lengths(max_num_batched_tokens):
            begin = time.monotonic()
            self.execute(_throwaway_step([n], self.block_size, self.num_groups))
            if n >= 3:
                # Several sequences, one of them decoding at a context: the mixed step shape.
                split = [1, (n - 1) // 2, n - 1 - (n - 1) // 2]
                self.execute(_throwaway_step(split, self.block_size, self.num_groups))
            say(f"warm-up: prefill steps of {n} tokens in {time.monotonic() - begin:.2f} s")
        graphs = self.decode_graphs
        if graphs is None:
            return
        needed = graphs.padded_size(min(max_num_seqs, graphs.sizes[-1]))
        for size in graphs.sizes:
            if size > needed or size in graphs.graphs:
                continue
            begin = time.monotonic()
            graphs.capture(size)
            say(f"warm-up: decode graph of {size} sequences in {time.monotonic() - begin:.2f} s")

    def _inputs(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        reqs = out.scheduled
        ids: list[int] = []
        positions: list[int] = []
        for r in reqs:
            ids.extend(r.token_ids)
            positions.extend(range(r.start_position, r.seq_len))
        metadata = build_attention_metadata(
            seq_lens=[r.seq_len for r in reqs],
            num_new_tokens=[r.num_new_tokens for r in reqs],
            block_tables=[[r.block_tables[g] for r in reqs] for g in range(self.num_groups)],
            block_size=self.block_size,
            device=self.device,
        )
        as_tensor = functools.partial(torch.tensor, dtype=torch.int64, device=self.device)
        return as_tensor(ids), as_tensor(positions), metadata

    @torch.inference_mode()
    def execute(
        self,
        out: SchedulerOutput,
        after_layer: Callable[[int], None] | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the step; return fp32 logits [n_sampling, vocab] in `out.scheduled` order
        of the requests whose `needs_sample` is set. after_layer(i) runs once layer i's
        KV is in the cache. input_ids: the step's new tokens [T] int64 on the device, in
        place of the scheduled token_ids (tokens sampled by a step the host has not read
        back yet)."""
        last = []
        end = 0
        for r in out.scheduled:
            end += r.num_new_tokens
            if r.needs_sample:
                last.append(end - 1)
        graphs = self.decode_graphs
        if graphs is not None:
            graphs.forget([*out.preempted_ids, *out.finished_ids])
            graphs.forget(r.request_id for r in out.scheduled if r.is_new)
        if graphs is not None and after_layer is None and graphs.accepts(out.scheduled):
            logits = graphs.run(out.scheduled, input_ids)  # [B, V] fp32, a row a sequence
            if len(last) == len(out.scheduled):
                return logits.clone()  # the graph's buffer is overwritten by the next replay
            index = torch.tensor(last, dtype=torch.long, device=self.device)
            return logits.index_select(0, index)
        host_ids, positions, metadata = self._inputs(out)
        input_ids = host_ids if input_ids is None else input_ids
        # Copied before the forward is queued: a copy from pageable memory waits for the
        # stream, and after the forward it would hold the host until the GPU is done.
        index = torch.tensor(last, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, positions, metadata, self.kv_caches, after_layer)  # [T, d]
        if not last:
            return torch.empty(0, self.model.config.vocab_size, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, index))  # [n, V] fp32

    def check_alive(self) -> None:
        """Raise when the runner can no longer run steps. One process: never; an
        expert-parallel runner raises once it lost a rank."""

    def close(self) -> None:
        """Release what the runner started beyond this process (expert-parallel ranks)."""


class DecodeGraphs:
    """CUDA graphs of whole decode steps (forward and logits), one per padded batch size.

    A graph reads its size's staged one-token inputs and the first S rows of the shared
    block tables, so a step only copies its inputs in (one copy per KV group and one more)
    and replays. The graphs share one memory pool; they are replayed one at a time on the
    current stream, and each one's logits are copied out before the next replay.

    Block tables are kept on the host between steps, one persistent row per request
    (`row_of`), and a step writes only the entries its requests gained since they were
    last seen (a new block every block_size steps), then gathers its rows in step order
    with one numpy indexing: the per-step host cost does not grow with context length.

        persistent[g]   row 7: [ 4  9  2  7  5 | -1 ...]    known[g, 7] = 5
        step rows       scheduled order -> persistent rows [7, 2, 11, ...]

    Entries only ever change by appending or by release to -1 (sliding groups), and a
    released entry lies before the window, which the kernels never read, so a stale id
    there is harmless. A request's row is dropped when it finishes, is preempted or is
    (re-)admitted; a row whose last known entry no longer matches is rewritten whole.
    """

    def __init__(
        self,
        model: GptOssModel,
        kv_caches: Sequence[KVCache],
        block_size: int,
        sizes: Sequence[int],
    ) -> None:
        if any(s < 1 for s in sizes):
            raise ValueError(f"cuda_graph_sizes must be >= 1, got {sorted(sizes)}")
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sizes = sorted(set(sizes))
        rows = self.sizes[-1]
        # A table row covers the model's longest sequence; the kernels read only the
        # entries below seq_len / block_size, so stale entries past a step's width are safe.
        self.max_blocks = -(-model.config.max_position_embeddings // block_size)
        device = model.device
        num_groups = len(model.config.kv_groups)

        def buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.num_groups = num_groups
        # A size's one-token inputs, rows: ids, positions, seq_lens, then one slot row per
        # KV group, [3 + G, S] int64: one host-to-device copy a step, from pinned memory on
        # CUDA (was 3 + 2G copies from pageable memory: 0.27 ms of a 2.8 ms step on an H100).
        self.staged: dict[int, torch.Tensor] = {}
        self.host: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # see _host
        self.copied: dict[int, torch.cuda.Event] = {}  # the last copies out of self.host
        self.seq_lens = buffer((rows,), torch.int32)  # staged row 2, cast inside the graph
        # One token per sequence: query_start_loc is 0, 1, ..., rows for every size.
        self.query_start_loc = torch.arange(rows + 1, dtype=torch.int32, device=device)
        self.block_tables = [
            buffer((rows, self.max_blocks), torch.int32) for _ in range(num_groups)
        ]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool: tuple[int, int] | None = None  # made at the first capture (needs CUDA)
        # Persistent host tables (see the class docstring): room for twice the largest
        # batch, so requests that pause (mid-prefill) keep their rows.
        self.num_rows = 2 * rows
        self.persistent = [
            np.full((self.num_rows, self.max_blocks), -1, dtype=np.int32) for _ in range(num_groups)
        ]
        self.known = np.zeros((num_groups, self.num_rows), dtype=np.int64)
        self.row_of: dict[str, int] = {}
        self.free_rows = list(range(self.num_rows - 1, -1, -1))

    def forget(self, request_ids: Iterable[str]) -> None:
        """Drop the persistent table rows of requests whose tables are gone or new."""
        for request_id in request_ids:
            row = self.row_of.pop(request_id, None)
            if row is not None:
                self.known[:, row] = 0
                self.free_rows.append(row)

    def _rows(self, scheduled: Sequence[ScheduledRequest]) -> np.ndarray:
        """Persistent row of each scheduled request, taking free rows for new ones."""
        rows = [self.row_of.get(r.request_id, -1) for r in scheduled]
        for i, row in enumerate(rows):
            if row >= 0:
                continue
            if not self.free_rows:
                # Rows of requests absent from this step go (they are rebuilt if they return).
                present = {r.request_id for r in scheduled}
                self.forget([rid for rid in self.row_of if rid not in present])
            rows[i] = self.free_rows.pop()
            self.row_of[scheduled[i].request_id] = rows[i]
        return np.asarray(rows, dtype=np.int64)

    def _update_rows(self, scheduled: Sequence[ScheduledRequest], rows: np.ndarray,
                     g: int) -> np.ndarray:
        """Write the entries of group g that the step's requests gained; return the lengths
        of their tables."""
        batch = len(scheduled)
        lens = np.fromiter((len(r.block_tables[g]) for r in scheduled), np.int64, batch)
        last = np.fromiter((r.block_tables[g][-1] for r in scheduled), np.int64, batch)
        known = self.known[g, rows]
        table = self.persistent[g]
        held = table[rows, np.maximum(lens - 1, 0)]
        changed = (lens != known) | (held != last)
        for i in np.nonzero(changed)[0].tolist():
            entries = scheduled[i].block_tables[g]
            row, k, n = int(rows[i]), int(known[i]), int(lens[i])
            if n < k or (k and entries[k - 1] >= 0 and entries[k - 1] != table[row, k - 1]):
                k = 0  # not an extension of what the row holds: rewrite it
            table[row, k:n] = entries[k:]
            self.known[g, row] = n
        return lens

    def accepts(self, scheduled: Sequence[ScheduledRequest]) -> bool:
        """A decode step that fits: 1..max size sequences of one new token each, tables
        within the static width."""
        if not scheduled or len(scheduled) > self.sizes[-1]:
            return False
        return all(
            r.num_new_tokens == 1 and all(len(table) <= self.max_blocks for table in r.block_tables)
            for r in scheduled
        )

    def padded_size(self, batch: int) -> int:
        """The captured size a batch of `batch` sequences runs at."""
        return next(s for s in self.sizes if s >= batch)

    def run(
        self, scheduled: Sequence[ScheduledRequest], input_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Replay the step; fp32 logits [B, V], a view of the graph's output buffer.
        input_ids [B] int64 on the device, if given, replace the scheduled tokens."""
        size = self.padded_size(len(scheduled))
        if size not in self.graphs:
            self._capture(size)
        self._fill(scheduled, size)
        if input_ids is not None:
            self._staged(size)[0, : len(scheduled)].copy_(input_ids)
        self.graphs[size].replay()
        return self.logits[size][: len(scheduled)]

    def run_eagerly(self, scheduled: Sequence[ScheduledRequest]) -> torch.Tensor:
        """The same padded step over the static buffers, launched without a graph (any
        device): what a replay computes, for checks. fp32 logits [B, V]."""
        size = self.padded_size(len(scheduled))
        self._fill(scheduled, size)
        return self._step(size)[: len(scheduled)]

    def _staged(self, size: int) -> torch.Tensor:
        if size not in self.staged:
            self.staged[size] = torch.zeros((3 + self.num_groups, size), dtype=torch.int64,
                                            device=self.model.device)
        return self.staged[size]

    def _host(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A size's host buffers to copy from (pinned on CUDA, so copies do not wait for the
        GPU): staged inputs [3 + G, S] int64 and room for G block tables of S rows int32.
        Reused: the previous step's copies out of them are waited for first."""
        if size in self.copied:
            self.copied.pop(size).synchronize()
        if size not in self.host:
            pin = self.model.device.type == "cuda"
            self.host[size] = (
                torch.empty((3 + self.num_groups, size), dtype=torch.int64, pin_memory=pin),
                torch.empty(self.num_groups * size * self.max_blocks, dtype=torch.int32,
                            pin_memory=pin),
            )
        return self.host[size]

    def _fill(self, scheduled: Sequence[ScheduledRequest], size: int) -> None:
        """Copy the step's inputs into rows [0, B) and padding into rows [B, size)."""
        batch = len(scheduled)
        bs = self.block_size
        staged, tables_flat = self._host(size)
        host = staged.numpy()
        host[0, :batch] = [r.token_ids[0] for r in scheduled]
        positions = host[1, :batch]
        positions[:] = [r.start_position for r in scheduled]
        host[2, :batch] = positions + 1  # seq_len: one new token per sequence
        host[:, batch:] = 0
        host[2:, batch:] = [[1]] + [[-1]] * self.num_groups   # seq_len 1, no slot
        rows = self._rows(scheduled)
        batch_index = np.arange(batch)
        for g, tables in enumerate(self.block_tables):
            width = int(self._update_rows(scheduled, rows, g).max())
            table = tables_flat[g * size * self.max_blocks:][: size * width].view(size, width)
            padded = table.numpy()
            padded[:batch] = self.persistent[g][rows, :width]
            padded[batch:] = 0
            blocks = padded[batch_index, positions // bs]
            if (blocks < 0).any():
                i = int(np.nonzero(blocks < 0)[0][0])
                raise ValueError(
                    f"group {g} request {scheduled[i].request_id}: no block for new token at "
                    f"position {scheduled[i].start_position}"
                )
            host[3 + g, :batch] = blocks * bs + positions % bs
            tables[:size, :width].copy_(table, non_blocking=True)
        self._staged(size).copy_(staged, non_blocking=True)
        if staged.is_pinned():
            self.copied[size] = torch.cuda.Event()
            self.copied[size].record()

    def _reset_padding(self, size: int) -> None:
        """Every row of [0, size) a padding row: what warm-up and capture run on."""
        staged = self._staged(size)
        staged[:2].zero_()
        staged[2].fill_(1)
        staged[3:].fill_(-1)
        for tables in self.block_tables:
            tables[:size].zero_()

    def _step(self, size: int) -> torch.Tensor:
        """The forward of a size-row decode step over the static buffers -> logits [S, V]."""
        staged = self._staged(size)
        self.seq_lens[:size].copy_(staged[2])
        metadata = AttentionMetadata(
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            groups=tuple(
                KVGroupTables(block_tables=tables[:size], slot_mapping=staged[3 + g])
                for g, tables in enumerate(self.block_tables)
            ),
        )
        hidden = self.model(staged[0], staged[1], metadata, self.kv_caches)  # [S, d]
        return self.model.compute_logits(hidden)

    def capture(self, size: int) -> None:
        """Capture a size's graph now (warm start) rather than at its first step."""
        if size not in self.sizes:
            raise ValueError(f"{size} is not one of the graph sizes {self.sizes}")
        self._capture(size)

    def _capture(self, size: int) -> None:
        # Padding rows write nothing, so warm-up and capture leave the KV cache untouched.
        self._reset_padding(size)
        # Warm up on a side stream (Triton compiles, the allocator settles), as capture needs.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(size)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a KV-transfer thread's CUDA calls during the capture are not errors.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self.logits[size] = self._step(size)
        self.graphs[size] = graph


def _throwaway_step(lengths: Sequence[int], block_size: int, num_groups: int) -> SchedulerOutput:
    """A step of sequences with `lengths` new tokens each, every block table entry block 0:
    for warm-up only (it writes block 0). A 1-token sequence decodes at context 17."""
    scheduled = []
    for i, n in enumerate(lengths):
        start = 16 if n == 1 and len(lengths) > 1 else 0
        blocks = -(-(start + n) // block_size)
        scheduled.append(ScheduledRequest(
            request_id=f"warm-up-{i}",
            token_ids=[0] * n,
            start_position=start,
            num_new_tokens=n,
            block_tables=[[0] * blocks for _ in range(num_groups)],
            slot_ids=[[0] * n for _ in range(num_groups)],
            needs_sample=True,
            is_new=True,
            num_cached_tokens=0,
        ))
    return SchedulerOutput(scheduled=scheduled, finished_ids=[s.request_id for s in scheduled])
