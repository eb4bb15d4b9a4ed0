"""IngressPlacement on constructed states (no Ray, no Redis): pending prefixes (a prompt
placed but not computed yet counts as cached where it goes, until its request ends) and
the decision log state() reports, which replays through place() to the same placement."""

from __future__ import annotations

import json

from tandem.cluster.index_feeder import PrefixIndexFeeder
from tandem.cluster.placement import (
    IngressPlacement,
    PlacementConfig,
    decision_from_state,
    prompt_digest,
)
from tandem.router.policies import DisaggRule, PrefixAware, PrefixAwareConfig, place
from tandem.workers.control_plane import KVEventReader, WorkerCapacity, WorkerInfo, WorkerLoad

BS = 4
CONFIG = PrefixAwareConfig(max_imbalance=32, copy_queue_ratio=1.0)


def _workers() -> list[WorkerInfo]:
    # d0 idle; d1 and d2 each have 100 prompt tokens queued (their last heartbeat).
    return [
        WorkerInfo(
            replica_id=f"d{i}",
            role="decode",
            model="m",
            capacity=WorkerCapacity(max_num_seqs=8, kv_blocks=(512, 64), block_size=BS),
            load=WorkerLoad(queued_prompt_tokens=0 if i == 0 else 100),
        )
        for i in range(3)
    ]


def _ingress(pending: bool) -> IngressPlacement:
    feeder = PrefixIndexFeeder(KVEventReader("redis://127.0.0.1:1", cluster="test"))
    return IngressPlacement(
        decode_policy=PrefixAware(CONFIG),
        prefill_policy=PrefixAware(CONFIG),
        config=PlacementConfig(
            rule=DisaggRule(local_prefill_threshold=8), block_size=BS, pending_prefixes=pending
        ),
        index=feeder,
    )


def test_a_placed_prompt_counts_as_cached_where_it_will_be_computed():
    """A 400-token document goes to idle d0, which then has it queued (in flight). The
    next question about it: with pending prefixes it follows the document (d0 will hold
    396 tokens of it, so only 24 are left to compute: 24 + 400 queued < 420 + 100);
    without, nothing holds it yet and it goes to a busy replica to compute it again."""
    workers = _workers()
    document = list(range(400))
    question = [*document, *range(1000, 1020)]
    for pending, want in ((True, ("d0", "prefix", 396)), (False, ("d1", "no_prefix", 0))):
        ingress = _ingress(pending)
        first = ingress.place(document, workers)
        assert (first.decode, first.decode_cached_tokens) == ("d0", 0)
        ingress.in_flight.start("d0", 400)  # as ClusterBackend counts a placed request
        # Explaining does not register anything.
        assert ingress.place(question, workers, dry_run=True) == ingress.place(
            question, workers, dry_run=True
        )
        second = ingress.place(question, workers)
        assert (second.decode, second.decode_reason, second.decode_cached_tokens) == want
        # The requests end: nothing is pending any more (the index would hold the blocks
        # by then, from d0's events; here it holds nothing).
        ingress.release(first)
        ingress.release(second)
        ingress.release(first)  # idempotent
        view = ingress.load_view(workers)
        assert ingress.cached_tokens(question, view) == {"d0": 0, "d1": 0, "d2": 0}
        assert ingress.state().get("pending_prompts", 0) == 0


def test_logged_decisions_replay_through_place_to_the_same_placement():
    workers = _workers()
    ingress = _ingress(True)
    prompts = [list(range(k, k + 40 + 8 * k)) for k in range(6)]
    prompts += [[*prompts[0], 7, 7, 7], [1, 2, 3]]
    placements = []
    for p in prompts:
        placements.append(ingress.place(p, workers))
        ingress.in_flight.start(placements[-1].decode, len(p))
    ingress.place([9] * 50, workers, dry_run=True)  # not logged
    state = json.loads(json.dumps(ingress.state()))
    log = state["recent_decisions"]
    assert [e["prompt"] for e in log] == [prompt_digest(p) for p in prompts]
    policy = PrefixAware(CONFIG)
    for entry, placed in zip(log, placements, strict=True):
        view, n, cached, placement = decision_from_state(entry)
        assert placement == placed
        again = place(
            view,
            n,
            decode_policy=policy,
            prefill_policy=policy,
            rule=DisaggRule(local_prefill_threshold=8),
            cached_tokens=cached,
        )
        assert again == placed
    # The follow-up of prompts[0] found it pending on the replica that took it.
    assert log[-2]["cached_tokens"][placements[0].decode] == 36  # 9 whole blocks of 40
    # A view replayed with other weights can decide otherwise: the log is what decided.
    view, n, cached, placement = decision_from_state(log[-2])
    other = PrefixAware(PrefixAwareConfig(prompt_weight=0.0, max_imbalance=32))
    rule = DisaggRule(local_prefill_threshold=8)
    elsewhere = place(
        view, n, decode_policy=other, prefill_policy=other, rule=rule, cached_tokens=cached
    )
    assert elsewhere.decode != placement.decode
