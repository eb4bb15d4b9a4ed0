"""The embedded default model: a tiny gpt-oss-architecture checkpoint made locally.

`make_tiny_model(dir)` writes a real Hugging Face layout checkpoint (config.json,
generation_config.json, model.safetensors with MXFP4 experts, tokenizer.json) that
every command uses when no `--model` is given. It is deterministic from a seed, a few
MB, and its sliding window (16) is shorter than typical prompts, so the sliding-window
paths run on every test. Random weights: the text it generates is noise, but every
code path of a real checkpoint is exercised.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from tandem.workers.model.config import GptOssConfig, YarnScaling
from tandem.workers.synthetic.checkpoint_writer import write_random_checkpoint
from tandem.workers.synthetic.tokenizer_training import save_tokenizer, train_tiny_tokenizer
from tandem.workers.text.tokenizer import Tokenizer

# Bump when the recipe changes, so a cached copy of an older recipe is not reused.
TINY_MODEL_VERSION = 1
TINY_BPE_VOCAB = 1024

TINY_CONFIG = GptOssConfig(
    vocab_size=TINY_BPE_VOCAB,  # replaced by the trained tokenizer's size
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=6,
    num_experts_per_tok=2,
    sliding_window=16,
    layer_types=("sliding_attention", "full_attention") * 2,
    rope_theta=150000.0,
    rope_scaling=YarnScaling(
        factor=32.0,
        beta_fast=32.0,
        beta_slow=1.0,
        original_max_position_embeddings=4096,
        truncate=False,
    ),
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    swiglu_limit=7.0,
    attention_bias=True,
    eos_token_id=0,  # replaced by the tokenizer's <|return|> id
    pad_token_id=0,  # replaced by the tokenizer's <|endoftext|> id
    tie_word_embeddings=False,
)


def make_tiny_model(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny checkpoint into `directory` (created; must be empty or absent)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"make-tiny-model: {out} is not empty")
    tok = train_tiny_tokenizer(vocab_size=TINY_BPE_VOCAB, seed=seed)
    save_tokenizer(tok, out)
    tokenizer = Tokenizer.from_dir(out)
    special = tokenizer.special
    config = replace(
        TINY_CONFIG,
        vocab_size=tokenizer.vocab_size,
        eos_token_id=special.return_,
        pad_token_id=special.endoftext,
    )
    # The same stop list as gpt-oss's generation_config: <|return|>, <|endoftext|>, <|call|>.
    eos_ids = [special.return_, special.endoftext, special.call]
    write_random_checkpoint(out, config, seed, layout="hf", generation_eos_ids=eos_ids)
    (out / "tandem_tiny.json").write_text(
        json.dumps({"version": TINY_MODEL_VERSION, "seed": seed}, indent=2) + "\n"
    )
    return out


def default_model_dir() -> Path:
    """The embedded default model, created on first use in the cache directory.

    The cache lives in $TANDEM_CACHE_DIR, else $XDG_CACHE_HOME/tandem, else
    ~/.cache/tandem. It is written to a temporary sibling and renamed into place, so
    concurrent first uses (several workers starting at once) never see half a model.
    """
    root = os.environ.get("TANDEM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tandem"
    )
    final = Path(root) / f"tiny-gpt-oss-v{TINY_MODEL_VERSION}"
    if (final / "tandem_tiny.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    try:
        make_tiny_model(staging)
        try:
            staging.rename(final)
        except OSError:
            if not (final / "tandem_tiny.json").exists():
                raise
            # Another process won the race; its copy is identical (same seed).
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def resolve_model_dir(model: str | os.PathLike | None) -> Path:
    """`--model` as given, or the embedded default when none is."""
    if model is None:
        return default_model_dir()
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"--model: {path} is not a directory")
    return path
