"""Warm-up leaves the collector's full passes off the serving path (CPU, tiny checkpoint)."""

from __future__ import annotations

import gc

from tandem.workers.engine.llm_engine import EngineConfig, LLMEngine
from tandem.workers.engine.sampling_params import SamplingParams


def test_warm_up_freezes_the_heap_and_spaces_full_collections(tiny_model_dir):
    threshold = gc.get_threshold()
    try:
        gc.unfreeze()
        config = EngineConfig(
            device="cpu",
            dtype="float32",
            block_size=8,
            kv_cache_tokens=1024,
            max_num_seqs=4,
            max_num_batched_tokens=32,
            warm_up=True,
        )
        engine = LLMEngine.from_model_dir(tiny_model_dir, config)
        # What lived at ready (the model's parameters among it) is out of every pass.
        assert gc.get_freeze_count() > 0
        tracked = {id(o) for o in gc.get_objects()}
        assert not any(id(p) in tracked for p in engine.runner.model.parameters())
        assert gc.get_threshold() == (threshold[0], threshold[1], 1000)
        # The engine still serves after it.
        done = engine.generate(
            [[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        )
        assert len(done[0].token_ids) == 4
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
