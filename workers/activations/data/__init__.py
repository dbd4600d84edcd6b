"""Data shipped with the workers: the built-in offline corpus (`builtin_corpus.jsonl`) and its generator."""
