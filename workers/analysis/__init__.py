"""The analyse, steer, scan and explain stages: feature statistics, the seed ensemble's matching and ranking,
steering evidence, the behaviour-first scan, LLM explanations and their HTTP client. Imports
`workers.pipeline.context`, `workers.report`, `workers.activations` and `dfc`."""
