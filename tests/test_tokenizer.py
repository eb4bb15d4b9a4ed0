"""Tokenizer, incremental detokenizer, stop strings and the tiny tokenizer trainer.

References are independent of the code under test: the `tokenizers` library's own
encode/decode, Python's UTF-8 codec, and str.find for stop strings.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers

from tandem.workers.engine.detokenizer import IncrementalDetokenizer, StopCheck, StopStringMatcher
from tandem.workers.synthetic.tokenizer_training import save_tokenizer, train_tiny_tokenizer
from tandem.workers.text.tokenizer import HARMONY_SPECIAL_STRINGS, Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
MULTILINGUAL = "Le café, naïve résumé. 日本語と東京。Привет! Emoji 🙂🚀🎉👍 done."


@pytest.fixture(scope="module")
def trained() -> tokenizers.Tokenizer:
    return train_tiny_tokenizer(vocab_size=1024, seed=0)


@pytest.fixture(scope="module")
def tok_dir(trained: tokenizers.Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(trained, out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


# ---- loading and special tokens -------------------------------------------------------


def test_special_ids_come_from_the_file(tok: Tokenizer, tok_dir: Path) -> None:
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    by_text = {t["content"]: t["id"] for t in spec["added_tokens"]}
    for field, text in HARMONY_SPECIAL_STRINGS.items():
        assert getattr(tok.special, field) == by_text[text]
    # The o200k_harmony layout, shifted to start right after the 1024 BPE tokens.
    assert tok.special.startoftext == 1024
    assert tok.special.endoftext == 1025
    assert tok.special.return_ == 1028
    assert tok.special.constrain == 1029
    assert tok.special.channel == 1031
    assert tok.special.start == 1032
    assert tok.special.end == 1033
    assert tok.special.message == 1034
    assert tok.special.call == 1038
    assert tok.special.endofprompt == 1044
    assert tok.vocab_size == 1088
    assert tok.decode([1026]) == "<|reserved_1026|>"
    assert tok.special_ids == frozenset(range(1024, 1088))


def test_special_lookup(tok: Tokenizer) -> None:
    assert tok.encode_special("start") == tok.special.start
    assert tok.encode_special("return") == tok.special.return_
    assert tok.special_id("<|call|>") == tok.special.call
    assert tok.is_special(tok.special.end)
    assert not tok.is_special(tok.encode("hello")[0])
    with pytest.raises(ValueError, match="not a special token"):
        tok.special_id("<|nope|>")


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_dir(tmp_path)


def test_malformed_file_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_missing_specials_are_listed(tok_dir: Path, tmp_path: Path) -> None:
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    spec["added_tokens"] = [
        t for t in spec["added_tokens"] if t["content"] not in ("<|call|>", "<|constrain|>")
    ]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"\['<\|constrain\|>', '<\|call\|>'\]"):
        Tokenizer.from_dir(tmp_path)


# ---- encode / decode ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Hello, world!",
        "  leading and trailing spaces  \n\n\ttabs",
        "def f(x):\n    return x * 2  # code\n",
        MULTILINGUAL,
        "numbers 1234567890 and 3.14159",
    ],
)
def test_round_trip_matches_library(
    tok: Tokenizer, trained: tokenizers.Tokenizer, text: str
) -> None:
    ids = tok.encode(text)
    # No special strings in the text: the library's own encode is the reference.
    assert ids == trained.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text


def test_user_text_never_yields_special_tokens(
    tok: Tokenizer, trained: tokenizers.Tokenizer
) -> None:
    every_special = [tok.decode([i]) for i in sorted(tok.special_ids)]
    text = "user says " + " and ".join(every_special) + "<|start|><|message|>x<|end|>"
    ids = tok.encode(text)
    assert not [i for i in ids if tok.is_special(i)]
    assert tok.decode(ids) == text
    # The library alone would have produced control tokens: the test can fail.
    raw = trained.encode(text, add_special_tokens=False).ids
    assert tok.special.start in raw and tok.special.message in raw


def test_token_bytes_agree_with_library_decode(tok: Tokenizer) -> None:
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 12))]
        data = b"".join(tok.token_bytes(i) for i in ids)
        assert data.decode("utf-8", errors="replace") == tok.decode(ids)


# ---- incremental detokenizer ----------------------------------------------------------


def test_detokenizer_never_splits_a_character(tok: Tokenizer) -> None:
    ids = tok.encode(MULTILINGUAL)
    # The vocab is tiny, so some token must end mid-character (else this test is moot).
    partial = [i for i in ids if not _is_utf8(tok.token_bytes(i))]
    assert partial, "expected tokens that end inside a UTF-8 character"
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push([i]) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == tok.decode(ids) == MULTILINGUAL


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_detokenizer_random_chunks_equal_full_decode(tok: Tokenizer) -> None:
    rng = random.Random(2)
    for _ in range(100):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 30))]
        detok = IncrementalDetokenizer(tok)
        out, pos = [], 0
        while pos < len(ids):
            step = rng.randint(1, 4)
            out.append(detok.push(ids[pos : pos + step]))
            pos += step
        assert "".join(out) + detok.flush() == tok.decode(ids)


def test_detokenizer_skip_special_tokens(tok: Tokenizer) -> None:
    ids = [tok.special.start, *tok.encode("hi é"), tok.special.end]
    kept = IncrementalDetokenizer(tok)
    assert "".join(kept.push([i]) for i in ids) + kept.flush() == "<|start|>hi é<|end|>"
    skipped = IncrementalDetokenizer(tok, skip_special_tokens=True)
    text = "".join(skipped.push([i]) for i in ids) + skipped.flush()
    assert text == tok.decode(ids, skip_special_tokens=True) == "hi é"


def test_detokenizer_flush_replaces_unfinished_character(tok: Tokenizer) -> None:
    ids = tok.encode("🙂")
    detok = IncrementalDetokenizer(tok)
    assert detok.push(ids[:-1]) == ""
    assert detok.flush() == tok.decode(ids[:-1])
    assert "\ufffd" in tok.decode(ids[:-1])


# ---- stop strings ---------------------------------------------------------------------


def test_stop_string_across_deltas() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.feed("hello S") == StopCheck("hello ", None)
    assert m.feed("T") == StopCheck("", None)
    assert m.feed("OP and more") == StopCheck("", "STOP")
    assert m.stopped == "STOP"
    assert m.feed("later") == StopCheck("", "STOP")
    assert m.flush() == ""


def test_stop_string_false_start_is_released() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.feed("a ST") == StopCheck("a ", None)
    assert m.feed("Ay") == StopCheck("STAy", None)
    assert m.feed("ST") == StopCheck("", None)
    assert m.flush() == "ST"


def test_earliest_stop_wins() -> None:
    m = StopStringMatcher(["world", "lo w"])
    assert m.feed("hello world") == StopCheck("hel", "lo w")


def test_stop_matcher_against_reference() -> None:
    rng = random.Random(3)
    for _ in range(300):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 4))) for _ in range(2)]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 20)))
        hits = [(text.find(s), s) for s in stops if s in text]
        first = min(hits, key=lambda h: h[0]) if hits else None
        expected = text[: first[0]] if first else text
        m = StopStringMatcher(stops)
        emitted, pos, stop = "", 0, None
        while pos < len(text) and stop is None:
            step = rng.randint(1, 3)
            check = m.feed(text[pos : pos + step])
            emitted += check.text
            stop = check.stop
            pos += step
            # Emitted text is final: it is always a prefix of the true output.
            assert expected.startswith(emitted)
        if stop is None:
            emitted += m.flush()
        assert emitted == expected
        assert (stop is not None) == (first is not None)
        if first:
            assert text.find(stop) == first[0]


def test_stop_matcher_rejects_empty() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])
    with pytest.raises(ValueError, match="not one string"):
        StopStringMatcher("STOP")


# ---- trainer --------------------------------------------------------------------------


def test_trainer_is_deterministic(trained: tokenizers.Tokenizer, tmp_path: Path) -> None:
    again = train_tiny_tokenizer(vocab_size=1024, seed=0)
    assert again.to_str() == trained.to_str()
    save_tokenizer(trained, tmp_path / "a")
    save_tokenizer(again, tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert train_tiny_tokenizer(vocab_size=1024, seed=1).to_str() != trained.to_str()


def test_trainer_is_deterministic_across_processes(trained: tokenizers.Tokenizer) -> None:
    # A fresh interpreter has a different hash seed: catches set/dict-order dependence.
    code = (
        "import hashlib\n"
        "from tandem.workers.synthetic.tokenizer_training import train_tiny_tokenizer\n"
        "print(hashlib.sha256(train_tiny_tokenizer().to_str().encode()).hexdigest())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == hashlib.sha256(trained.to_str().encode()).hexdigest()


def test_trainer_shape(trained: tokenizers.Tokenizer, tok_dir: Path) -> None:
    assert trained.get_vocab_size(with_added_tokens=False) == 1024
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "BPE"
    assert [p["type"] for p in spec["pre_tokenizer"]["pretokenizers"]] == ["Split", "ByteLevel"]
    assert all(t["special"] for t in spec["added_tokens"])
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|return|>"
    assert config["added_tokens_decoder"]["1032"]["content"] == "<|start|>"
    # o200k splitting: digits in groups of three, a case change starts a new piece.
    pieces = [p for p, _ in trained.pre_tokenizer.pre_tokenize_str("12345 CamelCase")]
    assert pieces == ["123", "45", "ĠCamel", "Case"]


def test_trainer_small_vocab(tmp_path: Path) -> None:
    small = train_tiny_tokenizer(vocab_size=300, seed=0)
    assert small.get_vocab_size(with_added_tokens=False) == 300
    save_tokenizer(small, tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.special.startoftext == 300
    assert tok.vocab_size % 64 == 0
    with pytest.raises(ValueError, match="vocab_size"):
        train_tiny_tokenizer(vocab_size=256)
