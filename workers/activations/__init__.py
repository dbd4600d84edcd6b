"""From two models to paired activations: model loading policy, capture to shards, corpora, shard files, pairing.
Imports `workers.storage` and `dfc`."""
