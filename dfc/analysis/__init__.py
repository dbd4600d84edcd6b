"""What a trained crosscoder's features are: statistics and contexts, promoted tokens, ranking, LLM explanations.
Imports `dfc` core, `dfc.lm` and `dfc.behaviour`, never the other way round."""
