"""DecodeGraphs' step inputs from persistent block-table rows (CPU, no model run): after
any sequence of steps, the staged tables and slots equal those built from scratch."""

from __future__ import annotations

import random

import torch

from tandem.workers.engine.runner import DecodeGraphs
from tandem.workers.engine.scheduler import ScheduledRequest
from tandem.workers.model.gpt_oss import GptOssModel
from tandem.workers.synthetic.checkpoint_writer import tiny_config

BLOCK = 4


def decode(request_id: str, position: int, tables: list[list[int]]) -> ScheduledRequest:
    return ScheduledRequest(request_id=request_id, token_ids=[position % 7],
                            start_position=position, num_new_tokens=1,
                            block_tables=[list(t) for t in tables], slot_ids=[[], []],
                            needs_sample=True, is_new=False, num_cached_tokens=0)


def check(graphs: DecodeGraphs, scheduled: list[ScheduledRequest]) -> None:
    size = graphs.padded_size(len(scheduled))
    graphs._fill(scheduled, size)
    staged = graphs._staged(size)
    batch = len(scheduled)
    for i, r in enumerate(scheduled):
        assert staged[0, i] == r.token_ids[0]
        assert staged[1, i] == r.start_position and staged[2, i] == r.seq_len
        for g, table in enumerate(r.block_tables):
            row = graphs.block_tables[g][i, : len(table)].tolist()
            # Released entries (-1) lie before the window and are never read: any value.
            assert [b for b, want in zip(row, table, strict=True) if want >= 0] == [
                b for b in table if b >= 0], (r.request_id, g)
            pos = r.start_position
            assert staged[3 + g, i] == table[pos // BLOCK] * BLOCK + pos % BLOCK
    assert (staged[2, batch:] == 1).all() and (staged[3:, batch:] == -1).all()


def test_persistent_rows_follow_growth_order_reuse_and_rewrites():
    model = GptOssModel(tiny_config(), torch.float32)
    graphs = DecodeGraphs(model, [], BLOCK, sizes=(1, 2, 4, 8))
    rng = random.Random(0)
    live: dict[str, tuple[int, list[list[int]]]] = {}
    next_block = 0
    for step in range(60):
        # Admit, finish and reorder requests; grow each by one token a step.
        if len(live) < 6 and rng.random() < 0.4:
            live[f"r{step}"] = (rng.randrange(1, 9), [[], []])
        if live and rng.random() < 0.15:
            gone = rng.choice(sorted(live))
            del live[gone]
            graphs.forget([gone])
        if not live:
            continue
        for rid, (pos, tables) in list(live.items()):
            pos += 1
            for g, table in enumerate(tables):
                while len(table) < -(-(pos + 1) // BLOCK):
                    table.append(next_block)
                    next_block += 1
                if g == 1:  # a sliding group of window 5: entries before it released
                    for j in range(max(0, (pos - 5 + 1) // BLOCK)):
                        table[j] = -1
            live[rid] = (pos, tables)
        order = sorted(live, key=lambda _: rng.random())
        check(graphs, [decode(rid, *live[rid]) for rid in order])
        if step % 10 == 0:
            # A table changed behind the graphs' back, same length, same step again: the
            # row is noticed and rewritten.
            pos, tables = live[order[0]]
            tables[0][-1] = next_block
            next_block += 1
            check(graphs, [decode(rid, *live[rid]) for rid in order])
    assert len(graphs.row_of) <= graphs.num_rows
