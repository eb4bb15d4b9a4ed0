"""A tiny gpt-oss-like tokenizer trained locally, for the embedded test model.

The real o200k_harmony tokenizer cannot be downloaded on our machines, so the tiny
model ships a byte-level BPE of about 1k tokens trained here, in under a second, on a
corpus generated in code. It has the same shape as the real one:

  ids [0, vocab_size)          BPE vocabulary (256 byte tokens + merges), o200k split regex
  ids [vocab_size, ...)        special tokens laid out like o200k_harmony's 199998..:
                               <|startoftext|> <|endoftext|> <|reserved_*|> x2 <|return|>
                               <|constrain|> <|reserved_*|> <|channel|> <|start|> <|end|>
                               <|message|> <|reserved_*|> x3 <|call|> <|reserved_*|> x5
                               <|endofprompt|>, then <|reserved_N|> up to a multiple of 64

The corpus mixes English sentences, code and multilingual text with multi-byte UTF-8
(é, 日本, emoji); with so few merges many of those characters stay split across byte
tokens, which is what exercises the streaming UTF-8 handling.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from tandem.workers.text.tokenizer import TOKENIZER_FILE

# o200k_base's pre-tokenization regex (also o200k_harmony's).
O200K_SPLIT_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

# Offsets of the named specials after the BPE vocab, mirroring 199998 + offset in
# o200k_harmony; the gaps are <|reserved_{id}|>.
_SPECIAL_LAYOUT: dict[int, str] = {
    0: "<|startoftext|>",
    1: "<|endoftext|>",
    4: "<|return|>",
    5: "<|constrain|>",
    7: "<|channel|>",
    8: "<|start|>",
    9: "<|end|>",
    10: "<|message|>",
    14: "<|call|>",
    20: "<|endofprompt|>",
}
# The whole vocabulary (BPE + specials) is padded with reserved tokens to this multiple,
# as o200k_harmony is (201088 = 64 * 3142).
_VOCAB_MULTIPLE = 64

_SUBJECTS = [
    "The model",
    "A small cat",
    "The engineer",
    "Our cluster",
    "The scheduler",
    "She",
    "The old library",
    "Every request",
    "The router",
    "A quiet river",
    "He",
    "The team",
]
_VERBS = [
    "reads",
    "writes",
    "moves",
    "caches",
    "finds",
    "returns",
    "builds",
    "streams",
    "explains",
    "measures",
    "routes",
    "answers",
]
_OBJECTS = [
    "the tokens",
    "a long prompt",
    "the answer",
    "every block",
    "the weather report",
    "a simple question",
    "the final message",
    "its own notes",
    "the key-value cache",
    "three experts",
    "the user's request",
    "a JSON object",
]
_TAILS = [
    "before noon.",
    "in the morning.",
    "without any delay.",
    "and then stops.",
    "because it must.",
    "with great care!",
    "— quickly.",
    "again and again?",
    "on the GPU.",
    "for the user.",
]
_CHAT_WORDS = [
    "system",
    "developer",
    "user",
    "assistant",
    "analysis",
    "commentary",
    "final",
    "functions",
    "json",
    "Reasoning: low",
    "Reasoning: medium",
    "Reasoning: high",
    "Knowledge cutoff: 2024-06",
    "Current date: 2025-06-28",
    "# Instructions",
    "# Tools",
    "## functions",
    "namespace functions {",
    "} // namespace functions",
    "# Valid channels: analysis, commentary, final.",
    "Channel must be included for every message.",
    "You are ChatGPT, a large language model trained by OpenAI.",
    "to=functions.get_weather",
    '{"location": "Paris", "unit": "celsius"}',
    "type get_weather = (_: {",
    "location: string,",
    "}) => any;",
]
_CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * 2)\n",
    'if x is None:\n    raise ValueError("x must be set")\n',
    "class Block:\n    def __init__(self, size: int) -> None:\n        self.size = size\n",
    "const total = items.reduce((a, b) => a + b, 0);\n",
    'fn main() {\n    println!("hello, world");\n}\n',
    "SELECT id, name FROM users WHERE age > 30;\n",
    'x = [1, 2, 3]; y = {"a": 1, "b": 2}\n',
]
_MULTILINGUAL = [
    "Le café est très bon à Paris, dit l'élève.",
    "Die Größe des Modells ist überraschend klein.",
    "El niño come una manzana. ¿Dónde está la estación?",
    "日本語のテキストも少し含めます。東京は日本の首都です。",
    "我们今天学习中文。北京很大。",
    "Привет, как дела? Всё хорошо.",
    "Καλημέρα κόσμε.",
    "مرحبا بالعالم",
    "한국어 문장도 있습니다.",
    "Emoji time 🙂 🚀 🎉 👍 — naïve façade, coöperate, résumé.",
]


def _build_corpus(seed: int) -> list[str]:
    """About 200 KB of text, the same for the same seed."""
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(2500):
        sentence = " ".join(
            [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_TAILS)]
        )
        if rng.random() < 0.2:
            sentence += f" It took {rng.randint(0, 9999)} ms and {rng.random():.3f} of the budget."
        lines.append(sentence)
    for _ in range(500):
        lines.append(rng.choice(_CHAT_WORDS) + "\n" + rng.choice(_CHAT_WORDS))
    for _ in range(300):
        lines.append(rng.choice(_CODE))
    for _ in range(400):
        lines.append(rng.choice(_MULTILINGUAL))
    rng.shuffle(lines)
    return lines


def _special_tokens(bpe_vocab_size: int) -> list[str]:
    """The special-token strings in id order, starting right after the BPE vocab."""
    count = max(_SPECIAL_LAYOUT) + 1
    total = bpe_vocab_size + count
    total += -total % _VOCAB_MULTIPLE
    return [
        _SPECIAL_LAYOUT.get(i, f"<|reserved_{bpe_vocab_size + i}|>")
        for i in range(total - bpe_vocab_size)
    ]


def train_tiny_tokenizer(vocab_size: int = 1024, seed: int = 0) -> tokenizers.Tokenizer:
    """Train a byte-level BPE of exactly `vocab_size` tokens, then add the specials.

    Deterministic: the same arguments give a byte-identical `to_str()`.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size must exceed the 256 byte tokens, got {vocab_size}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(O200K_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_build_corpus(seed), trainer=trainer)
    got = tok.get_vocab_size(with_added_tokens=False)
    if got != vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size}: the built-in corpus only supports {got} BPE tokens"
        )
    specials = [
        tokenizers.AddedToken(s, special=True, normalized=False) for s in _special_tokens(got)
    ]
    tok.add_special_tokens(specials)
    return tok


def save_tokenizer(tok: tokenizers.Tokenizer, directory: str | os.PathLike) -> Path:
    """Write tokenizer.json and tokenizer_config.json (as the gpt-oss repo ships them)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    path = out / TOKENIZER_FILE
    tok.save(str(path), pretty=True)
    added = tok.get_added_tokens_decoder()
    config = {
        "added_tokens_decoder": {
            str(idx): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for idx, t in sorted(added.items())
        },
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|return|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path
