"""Sampled ids past the tokenizer: gpt-oss's unembedding has 201,088 rows, its
tokenizer.json 200,019 tokens, so the model can sample ids the tokenizer does not have.

The checkpoint here is padded the same way (64 rows past the tiny tokenizer) and its
unembedding rows for those ids are scaled up, so that about a third of the greedy
samples are padding ids. Every path that sees sampled ids (detokenizer, engine batch,
streaming, the harmony parser, `tandem generate --prompts-file`) must pass them through:
the id is returned, its text is empty. The independent reference for the ids is
transformers' GptOssForCausalLM on the same directory.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tandem.workers.engine.detokenizer import IncrementalDetokenizer
from tandem.workers.engine.llm_engine import EngineConfig, LLMEngine
from tandem.workers.engine.sampling_params import SamplingParams
from tandem.workers.synthetic.checkpoint_writer import write_random_checkpoint
from tandem.workers.synthetic.tiny_model import TINY_CONFIG
from tandem.workers.synthetic.tokenizer_training import save_tokenizer, train_tiny_tokenizer
from tandem.workers.text.harmony import HarmonyStreamParser
from tandem.workers.text.tokenizer import Tokenizer
from tests.support.hf_reference import hf_greedy

PADDING_ROWS = 64
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def padded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("padded-vocab")
    save_tokenizer(train_tiny_tokenizer(), out)
    tok = Tokenizer.from_dir(out)
    sp = tok.special
    config = replace(
        TINY_CONFIG,
        vocab_size=tok.vocab_size + PADDING_ROWS,
        eos_token_id=sp.return_,
        pad_token_id=sp.endoftext,
    )
    write_random_checkpoint(
        out,
        config,
        seed=0,
        generation_eos_ids=[sp.return_, sp.endoftext, sp.call],
        boost_ids_from=tok.vocab_size,
        boost=1.2,
    )
    return out


@pytest.fixture(scope="module")
def tok(padded_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(padded_dir)


@pytest.fixture(scope="module")
def engine(padded_dir: Path) -> LLMEngine:
    config = EngineConfig(device="cpu", dtype="float32", block_size=8, max_num_seqs=16)
    return LLMEngine.from_model_dir(padded_dir, config)


def prompts(vocab: int, n: int = 8, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(3, 30))] for _ in range(n)]


def test_tokenizer_gives_padding_ids_no_text(tok: Tokenizer) -> None:
    past = [tok.vocab_size, tok.vocab_size + PADDING_ROWS - 1, 10**9]
    for t in past:
        assert tok.token_bytes(t) == b""
        assert tok.is_special(t)
    text_ids = tok.encode("Hello, world")
    # The library's decode drops them too: the detokenizer's invariant still holds.
    assert tok.decode([past[0], *text_ids, past[1]]) == "Hello, world"
    detok = IncrementalDetokenizer(tok)
    assert [detok.push([t]) for t in past] == ["", "", ""]
    assert detok.push(text_ids) + detok.flush() == "Hello, world"
    with pytest.raises(ValueError, match="-1"):
        tok.token_bytes(-1)


def test_batched_greedy_samples_padding_ids_and_matches_transformers(
    padded_dir: Path, tok: Tokenizer, engine: LLMEngine
) -> None:
    batch = prompts(tok.vocab_size)
    outs = engine.generate(batch, GREEDY)
    sampled = [t for out in outs for t in out.token_ids]
    padding = [t for t in sampled if t >= tok.vocab_size]
    # The test is only worth something if the model did sample ids past the tokenizer,
    # and ordinary ones too (the boost must not drown the real vocabulary).
    assert len(padding) >= 16 and len(padding) < len(sampled) - 16, (len(padding), len(sampled))
    for out in outs:
        assert out.finish_reason == "length" and len(out.token_ids) == GREEDY.max_tokens
        assert out.text == tok.decode(out.token_ids)
    for i in (0, 3, 6):
        assert outs[i].token_ids == hf_greedy(padded_dir, batch[i], GREEDY.max_tokens), i


def test_streamed_and_sampled_requests_survive_padding_ids(
    tok: Tokenizer, engine: LLMEngine
) -> None:
    [prompt] = prompts(tok.vocab_size, n=1, seed=3)
    deltas = list(engine.stream(prompt, GREEDY))
    ids = [t for d in deltas for t in d.token_ids]
    assert any(t >= tok.vocab_size for t in ids)
    assert "".join(d.text_delta for d in deltas) == tok.decode(ids)
    # Random sampling over the whole padded vocabulary, many requests in one batch.
    seeded = [SamplingParams(temperature=1.0, seed=s, max_tokens=24) for s in range(12)]
    outs = engine.generate(prompts(tok.vocab_size, n=12, seed=4), seeded)
    assert any(t >= tok.vocab_size for out in outs for t in out.token_ids)
    assert all(out.finish_reason in ("length", "stop") for out in outs)


def test_harmony_parser_passes_over_padding_ids(tok: Tokenizer) -> None:
    sp = tok.special

    def events(ids: list[int]) -> list:
        parser = HarmonyStreamParser(tok)
        return [e for t in ids for e in parser.feed(t)] + parser.finish()

    clean = (
        [sp.channel, *tok.encode("analysis"), sp.message, *tok.encode("Let me think."), sp.end]
        + [sp.start, *tok.encode("assistant"), sp.channel, *tok.encode("final"), sp.message]
        + [*tok.encode("The answer is 4."), sp.return_]
    )
    pad = tok.vocab_size + 7
    # A padding id inside each header, inside content and between messages.
    noisy = []
    for i, t in enumerate(clean):
        noisy.append(t)
        if i % 3 == 0:
            noisy.append(pad)
    got = events(noisy)
    assert got == events(clean)
    messages = [e.message for e in got if type(e).__name__ == "MessageEnd"]
    assert [(m.channel, m.content) for m in messages] == [
        ("analysis", "Let me think."),
        ("final", "The answer is 4."),
    ]


def test_generate_cli_batch_with_padding_ids(
    padded_dir: Path, tok: Tokenizer, engine: LLMEngine, tmp_path: Path
) -> None:
    batch = prompts(tok.vocab_size, n=6, seed=5)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join(",".join(map(str, p)) for p in batch) + "\n")
    run = subprocess.run(
        [sys.executable, "-m", "tandem.cluster.cli", "generate", "--model", str(padded_dir)]
        + ["--prompts-file", str(ids_file), "--ids", "--max-tokens", "16"]
        + ["--temperature", "0", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    expected = engine.generate(batch, SamplingParams(temperature=0.0, max_tokens=16))
    assert [line["token_ids"] for line in lines] == [c.token_ids for c in expected]
    assert [line["text"] for line in lines] == [c.text for c in expected]
    assert any(t >= tok.vocab_size for line in lines for t in line["token_ids"])
