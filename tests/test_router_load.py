"""LoadView.from_workers with a memo (what an ingress keeps across placements): the same
views as without one, entries reused only while nothing they were built from changed."""

from __future__ import annotations

import pytest

from tandem.router.load import LoadView, ReplicaLoad, ReplicaMemo
from tandem.workers.control_plane import WorkerCapacity, WorkerInfo, WorkerLoad


def _worker(rid: str, role: str, running: int = 0) -> WorkerInfo:
    return WorkerInfo(
        replica_id=rid,
        role=role,
        model="tiny",
        capacity=WorkerCapacity(max_num_seqs=8, kv_blocks=(64, 16), block_size=8),
        load=WorkerLoad(running=running, queued_prompt_tokens=3 * running, kv_usage=0.25),
    )


def test_memo_gives_the_same_views_and_reuses_only_unchanged_entries():
    workers = [_worker("p0", "prefill", 1), _worker("d0", "decode", 2), _worker("b0", "both", 3)]
    memo: ReplicaMemo = {}
    in_flight, tokens = {"d0": 1}, {"d0": 40}
    first = LoadView.from_workers(workers, in_flight, tokens, memo)
    assert first == LoadView.from_workers(workers, in_flight, tokens)
    assert sorted(memo) == ["b0", "d0", "p0"]
    entries = {r.replica_id: r for r in first.prefill + first.decode}

    # Nothing changed: every entry is the very object of the last view.
    again = LoadView.from_workers(workers, in_flight, tokens, memo)
    assert all(r is entries[r.replica_id] for r in again.prefill + again.decode)

    # New in-flight figures for d0, a new record (next registry poll) for p0.
    workers[0] = _worker("p0", "prefill", 5)
    in_flight, tokens = {"d0": 2}, {"d0": 90}
    view = LoadView.from_workers(workers, in_flight, tokens, memo)
    assert view == LoadView.from_workers(workers, in_flight, tokens)
    by_id = {r.replica_id: r for r in view.prefill + view.decode}
    assert (by_id["d0"].in_flight, by_id["d0"].in_flight_prompt_tokens) == (2, 90)
    assert by_id["p0"].running == 5
    assert by_id["b0"] is entries["b0"]


def test_memo_forgets_replicas_that_left_the_registry():
    memo: ReplicaMemo = {}
    many = [_worker(f"d{i}", "decode") for i in range(6)]
    LoadView.from_workers(many, memo=memo)
    assert len(memo) == 6
    LoadView.from_workers(many[:2], memo=memo)
    assert sorted(memo) == ["d0", "d1"]
    assert LoadView.from_workers([], memo=memo) == LoadView()


def test_view_checks_order_and_derived_figures_follow_the_entry():
    a, b = ReplicaLoad("a", running=2, in_flight=5), ReplicaLoad("b", queued_prompt_tokens=7)
    LoadView(decode=(a, b))
    for bad in ((b, a), (a, a)):
        with pytest.raises(ValueError, match="LoadView.decode"):
            LoadView(decode=bad)
    # Cached on the entry, read twice: the same figures as the definitions.
    for _ in range(2):
        assert (a.outstanding, b.outstanding) == (5, 0)
        assert (a.pending_prompt_tokens, b.pending_prompt_tokens) == (0, 7)
    assert ReplicaLoad("c", kv_usage=0.5, kv_capacity_tokens=64).kv_tokens_in_use == 32.0


def test_delta_join_keeps_this_ingress_fresh_and_others_from_the_heartbeat():
    # Heartbeat: 6 requests, 300 prompt tokens queued; this ingress had 4 / 200 of them
    # in flight when it first saw that record.
    record = _worker("d0", "decode", 6)  # running 6, queued 18
    memo: ReplicaMemo = {}
    first = LoadView.from_workers([record], {"d0": 4}, {"d0": 10}, memo, delta=True).decode[0]
    assert (first.in_flight_at_heartbeat, first.in_flight_prompt_tokens_at_heartbeat) == (4, 10)
    # others: 6 - 4 = 2 requests, 18 - 10 = 8 tokens.
    assert (first.outstanding, first.pending_prompt_tokens) == (6, 18)
    # Three of this ingress's requests finished since: fresh at once (the max join would
    # keep the heartbeat's 6 until the next heartbeat).
    later = LoadView.from_workers([record], {"d0": 1}, {"d0": 0}, memo, delta=True).decode[0]
    assert (later.outstanding, later.pending_prompt_tokens) == (3, 8)
    legacy = LoadView.from_workers([record], {"d0": 1}, {"d0": 0}).decode[0]
    assert (legacy.outstanding, legacy.pending_prompt_tokens) == (6, 18)
    # More placed here than the heartbeat knew: counted once, never negative for others.
    burst = LoadView.from_workers([record], {"d0": 9}, {"d0": 50}, memo, delta=True).decode[0]
    assert (burst.outstanding, burst.pending_prompt_tokens) == (11, 58)
    # A new heartbeat record snapshots the figures of the moment it is first seen.
    fresh = _worker("d0", "decode", 9)
    now = LoadView.from_workers([fresh], {"d0": 9}, {"d0": 50}, memo, delta=True).decode[0]
    assert (now.in_flight_at_heartbeat, now.outstanding) == (9, 9)
    assert now.pending_prompt_tokens == 50


def test_delta_join_needs_a_memo():
    with pytest.raises(ValueError, match="delta=True needs a memo"):
        LoadView.from_workers([_worker("d0", "decode")], delta=True)
