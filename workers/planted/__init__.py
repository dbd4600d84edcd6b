"""Planted-behaviour pairs: two tiny causal LMs of different architectures and tokenizers, model B taught a
behaviour on a trigger (both as data, `recipes`), with their synthetic corpus, and the judge of whether an audit
found what was planted (`truth`). Ground truth for the demo, the tests and the planted-pair suite."""
