"""The workload generators shared by bench/router_sim.py and the load test: seeded,
shaped as documented, validated."""

from __future__ import annotations

from collections import Counter

import pytest

from tandem.cluster.workloads import (
    AgenticWorkload,
    ChatWorkload,
    NoReuseWorkload,
    RagWorkload,
    make_workload,
    synthetic_answer,
)


def test_same_seed_same_sessions_other_seed_other_sessions():
    for name in ("chat", "agentic", "rag", "no_reuse"):
        a = make_workload(name, seed=3).sessions(60.0)
        assert a == make_workload(name, seed=3).sessions(60.0)
        assert a != make_workload(name, seed=4).sessions(60.0)
        assert all(0 <= s.start_s < 60.0 for s in a)
        assert [s.start_s for s in a] == sorted(s.start_s for s in a)


def test_chat_turns_extend_the_conversation_behind_one_system_prompt():
    w = ChatWorkload(seed=1, session_rate=2.0, system_tokens=64, turns=(2, 4))
    sessions = w.sessions(30.0)
    assert len({s.prefix for s in sessions}) == 1 and len(sessions[0].prefix) == 64
    for s in sessions:
        assert 2 <= len(s.steps) <= 4 and s.keep_history
        assert s.steps[0].think_s == 0.0
        assert all(3.0 <= st.think_s <= 15.0 for st in s.steps[1:])
        history: tuple[int, ...] = ()
        for k, step in enumerate(s.steps):
            prompt = s.prompt(k, history)
            assert prompt[: len(history)] == history
            assert prompt[-len(step.new_tokens) :] == step.new_tokens
            history = prompt + synthetic_answer(s.session_id, k, step.output_tokens, 100)
        assert all(0 <= t < w.vocab_size for t in s.prefix)


def test_agents_share_their_tenant_prefix():
    w = AgenticWorkload(seed=2, session_rate=1.0, tenants=3, tools_tokens=128)
    sessions = w.sessions(60.0)
    prefixes = Counter(s.prefix for s in sessions)
    assert len(prefixes) == 3 and all(len(p) == 128 for p in prefixes)


def test_rag_questions_hit_zipf_popular_documents():
    w = RagWorkload(
        seed=5,
        session_rate=20.0,
        tenants=1,
        documents_per_tenant=32,
        document_tokens=(10, 20),
        system_tokens=4,
    )
    sessions = w.sessions(100.0)
    docs = Counter(s.prefix for s in sessions)
    ranked = [n for _, n in docs.most_common()]
    # ~2,000 sessions over 32 documents with P(rank k) ~ 1/k^1.1: the top document
    # takes ~22%, far above a uniform 3%.
    assert ranked[0] > 0.15 * len(sessions) and len(docs) > 16
    # Later questions do not carry the earlier ones: document + this question only.
    s = next(s for s in sessions if len(s.steps) > 1)
    assert not s.keep_history
    assert s.prompt(1, (1, 2, 3)) == s.prefix + s.steps[1].new_tokens


def test_no_reuse_prompts_share_no_first_block():
    sessions = NoReuseWorkload(seed=0, session_rate=50.0).sessions(10.0)
    firsts = {s.prompt(0)[:16] for s in sessions}
    assert len(firsts) == len(sessions) > 100


def test_bad_fields_are_named():
    with pytest.raises(ValueError, match="ChatWorkload.turns"):
        ChatWorkload(turns=(3, 2))
    with pytest.raises(ValueError, match="session_rate"):
        RagWorkload(session_rate=0.0)
    with pytest.raises(ValueError, match="AgenticWorkload.tenants"):
        AgenticWorkload(tenants=0)
    with pytest.raises(ValueError, match="workload must be one of"):
        make_workload("bursty")
    with pytest.raises(ValueError, match="duration_s"):
        ChatWorkload().sessions(0.0)
