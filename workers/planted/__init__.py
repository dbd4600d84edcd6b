"""The planted-behaviour pair: two tiny causal LMs of different architectures and tokenizers, model B taught a
behaviour on a trigger, with its synthetic corpus. Ground truth for the demo, the tests and the benchmarks."""
