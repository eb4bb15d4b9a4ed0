"""Scheduler: token budget, chunked prefill, max_num_seqs, preemption, prefix reuse, abort."""

import pytest

from tandem.workers.engine.request import Request, RequestStatus
from tandem.workers.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from tandem.workers.kv.block_hash import hash_prompt_blocks
from tandem.workers.kv.block_pool import BlockRemoved
from tandem.workers.kv.cache_manager import KVCacheManager, KVGroup

BS = 8
GROUPS = (KVGroup("full", None), KVGroup("sliding", 16))
FULL, SLIDING = 0, 1


def _sched(
    full_blocks: int = 32,
    sliding_blocks: int = 16,
    max_num_seqs: int = 4,
    max_num_batched_tokens: int = 20,
    **kw,
) -> Scheduler:
    config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, BS, **kw)
    return Scheduler(config, KVCacheManager(GROUPS, BS, (full_blocks, sliding_blocks)))


def _req(rid: str, tokens: list[int], max_tokens: int = 100, **kw) -> Request:
    return Request(request_id=rid, prompt_token_ids=tokens, max_tokens=max_tokens, **kw)


def _fake_token(rid: str, seq_len: int) -> int:
    """A deterministic "model": the next token depends only on the request and position."""
    return 10_000 + 1000 * int(rid[1:]) + seq_len


def _step(sched: Scheduler) -> SchedulerOutput:
    out = sched.schedule()
    sampled = {
        s.request_id: _fake_token(s.request_id, s.seq_len) for s in out.scheduled if s.needs_sample
    }
    sched.update_after_step(out, sampled)
    return out


def _summary(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [
        (s.request_id, s.start_position, s.num_new_tokens, s.needs_sample) for s in out.scheduled
    ]


def test_budget_goes_to_decodes_first_then_chunked_prefill():
    sched = _sched()
    sched.add(_req("r1", list(range(100, 110))))
    sched.add(_req("r2", list(range(200, 210))))
    out = _step(sched)
    assert _summary(out) == [("r1", 0, 10, True), ("r2", 0, 10, True)]
    r1 = out.scheduled[0]
    assert r1.token_ids == list(range(100, 110)) and r1.is_new
    assert r1.block_tables == [[0, 1], [0, 1]]
    assert r1.slot_ids == [list(range(10)), list(range(10))]
    assert out.scheduled[1].slot_ids[FULL] == list(range(16, 26))

    sched.add(_req("r3", list(range(300, 330))))
    out = _step(sched)
    # 2 decode tokens, then 18 of r3's 30 prompt tokens; a non-final chunk does not sample.
    assert _summary(out) == [("r1", 10, 1, True), ("r2", 10, 1, True), ("r3", 0, 18, False)]
    assert out.scheduled[0].token_ids == [_fake_token("r1", 10)]
    assert out.scheduled[0].slot_ids == [[10], [10]]
    assert out.scheduled[1].slot_ids == [[26], [26]]
    r3 = out.scheduled[2]
    assert r3.token_ids == list(range(300, 318)) and r3.is_new
    assert r3.block_tables == [[4, 5, 6], [4, 5, 6]]
    assert sched.get("r3").output_token_ids == []

    out = _step(sched)
    assert _summary(out) == [("r1", 11, 1, True), ("r2", 11, 1, True), ("r3", 18, 12, True)]
    r3 = out.scheduled[2]
    assert r3.token_ids == list(range(318, 330)) and not r3.is_new
    assert r3.block_tables == [[4, 5, 6, 7], [4, 5, 6, 7]]
    assert r3.slot_ids[FULL] == list(range(50, 62))

    # 30 computed: r3's first sliding block lies before position 15 and was released.
    out = _step(sched)
    assert _summary(out) == [("r1", 12, 1, True), ("r2", 12, 1, True), ("r3", 30, 1, True)]
    assert out.scheduled[2].block_tables == [[4, 5, 6, 7], [-1, 5, 6, 7]]
    assert out.scheduled[2].token_ids == [_fake_token("r3", 30)]
    assert sched.get("r3").output_token_ids == [_fake_token("r3", 30), _fake_token("r3", 31)]


def test_max_num_seqs_and_finished_ids():
    sched = _sched(max_num_seqs=2, max_num_batched_tokens=64)
    for i in (1, 2, 3):
        sched.add(_req(f"r{i}", [i] * 5))
    out = _step(sched)
    assert [s.request_id for s in out.scheduled] == ["r1", "r2"]
    assert (sched.num_running, sched.num_waiting) == (2, 1)
    sched.finish("r1")
    assert sched.get("r1") is None
    out = _step(sched)
    assert out.finished_ids == ["r1"]
    assert _summary(out) == [("r2", 5, 1, True), ("r3", 0, 5, True)]
    assert _step(sched).finished_ids == []


def test_long_prefill_threshold_and_max_tokens():
    sched = _sched(max_num_batched_tokens=64, long_prefill_token_threshold=8)
    sched.add(_req("r1", list(range(20)), max_tokens=2))
    assert _summary(_step(sched)) == [("r1", 0, 8, False)]
    assert _summary(_step(sched)) == [("r1", 8, 8, False)]
    assert _summary(_step(sched)) == [("r1", 16, 4, True)]
    assert _summary(_step(sched)) == [("r1", 20, 1, True)]
    # Two outputs reached max_tokens: finished with "length", blocks returned.
    assert not sched.has_work
    assert sched.kv.num_free == (32, 16)
    assert _step(sched).finished_ids == ["r1"]


def test_without_chunked_prefill_a_prompt_waits_for_a_step_with_room():
    sched = _sched(max_num_batched_tokens=20, enable_chunked_prefill=False)
    sched.add(_req("r1", list(range(10)), max_tokens=5))
    sched.add(_req("r2", list(range(100, 115)), max_tokens=5))
    assert _summary(_step(sched)) == [("r1", 0, 10, True)]
    assert _summary(_step(sched)) == [("r1", 10, 1, True), ("r2", 0, 15, True)]
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        sched.add(_req("r3", list(range(18)), max_tokens=5))


def test_preemption_when_pool_is_too_small_and_resumption():
    sched = _sched(full_blocks=4, sliding_blocks=4, max_num_batched_tokens=32)
    sched.add(_req("r1", list(range(100, 108)), max_tokens=16))
    sched.add(_req("r2", list(range(200, 208)), max_tokens=16))
    outs = [_step(sched) for _ in range(9)]
    assert _summary(outs[0]) == [("r1", 0, 8, True), ("r2", 0, 8, True)]
    assert outs[1].scheduled[0].block_tables == [[0, 2], [0, 2]]
    assert outs[1].scheduled[1].block_tables == [[1, 3], [1, 3]]
    assert all(o.preempted_ids == [] for o in outs)
    r2 = sched.get("r2")
    r2_hashes = hash_prompt_blocks(r2.all_token_ids, BS)
    sched.kv.drain_events()

    # Position 16 needs a third full block; none is free: r2 (admitted last) goes.
    out = _step(sched)
    assert out.preempted_ids == ["r2"]
    assert _summary(out) == [("r1", 16, 1, True)]
    assert out.scheduled[0].block_tables == [[0, 2, 3], [0, 2, 3]]
    # r2's blocks were freed tail first, so its block 1 (physical 3) was evicted.
    assert sched.kv.drain_events() == [
        BlockRemoved("full", r2_hashes[1]),
        BlockRemoved("sliding", r2_hashes[1]),
    ]
    assert r2.status is RequestStatus.PREEMPTED and r2.num_computed_tokens == 0
    assert (sched.num_running, sched.num_waiting) == (1, 1)
    assert r2.num_tokens == 17

    # r2 cannot come back until r1 finishes (16 outputs after 16 steps).
    for _ in range(6):
        out = _step(sched)
        assert [s.request_id for s in out.scheduled] == ["r1"]
    assert sched.get("r1") is None
    # Admission was tried and refused each step; a request without blocks computed nothing.
    assert r2.status is RequestStatus.PREEMPTED and r2.num_computed_tokens == 0
    out = _step(sched)
    assert out.finished_ids == ["r1"]
    # Re-admission prefills prompt + 9 outputs; its block 0 (physical 1) is still cached.
    assert _summary(out) == [("r2", 8, 9, True)]
    assert out.scheduled[0].is_new and out.scheduled[0].num_cached_tokens == 8
    assert out.scheduled[0].token_ids == r2.all_token_ids[8:17]
    assert out.scheduled[0].block_tables[FULL] == [1, 3, 2]
    while sched.has_work:
        _step(sched)
    expected = [_fake_token("r2", n) for n in range(8, 24)]
    assert r2.output_token_ids == expected
    assert r2.num_preemptions == 1
    assert sched.kv.num_free == (4, 4)
    sched.kv.check_integrity()


def test_second_request_reuses_a_three_block_prefix():
    sched = _sched(max_num_batched_tokens=64)
    shared = list(range(500, 524))
    sched.add(_req("r1", shared + [1, 2, 3, 4, 5, 6]))
    first = _step(sched).scheduled[0]
    assert first.num_cached_tokens == 0
    sched.add(_req("r2", shared + [9] * 10))
    out = _step(sched)
    r2 = out.scheduled[1]
    assert (r2.request_id, r2.is_new, r2.num_cached_tokens) == ("r2", True, 3 * BS)
    assert (r2.start_position, r2.num_new_tokens) == (24, 10)
    assert r2.token_ids == [9] * 10
    assert r2.block_tables[FULL][:3] == first.block_tables[FULL][:3]
    # The sliding window before position 24 covers blocks 1 and 2 only.
    assert r2.block_tables[SLIDING][0] == -1
    assert r2.block_tables[SLIDING][1:3] == first.block_tables[SLIDING][1:3]
    stats = sched.kv.prefix_stats
    assert (stats.requests, stats.query_tokens, stats.hit_tokens) == (2, 64, 24)


def test_abort_at_any_point_frees_everything():
    sched = _sched(max_num_seqs=3, max_num_batched_tokens=24, long_prefill_token_threshold=10)
    sched.add(_req("r1", list(range(10))))
    sched.add(_req("r2", list(range(100, 140))))  # prefilled over several steps
    sched.add(_req("r3", list(range(200, 210))))
    sched.add(_req("r4", list(range(300, 305))))  # stays waiting
    _step(sched)
    out = _step(sched)
    assert [s.request_id for s in out.scheduled] == ["r1", "r2", "r3"]
    assert sched.get("r2").num_computed_tokens < 40  # still prefilling
    assert sched.get("r4").status is RequestStatus.WAITING
    out = sched.schedule()
    # Aborted between schedule() and update_after_step(): the update skips it.
    assert sched.abort("r2")
    sched.update_after_step(out, {s.request_id: 7 for s in out.scheduled if s.needs_sample})
    assert sched.abort("r4") and sched.abort("r1") and sched.abort("r3")
    assert not sched.abort("r1")
    assert not sched.has_work
    assert sched.kv.num_free == (32, 16)
    sched.kv.check_integrity()
    assert sorted(sched.schedule().finished_ids) == ["r1", "r2", "r3", "r4"]


def test_abort_of_a_preempted_request():
    sched = _sched(full_blocks=4, sliding_blocks=4, max_num_batched_tokens=32)
    sched.add(_req("r1", list(range(8)), max_tokens=16))
    sched.add(_req("r2", list(range(50, 58)), max_tokens=16))
    while sched.get("r2").status is not RequestStatus.PREEMPTED:
        _step(sched)
    assert sched.abort("r2")
    assert sched.abort("r1")
    assert sched.kv.num_free == (4, 4)
    sched.kv.check_integrity()


def test_prefill_only_request_keeps_blocks_until_release():
    sched = _sched()
    sched.add(_req("r1", list(range(12)), prefill_only=True))
    out = _step(sched)
    assert _summary(out) == [("r1", 0, 12, True)]
    req = out.scheduled[0]
    assert not sched.has_work
    held = sched.kv.block_table(sched.get("r1"), FULL)
    assert held == req.block_tables[FULL] == [0, 1]
    assert sched.get("r1").status is RequestStatus.FINISHED_LENGTH
    assert sched.get("r1").output_token_ids == [_fake_token("r1", 12)]
    assert _step(sched).finished_ids == ["r1"]
    sched.release("r1")
    assert sched.get("r1") is None
    assert sched.kv.num_free == (32, 16)
    sched.kv.check_integrity()


def test_misuse_is_reported():
    sched = _sched()
    sched.add(_req("r1", list(range(5))))
    with pytest.raises(ValueError, match="already exists"):
        sched.add(_req("r1", [1]))
    with pytest.raises(ValueError, match="cannot fit"):
        sched.add(_req("big", list(range(300)), max_tokens=1))
    out = sched.schedule()
    with pytest.raises(ValueError, match="needed a sampled token"):
        sched.update_after_step(out, {})
    with pytest.raises(KeyError):
        sched.finish("nope")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(max_num_seqs=0, max_num_batched_tokens=8, block_size=8), "max_num_seqs"),
        (dict(max_num_seqs=4, max_num_batched_tokens=2, block_size=8), "max_num_batched_tokens"),
        (dict(max_num_seqs=1, max_num_batched_tokens=8, block_size=0), "block_size"),
        (
            dict(
                max_num_seqs=1,
                max_num_batched_tokens=8,
                block_size=8,
                long_prefill_token_threshold=0,
            ),
            "long_prefill_token_threshold",
        ),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**kwargs)


def test_block_size_must_match():
    kv = KVCacheManager(GROUPS, 16, (4, 4))
    with pytest.raises(ValueError, match="block_size"):
        Scheduler(SchedulerConfig(1, 8, 8), kv)


def test_preempted_request_goes_back_to_the_front_of_the_queue():
    sched = _sched(full_blocks=4, sliding_blocks=4, max_num_seqs=2, max_num_batched_tokens=32)
    sched.add(_req("r1", list(range(100, 108)), max_tokens=16))
    sched.add(_req("r2", list(range(200, 208)), max_tokens=16))
    sched.add(_req("r3", list(range(300, 308)), max_tokens=16))  # waits: max_num_seqs
    while not sched.get("r2").num_preemptions:
        _step(sched)
    assert [r.request_id for r in sched.waiting] == ["r2", "r3"]
