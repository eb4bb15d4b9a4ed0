"""The gpt-oss tokenizer (o200k_harmony) over the `tokenizers` library.

Loads the checkpoint's `tokenizer.json` (byte-level BPE plus added special tokens) and
adds the two things serving needs beyond `tokenizers.Tokenizer`:

- `encode(text)` never produces a special token. The library matches added tokens
  anywhere in the input, so a user typing "<|start|>" would inject a control token into
  the prompt. We keep a second `tokenizers.Tokenizer` built from the same JSON with the
  special added tokens removed; it sees "<|start|>" as ordinary text.
- `token_bytes(id)`: the exact bytes of one token. Byte-level BPE tokens can end in the
  middle of a UTF-8 character, so streaming decode works on bytes (see detokenizer.py).

Special-token ids are read from the file's added tokens, never hard-coded: the real
checkpoint has <|start|> = 200006, the tiny test tokenizer has it near 1030.

Ids past the file's last token: gpt-oss's embedding and unembedding have 201,088 rows,
its tokenizer.json 200,019 tokens, so the model can sample ids the file does not list
(o200k_harmony calls them <|reserved_200019|> .. <|reserved_201087|>). They are treated
as special tokens with no text: `token_bytes` gives b"", `decode` (like the library's)
drops them, `is_special` is True, so streaming and harmony parsing pass over them and the
id itself still reaches the client. Only a negative id is an error.

OpenAI's `original/` layout: the model repository keeps tokenizer.json in the parent of
`original/`, so `from_dir(".../original")` looks there when the directory has none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

import tokenizers

TOKENIZER_FILE = "tokenizer.json"
# The directory name of OpenAI's layout inside a model repository (see from_dir).
ORIGINAL_DIR = "original"

# SpecialTokens field -> the token's text. `return_` because `return` is a keyword.
HARMONY_SPECIAL_STRINGS: dict[str, str] = {
    "start": "<|start|>",
    "end": "<|end|>",
    "message": "<|message|>",
    "channel": "<|channel|>",
    "constrain": "<|constrain|>",
    "return_": "<|return|>",
    "call": "<|call|>",
    "endoftext": "<|endoftext|>",
    "startoftext": "<|startoftext|>",
    "endofprompt": "<|endofprompt|>",
}


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the harmony control tokens, as found in one tokenizer.json."""

    start: int
    # <|start|>: opens a message header.
    end: int
    # <|end|>: closes a finished message (also separates analysis from final).
    message: int
    # <|message|>: ends the header, content follows.
    channel: int
    # <|channel|>: the channel name follows in the header.
    constrain: int
    # <|constrain|>: the content type (for example `json`) follows in the header.
    return_: int
    # <|return|>: the assistant is done; a chat stop token.
    call: int
    # <|call|>: ends a tool call; a chat stop token.
    endoftext: int
    # <|endoftext|>: document end; the pad token.
    startoftext: int
    # <|startoftext|>: document start.
    endofprompt: int
    # <|endofprompt|>: o200k's prompt terminator (unused by harmony).

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"SpecialTokens.{f.name} must be a non-negative int, got {value!r}"
                )
        ids = [getattr(self, f.name) for f in fields(self)]
        if len(set(ids)) != len(ids):
            raise ValueError(f"SpecialTokens: ids must be distinct, got {ids}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by the ByteLevel pre-tokenizer.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to code points
    256.. in byte order, so every byte has a visible, whitespace-free stand-in.
    """
    kept = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in kept:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in _bytes_to_unicode().items()}


class Tokenizer:
    """A byte-level BPE tokenizer with harmony special tokens."""

    def __init__(self, tokenizer_json: str, source: str = "<memory>") -> None:
        """Build from the text of a tokenizer.json; `source` names it in errors."""
        try:
            spec = json.loads(tokenizer_json)
            self._full = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as exc:  # json and tokenizers raise unrelated types
            raise ValueError(f"{source}: not a valid tokenizer.json ({exc})") from exc
        if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
            raise ValueError(f"{source}: tokenizer.json has no 'model' object")
        decoder = spec.get("decoder") or {}
        if spec["model"].get("type") != "BPE" or decoder.get("type") != "ByteLevel":
            raise ValueError(
                f"{source}: expected a byte-level BPE tokenizer (model BPE, decoder "
                f"ByteLevel), got model {spec['model'].get('type')!r}, "
                f"decoder {decoder.get('type')!r}"
            )
        self.source = source

        added = spec.get("added_tokens") or []
        self._special_by_text: dict[str, int] = {
            t["content"]: int(t["id"]) for t in added if t.get("special")
        }
        self._special_ids = frozenset(self._special_by_text.values())
        self.special = self._find_harmony_specials(source)

        # The same pipeline without the special added tokens: it cannot emit them.
        plain_spec = dict(spec)
        plain_spec["added_tokens"] = [t for t in added if not t.get("special")]
        self._plain = tokenizers.Tokenizer.from_str(json.dumps(plain_spec))

        self._token_bytes = self._build_byte_table(added, source)

    @classmethod
    def from_dir(cls, checkpoint_dir: str | os.PathLike) -> Tokenizer:
        """Load `checkpoint_dir/tokenizer.json`; for an `original/` directory without one,
        the repository's copy beside it (`checkpoint_dir/../tokenizer.json`)."""
        root = Path(checkpoint_dir)
        tried = [root / TOKENIZER_FILE]
        if root.name == ORIGINAL_DIR:
            tried.append(root.parent / TOKENIZER_FILE)
        for path in tried:
            if path.is_file():
                return cls(path.read_text(encoding="utf-8"), source=str(path))
        raise FileNotFoundError("tokenizer file not found: " + " or ".join(str(p) for p in tried))

    @classmethod
    def from_tokenizers(cls, tok: tokenizers.Tokenizer) -> Tokenizer:
        """Wrap an in-memory `tokenizers.Tokenizer` (for example a freshly trained one)."""
        return cls(tok.to_str(), source="<in-memory tokenizers.Tokenizer>")

    def _find_harmony_specials(self, source: str) -> SpecialTokens:
        missing = [s for s in HARMONY_SPECIAL_STRINGS.values() if s not in self._special_by_text]
        if missing:
            raise ValueError(
                f"{source}: tokenizer.json lacks the harmony special tokens {missing} "
                "(they must be added tokens with special=true)"
            )
        return SpecialTokens(
            **{name: self._special_by_text[text] for name, text in HARMONY_SPECIAL_STRINGS.items()}
        )

    def _build_byte_table(self, added: list[dict], source: str) -> list[bytes]:
        """id -> the bytes that token stands for.

        Model vocab entries are strings over the ByteLevel alphabet (one character per
        byte); added tokens stand for their UTF-8 text.
        """
        vocab = self._full.get_vocab(with_added_tokens=False)
        size = max([*vocab.values(), *(int(t["id"]) for t in added)]) + 1
        table = [b""] * size
        for piece, idx in vocab.items():
            try:
                table[idx] = bytes(_UNICODE_TO_BYTE[c] for c in piece)
            except KeyError as exc:
                raise ValueError(
                    f"{source}: vocab entry {piece!r} (id {idx}) is not in the ByteLevel alphabet"
                ) from exc
        for t in added:
            table[int(t["id"])] = t["content"].encode("utf-8")
        return table

    @property
    def vocab_size(self) -> int:
        """One past the largest token id (BPE vocab plus added tokens)."""
        return len(self._token_bytes)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of every special added token (harmony ones and <|reserved_N|>)."""
        return self._special_ids

    def encode(self, text: str) -> list[int]:
        """Encode user text; special-token strings in it become ordinary text tokens."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_special(self, name: str) -> int:
        """Id of the special token `<|name|>`, for example encode_special("start")."""
        return self.special_id(f"<|{name}|>")

    def special_id(self, text: str) -> int:
        """Id of the special token whose text is exactly `text`, e.g. "<|call|>"."""
        try:
            return self._special_by_text[text]
        except KeyError:
            raise ValueError(f"{self.source}: {text!r} is not a special token") from None

    def is_special(self, token_id: int) -> bool:
        """A special added token, or an id past the file's last token (a padding row of the
        model's vocabulary: a reserved control token that carries no text)."""
        return token_id in self._special_ids or token_id >= len(self._token_bytes)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for (a special token: its text; an id past the
        file's last token: b"", see the module docstring)."""
        if token_id < 0:
            raise ValueError(f"token id {token_id} is negative")
        if token_id >= len(self._token_bytes):
            return b""
        return self._token_bytes[token_id]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Decode ids to text; invalid UTF-8 (a cut-off character) becomes U+FFFD; ids past
        the file's last token have no text (the library drops them too)."""
        return self._full.decode(list(ids), skip_special_tokens=skip_special_tokens)
