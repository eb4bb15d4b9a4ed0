"""Synthetic checkpoints: random gpt-oss-architecture weights in the HF or OpenAI layout
(checkpoint_writer.py), a BPE tokenizer trained locally with the harmony special tokens
(tokenizer_training.py), and the tiny embedded default model built from both
(tiny_model.py)."""
