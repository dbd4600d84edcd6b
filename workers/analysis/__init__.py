"""The analyse, steer and explain stages: feature statistics and ranking, steering evidence, LLM explanations
and their HTTP client. Imports `workers.pipeline.context`, `workers.activations` and `dfc`."""
