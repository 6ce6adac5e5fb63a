"""Stage 2, pretokenize: panels -> token rows (the MoVQGAN and text tokenizer job)."""
