"""Stage 4, generate: requests -> generated pairs (the bulk engine job, prompt rewriting, verifiers)."""
