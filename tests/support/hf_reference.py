"""transformers' GptOssForCausalLM as the independent reference, for tests only.

On CPU transformers dequantises the MXFP4 experts with its own code
(`Mxfp4Config(dequantize=True)`), so nothing of ours is involved in its numbers.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import DynamicCache, GptOssForCausalLM, Mxfp4Config


@functools.lru_cache(maxsize=4)
def load_transformers(path: str | Path) -> GptOssForCausalLM:
    model = GptOssForCausalLM.from_pretrained(
        str(path),
        dtype=torch.float32,
        quantization_config=Mxfp4Config(dequantize=True),
        attn_implementation="eager",
    )
    # Some transformers versions (5.17) keep the dequantised experts in bf16 despite
    # dtype=float32, and their expert matmuls then round to bf16 (logits off by up to 5 on
    # the tiny model, and incremental decoding off its own full forward). MXFP4 values are
    # exact in bf16, so casting back changes no weight, only the arithmetic.
    return model.float().eval()


def greedy_with_logits(
    model: GptOssForCausalLM, prompt: list[int], steps: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding through transformers' own KV cache: (tokens, per-step logits)."""
    cache = DynamicCache(config=model.config)
    tokens: list[int] = []
    step_logits: list[torch.Tensor] = []
    new = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=new, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[0, -1]
            step_logits.append(logits)
            tokens.append(int(logits.argmax()))
            new = torch.tensor([[tokens[-1]]])
    return tokens, step_logits


def hf_greedy(path: str | Path, prompt: list[int], steps: int) -> list[int]:
    return greedy_with_logits(load_transformers(str(path)), prompt, steps)[0]
