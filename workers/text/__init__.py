"""Text in and out of the model: the tokenizer (tokenizer.json through `tokenizers`) and
the harmony chat format (harmony/)."""
