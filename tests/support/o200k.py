"""The real o200k vocabulary offline, for harmony tests against openai-harmony.

No network here, so the vocabulary comes from a package that ships it: `bpe-openai`
carries `o200k_base.tiktoken.gz`. Two things are built from it:

- a directory holding `o200k_base.tiktoken` (the name openai-harmony's loader joins to
  `$TIKTOKEN_ENCODINGS_BASE`, for o200k_harmony too; it checks the file's SHA-256), so
  `openai_harmony.load_harmony_encoding(HARMONY_GPT_OSS)` works offline;
- a tokenizer.json in the format of gpt-oss's own (byte-level BPE, o200k split regex,
  the harmony special tokens 199998..200018 as added tokens), converted from the ranks
  the way transformers' TikTokenConverter does, so our Tokenizer runs on the real
  vocabulary.
"""

from __future__ import annotations

import base64
import gzip
import importlib.resources
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from tandem.workers.synthetic.tokenizer_training import O200K_SPLIT_PATTERN

TIKTOKEN_FILE = "o200k_base.tiktoken"
# openai-harmony reads the vocabulary from this directory (it would download it otherwise).
ENCODINGS_BASE_VAR = "TIKTOKEN_ENCODINGS_BASE"
# o200k_harmony's named specials (GPT_OSS.md section 4); the gaps up to 200018 are
# <|reserved_N|>, and gpt-oss's tokenizer.json ends at 200018 (200,019 tokens).
HARMONY_SPECIALS = {
    199998: "<|startoftext|>",
    199999: "<|endoftext|>",
    200002: "<|return|>",
    200003: "<|constrain|>",
    200005: "<|channel|>",
    200006: "<|start|>",
    200007: "<|end|>",
    200008: "<|message|>",
    200012: "<|call|>",
    200018: "<|endofprompt|>",
}
FIRST_SPECIAL, LAST_SPECIAL = 199998, 200018


def unpack_o200k(directory: Path) -> Path:
    """Write `directory/o200k_base.tiktoken` from bpe-openai's copy; returns the directory."""
    packed = importlib.resources.files("bpe_openai") / "data" / f"{TIKTOKEN_FILE}.gz"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / TIKTOKEN_FILE).write_bytes(gzip.decompress(packed.read_bytes()))
    return directory


def load_ranks(tiktoken_file: Path) -> dict[bytes, int]:
    """The tiktoken file: one `base64(token bytes) rank` per line."""
    ranks = {}
    for line in tiktoken_file.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (the ByteLevel alphabet)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    kept += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for b in range(256):
        if b in kept:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def gpt_oss_tokenizer(ranks: dict[bytes, int]) -> tokenizers.Tokenizer:
    """A gpt-oss-format tokenizer over o200k ranks (ids 0..199997) plus the specials.

    Merges: for every token, each split into two tokens of the vocabulary, ordered by the
    rank of the merged token (then the ranks of the parts). With `ignore_merges` a piece
    that is itself a token is taken whole, as tiktoken does.
    """
    to_unicode = _byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(to_unicode[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    bpe = models.BPE(
        vocab=vocab,
        merges=[(text(left), text(right)) for *_, left, right in merges],
        ignore_merges=True,
    )
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(O200K_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    if len(ranks) != FIRST_SPECIAL:
        raise ValueError(f"expected {FIRST_SPECIAL} o200k ranks, got {len(ranks)}")
    specials = [
        HARMONY_SPECIALS.get(i, f"<|reserved_{i}|>") for i in range(FIRST_SPECIAL, LAST_SPECIAL + 1)
    ]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def build_o200k_fixture(directory: Path) -> tuple[Path, Path]:
    """(encodings dir for $TIKTOKEN_ENCODINGS_BASE, dir holding the gpt-oss tokenizer.json)."""
    encodings = unpack_o200k(directory / "encodings")
    tok_dir = directory / "gpt-oss-tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    gpt_oss_tokenizer(load_ranks(encodings / TIKTOKEN_FILE)).save(str(tok_dir / "tokenizer.json"))
    return encodings, tok_dir
