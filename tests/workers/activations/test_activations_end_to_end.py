"""End to end at tiny scale: extract two models of different architectures, align, train a DFC from shards."""


from dfc.config import CrosscoderConfig
from dfc.crosscoder import Crosscoder
from dfc.metrics import evaluate
from dfc.trainer import TrainConfig, train
from workers.activations.corpus import CorpusSpec
from workers.activations.extract import ExtractionRequest, extract
from workers.activations.pairing import PairedActivations, align_activations, stored_texts


def test_extract_align_and_train_a_dfc_from_shards_on_s3(tiny_models, s3_store):
    corpus = CorpusSpec(kind="builtin", max_docs=120, max_chars=400)
    results = {}
    for arch in ("llama", "qwen3"):
        request = ExtractionRequest(
            model=str(tiny_models[arch]), revision=None, layer="middle", corpus=corpus, tokens_per_shard=2048
        )
        results[arch] = extract(request, s3_store)
    prefix_a, prefix_b = results["llama"].prefix, results["qwen3"].prefix
    assert results["llama"].manifest.d_model == 64 and results["qwen3"].manifest.d_model == 96
    assert len(results["llama"].manifest.shards) > 1

    texts = stored_texts(s3_store, prefix_a)
    assert texts == stored_texts(s3_store, prefix_b)  # both models saw the same strings
    alignment = align_activations(s3_store, prefix_a, prefix_b, texts.__getitem__, "audits/t/alignment")
    assert alignment.aligned_sequence_fraction > 0.95
    assert alignment.n_pairs > 0.5 * min(results["llama"].manifest.n_tokens, results["qwen3"].manifest.n_tokens)

    reader = PairedActivations(s3_store, prefix_a, prefix_b, alignment.pairs_key, batch_size=256, shuffle_buffer=1024)
    model = Crosscoder(CrosscoderConfig(d_a=64, d_b=96, n_features=512, k=8, a_only=0.05, b_only=0.05))
    result = train(model, reader, TrainConfig(steps=120, lr=3e-3, dead_after_tokens=20_000, log_every=0))
    assert result.steps == 120
    held_out = PairedActivations(
        s3_store, prefix_a, prefix_b, alignment.pairs_key, batch_size=256, shuffle_buffer=1024, seed=7, epochs=1
    )
    ev = evaluate(model, held_out, max_batches=4)
    assert ev.fve_a > 0.3 and ev.fve_b > 0.3
    assert 0 < ev.l0 <= 8
